#!/usr/bin/env python3
"""Reference check for tests/tasks/byte_tokenizer_test.cpp: loads DIR/tokenizer.json with Hugging
Face tokenizers, and DIR as a whole with transformers' AutoTokenizer (as a user would), rendering
its chat template with apply_chat_template.

    python3 hf_tokenizer_check.py DIR INPUT.json OUTPUT.json   (INPUT: {"texts": [...], "messages": [...]})

Writes one JSON object: {"vocab_size", "ids": [[...]], "decoded": [...], "chat", "chat_ids", "eos_id", "pad_id"}.
"""
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from tokenizers import Tokenizer  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

folder, inp_path, out_path = sys.argv[1:4]
tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
with open(inp_path, encoding="utf-8") as f:
    inp = json.load(f)
out = {"vocab_size": tok.get_vocab_size(with_added_tokens=True), "ids": [], "decoded": []}
for t in inp["texts"]:
    ids = tok.encode(t).ids
    out["ids"].append(ids)
    out["decoded"].append(tok.decode(ids, skip_special_tokens=False))
hf = AutoTokenizer.from_pretrained(folder)
out["chat"] = hf.apply_chat_template(inp["messages"], tokenize=False, add_generation_prompt=True)
out["chat_ids"] = tok.encode(out["chat"]).ids
out["eos_id"] = hf.eos_token_id
out["pad_id"] = hf.pad_token_id
with open(out_path, "w", encoding="utf-8") as f:
    json.dump(out, f, ensure_ascii=False)
