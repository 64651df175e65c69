// Reference check for tests/tasks/byte_tokenizer_test.cpp: loads DIR/tokenizer.json with Hugging Face
// tokenizers and renders DIR/tokenizer_config.json's chat_template with @huggingface/jinja.
// usage: node hf_tokenizer_check.js NODE_MODULES DIR INPUT.json   (INPUT: {"texts": [...], "messages": [...]})
// Prints one JSON object: {"vocab_size", "ids": [[...]], "decoded": [...], "chat", "chat_ids"}.
const fs = require('fs');
const path = require('path');
const [nm, dir, input] = process.argv.slice(2).map((p) => path.resolve(p));
const { Tokenizer } = require(path.join(nm, 'tokenizers'));
(async () => {
  const tok = Tokenizer.fromFile(path.join(dir, 'tokenizer.json'));
  const inp = JSON.parse(fs.readFileSync(input, 'utf8'));
  const out = { vocab_size: tok.getVocabSize(true), ids: [], decoded: [] };
  for (const t of inp.texts) {
    const ids = (await tok.encode(t)).getIds();
    out.ids.push(ids);
    out.decoded.push(await tok.decode(ids, false));
  }
  const { Template } = await import(require('url').pathToFileURL(path.join(nm, '@huggingface/jinja/dist/index.js')).href);
  const cfg = JSON.parse(fs.readFileSync(path.join(dir, 'tokenizer_config.json'), 'utf8'));
  out.chat = new Template(cfg.chat_template).render({ messages: inp.messages, add_generation_prompt: true });
  out.chat_ids = (await tok.encode(out.chat)).getIds();
  out.eos_id = tok.tokenToId(cfg.eos_token);
  out.pad_id = tok.tokenToId(cfg.pad_token);
  console.log(JSON.stringify(out));
})().catch((e) => { console.error(String(e)); process.exit(1); });
