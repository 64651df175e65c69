// Baseline half of bench/tokenizer_bench: times Hugging Face tokenizers (npm 0.23.2) encodeBatch on
// the same documents. Not run by tests. Usage: node tokenizer_hf_bench.js tokenizer.json docs.json
// (TOKENIZERS_PARALLELISM=false makes encodeBatch use one thread). Prints one JSON line.
const fs = require('fs');
const path = require('path');
const { Tokenizer } = require(path.join(__dirname, '..', 'third_party', 'npm', 'node_modules', 'tokenizers'));
(async () => {
  const tok = Tokenizer.fromFile(process.argv[2]);
  const docs = JSON.parse(fs.readFileSync(process.argv[3], 'utf8'));
  let best = Infinity, tokens = 0, checksum = 0;
  for (let rep = 0; rep < 2; ++rep) {
    const t0 = process.hrtime.bigint();
    const encs = await tok.encodeBatch(docs, { addSpecialTokens: true });
    const s = Number(process.hrtime.bigint() - t0) / 1e9;
    best = Math.min(best, s);
    tokens = 0;
    checksum = 0;
    for (const e of encs) for (const id of e.getIds()) { tokens++; checksum = (checksum * 31 + id) % 1000000007; }
  }
  console.log(JSON.stringify({ seconds: best, tokens, checksum }));
})().catch((e) => { console.error(e); process.exit(1); });
