#!/usr/bin/env python3
"""Golden ids for tests/tokenizer: runs Hugging Face `tokenizers` (the reference, pinned in
requirements.txt) and transformers' apply_chat_template on the committed corpus and chat cases.
Never used by ptk at run time.

    .venv/bin/python3 tests/tokenizer/make_golden.py [--tokenizer tokenizer.json] [--out DIR]

Defaults: assets/tokenizers/qwen/tokenizer.json (scripts/setup.sh copies it from
../shared/tokenizers/qwen), output into tests/tokenizer/data. qwen_golden_test runs it into a
temporary folder and compares the result with the committed files.
"""
import argparse
import json
import os
import unicodedata

from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
DATA = os.path.join(HERE, "data")


def dumps(obj):
    # One JSON object a line, compact, non-ASCII kept as UTF-8 (the form the tests read).
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("".join(dumps(r) + "\n" for r in rows))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", default=os.path.join(ROOT, "assets", "tokenizers", "qwen", "tokenizer.json"))
    ap.add_argument("--out", default=DATA)
    a = ap.parse_args()

    tok = Tokenizer.from_file(a.tokenizer)

    def enc(text):
        return tok.encode(text, add_special_tokens=True).ids

    # Corpus: ids, decode with and without special tokens, and NFC of the input.
    golden = []
    with open(os.path.join(DATA, "corpus.jsonl"), encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            c = json.loads(line)
            # Invalid UTF-8 reaches HF the way a lossy decode hands it over: U+FFFD per maximal subpart.
            text = bytes.fromhex(c["hex"]).decode("utf-8", errors="replace") if "hex" in c else c["text"]
            ids = enc(text)
            golden.append({
                "name": c["name"], "ids": ids,
                "decoded": tok.decode(ids, skip_special_tokens=False),
                "decoded_skip": tok.decode(ids, skip_special_tokens=True),
                "nfc": unicodedata.normalize("NFC", text),
            })
    write_jsonl(os.path.join(a.out, "golden_qwen.jsonl"), golden)

    # Decoding id lists that cut a multi-byte character around added tokens.
    b = tok.token_to_id
    im_end, tool = b("<|im_end|>"), b("<tool_call>")
    cut, rest = [b("ä"), b("½")], b("ł")  # 你 = e4 bd a0 as three byte tokens
    cases = [cut + [im_end, rest], cut + [tool, rest], cut + [rest, im_end], [rest] + cut, [im_end, im_end]]
    write_jsonl(os.path.join(a.out, "golden_decode.jsonl"),
                [{"ids": ids, "decoded": tok.decode(ids, skip_special_tokens=False),
                  "decoded_skip": tok.decode(ids, skip_special_tokens=True)} for ids in cases])

    # Chat: the Qwen2.5 template and plain ChatML rendered by transformers, then encoded.
    with open(os.path.join(DATA, "chat_cases.json"), encoding="utf-8") as f:
        chats = json.load(f)
    hf = PreTrainedTokenizerFast(tokenizer_file=a.tokenizer)
    chat_golden = []
    for name, file in (("qwen2.5", "qwen2.5_chat_template.jinja"), ("chatml", "chatml_chat_template.jinja")):
        with open(os.path.join(DATA, file), encoding="utf-8") as f:
            src = f.read()
        for c in chats:
            text = hf.apply_chat_template(c["messages"], chat_template=src, tokenize=False,
                                          add_generation_prompt=c["add_generation_prompt"])
            chat_golden.append({"template": name, "name": c["name"], "text": text, "ids": enc(text)})
    write_jsonl(os.path.join(a.out, "golden_chat.jsonl"), chat_golden)

    # Small hand-made tokenizer.json files (merges forms, ignore_merges, added-token flags, make-data's).
    with open(os.path.join(DATA, "tiny_cases.json"), encoding="utf-8") as f:
        tiny_cases = json.load(f)
    tiny = []
    for file, texts in tiny_cases.items():
        t = Tokenizer.from_file(os.path.join(DATA, file))
        for text in texts:
            ids = t.encode(text, add_special_tokens=True).ids
            tiny.append({"file": file, "text": text, "ids": ids,
                         "decoded": t.decode(ids, skip_special_tokens=False),
                         "decoded_skip": t.decode(ids, skip_special_tokens=True)})
    write_jsonl(os.path.join(a.out, "golden_tiny.jsonl"), tiny)
    print(f"wrote {len(golden)} corpus, {len(cases)} decode and {len(chat_golden)} chat cases to {a.out}")


if __name__ == "__main__":
    main()
