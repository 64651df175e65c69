#!/usr/bin/env python3
"""Baseline half of bench/tokenizer_bench: times Hugging Face tokenizers' encode_batch (the Python
binding pinned in requirements.txt) on the same documents. Not run by tests.

    .venv/bin/python3 bench/tokenizer_hf_bench.py tokenizer.json docs.json

TOKENIZERS_PARALLELISM=false makes encode_batch use one thread. Prints one JSON line:
{"seconds": best of 2, "tokens": N, "checksum": C} (the checksum as tokenizer_bench computes it).
"""
import json
import sys
import time

from tokenizers import Tokenizer

tok = Tokenizer.from_file(sys.argv[1])
with open(sys.argv[2], encoding="utf-8") as f:
    docs = json.load(f)
best, tokens, checksum = float("inf"), 0, 0
for _ in range(2):
    t0 = time.perf_counter()
    encs = tok.encode_batch(docs, add_special_tokens=True)
    best = min(best, time.perf_counter() - t0)
    tokens, checksum = 0, 0
    for e in encs:
        for i in e.ids:
            tokens += 1
            checksum = (checksum * 31 + i) % 1000000007
print(json.dumps({"seconds": best, "tokens": tokens, "checksum": checksum}))
