"""ptk's dataset readers against Hugging Face `datasets` and TRL on the same files.

  - File formats: the same records written as JSONL, a JSON array (.json), .jsonl.gz, .json.gz and
    Parquet (written by `datasets` itself, nulls for the fields a record lacks) are each loaded with
    `datasets.load_dataset("json" | "parquet")`, which must see the same records in the same order, and
    prepared with `ptk prepare`: every file gives the same documents (ids, loss mask, segment lengths)
    as ptk's preparation of the records converted here, in Python, to TRL's field names.
  - Record formats: ShareGPT `conversations` and Alpaca `instruction/input/output/system/history` are
    converted here as LLaMA-Factory's converters do (roles human/gpt -> user/assistant; user turn =
    "\\n".join(non-empty instruction, input); history pairs first); ptk's own reading must prepare
    the same documents.
  - Implicit prompts: hh-rlhf-like `{"chosen", "rejected"}` strings (and message lists), with the edge
    cases of TRL's loop (the space given back, code points vs bytes, one reply a prefix of the other,
    the first character differing): `trl.data_utils.extract_prompt` makes explicit records, and ptk's
    preparation of the implicit file (JSONL and Parquet) must equal its preparation of those.
  - data.columns and data.eval_split from the command line: renamed GSM8K-like rows split into
    OUT/train and OUT/eval, disjoint, together every record.
  - ../shared/data (skips without it): LIMA (Alpaca JSON array), ShareGPT-zh (JSONL), hh-rlhf
    (.jsonl.gz, implicit prompt) and LLaMA-Factory's dpo_en_demo (ShareGPT preference JSON array)
    prepare one document per record `datasets` reads (bad: only ShareGPT conversations without an
    assistant turn; dropped: over max_seq_len), and hh-rlhf's first 300 pairs equal TRL's extract_prompt.
"""
import gzip
import json
import os
import shutil
import struct
import unittest
from pathlib import Path

import ptkref

SHARED = ptkref.SOURCE_DIR.parent / "shared" / "data"


def read_prepared(folder):
    """Per document: (ids, mask, seg_a, seg_b) from a prepared folder (datasets/shards.h)."""
    folder = Path(folder)
    shards = {}
    docs = []
    raw = (folder / "docs.idx").read_bytes()
    for k in range(len(raw) // 48):
        offset, _meta_off, shard, length, seg_a, seg_b, _ml, _src, _line, _r = struct.unpack_from("<QQIIIIIIII", raw, 48 * k)
        if shard not in shards:
            ids = (folder / f"tokens-{shard:05d}.u32").read_bytes()
            mask = (folder / f"mask-{shard:05d}.u8").read_bytes()
            shards[shard] = ([int.from_bytes(ids[i:i + 4], "little") for i in range(0, len(ids), 4)], list(mask))
        ids, mask = shards[shard]
        docs.append((ids[offset:offset + length], mask[offset:offset + length], seg_a, seg_b))
    return docs


def alpaca_to_messages(r):
    """LLaMA-Factory's AlpacaDatasetConverter, as TRL-style messages."""
    m = []
    if r.get("system"):
        m.append({"role": "system", "content": r["system"]})
    for q, a in r.get("history") or []:
        m += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    m.append({"role": "user", "content": "\n".join(x for x in (r.get("instruction"), r.get("input")) if x)})
    return m


ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def sharegpt_to_messages(r):
    m = [{"role": ROLES[t["from"]], "content": t["value"]} for t in r["conversations"]]
    if r.get("system") and m[0]["role"] != "system":
        m.insert(0, {"role": "system", "content": r["system"]})
    return m


def to_trl_sft(r):
    if r.get("conversations"):
        return {"messages": sharegpt_to_messages(r)}
    if r.get("instruction") is not None:
        return {"messages": alpaca_to_messages(r) + [{"role": "assistant", "content": r["output"]}]}
    return {k: v for k, v in r.items() if v is not None}


SFT_RECORDS = [
    {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]},
    {"conversations": [{"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "Hello!"},
                       {"from": "human", "value": "Add 3 and 4"}, {"from": "gpt", "value": "7"}], "system": "Be brief."},
    {"instruction": "Translate to French", "input": "cat", "output": "chat"},
    {"instruction": "Say yes", "input": "", "output": "yes", "system": "You agree.",
     "history": [["first?", "one"], ["second?", "two"]]},
    {"prompt": "The capital of France is", "completion": " Paris."},
    {"text": "def add(a, b):\n    return a + b\n"},
    {"instruction": "", "input": "Only an input here", "output": "fine"},
    {"conversations": [{"from": "system", "value": "sys"}, {"from": "user", "value": "q \u00e9t\u00e9"},
                       {"from": "assistant", "value": "r\u00e9ponse"}]},
]

HH_PAIRS = [
    {"chosen": "\n\nHuman: What color is the sky?\n\nAssistant: It is blue.",
     "rejected": "\n\nHuman: What color is the sky?\n\nAssistant: It is green."},
    {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: Goodbye, friend.",
     "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: whatever"},
    {"chosen": "Human: caf\u00e9 Assistant: \u00e9t\u00e9", "rejected": "Human: caf\u00e9 Assistant: \u00e8re"},  # code points
    {"chosen": "Human: short", "rejected": "Human: short and longer"},  # one a prefix of the other
    {"chosen": "a ", "rejected": "bc"},  # differs at 0 and chosen ends with " ": Python's chosen[-1]
    {"chosen": "Same\n\nAssistant: x", "rejected": "Same\n\nAssistant: y"},
]

CHAT_PAIRS = [
    {"chosen": [{"role": "user", "content": "What color is the sky?"}, {"role": "assistant", "content": "It is blue."}],
     "rejected": [{"role": "user", "content": "What color is the sky?"}, {"role": "assistant", "content": "It is green."}]},
    {"chosen": [{"role": "system", "content": "s"}, {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                {"role": "user", "content": "q2"}, {"role": "assistant", "content": "good"}],
     "rejected": [{"role": "system", "content": "s"}, {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                  {"role": "user", "content": "q2"}, {"role": "assistant", "content": "bad"}]},
]


class ReadersReferenceTest(ptkref.TempDirTestCase):
    def setUp(self):
        super().setUp()
        self.tok = self.tmp / "tok"
        ptkref.tiny_tokenizer(self.tok)

    def prepare(self, path, out, fmt="sft", *extra):
        ptkref.ptk("prepare", "--input", path, "--output", out, "--tokenizer", self.tok, "--format", fmt,
                   "--no-packing", "--quiet", "--max-seq-len", "4096", *extra)
        return read_prepared(out)

    def write_all_formats(self, stem, records, datasets):
        """JSONL, JSON array, .jsonl.gz, .json.gz and Parquet (written by `datasets`) of `records`."""
        files = {"jsonl": ptkref.write_jsonl(self.tmp / f"{stem}.jsonl", records),
                 "json": ptkref.write_json(self.tmp / f"{stem}.json", records)}
        for ext in ("jsonl", "json"):
            gz = self.tmp / f"{stem}.{ext}.gz"
            with open(files[ext], "rb") as src, gzip.open(gz, "wb") as dst:
                shutil.copyfileobj(src, dst)
            files[ext + ".gz"] = gz
        # Parquet as the Hub has it: `datasets` reads the JSONL (Dataset.from_list would keep only the
        # first record's columns) and writes the table, nulls where a record lacks a column.
        files["parquet"] = self.tmp / f"{stem}.parquet"
        ds = datasets.load_dataset("json", data_files=str(files["jsonl"]), split="train",
                                   cache_dir=str(self.tmp / "hf-cache"))
        ds.to_parquet(str(files["parquet"]))
        return files

    def check_hf_reads(self, datasets, files, records):
        """`datasets` loads every file as the same records in the same order (None for absent fields)."""
        for kind, path in files.items():
            builder = "parquet" if kind == "parquet" else "json"
            ds = datasets.load_dataset(builder, data_files=str(path), split="train",
                                       cache_dir=str(self.tmp / "hf-cache"))
            self.assertEqual(len(ds), len(records), kind)
            for i, r in enumerate(records):
                for k, v in r.items():
                    self.assertEqual(ds[i][k], v, f"{kind} record {i} field {k}")

    def test_every_file_format_prepares_the_records_trl_names_give(self):
        datasets = ptkref.need("datasets")
        files = self.write_all_formats("sft", SFT_RECORDS, datasets)
        self.check_hf_reads(datasets, files, SFT_RECORDS)
        want = self.prepare(ptkref.write_jsonl(self.tmp / "trl.jsonl", [to_trl_sft(r) for r in SFT_RECORDS]),
                            self.tmp / "p-trl")
        self.assertEqual(len(want), len(SFT_RECORDS))
        for kind, path in files.items():
            got = self.prepare(path, self.tmp / f"p-{kind}")
            self.assertEqual(got, want, f"{kind}: ptk's documents differ from the TRL-named records'")

    def test_implicit_prompt_is_trls_extract_prompt(self):
        datasets = ptkref.need("datasets")
        data_utils = ptkref.need("trl.data_utils")
        for name, pairs in (("hh", HH_PAIRS), ("chat", CHAT_PAIRS)):
            explicit = [data_utils.extract_prompt(p) for p in pairs]
            want = self.prepare(ptkref.write_jsonl(self.tmp / f"{name}-explicit.jsonl", explicit),
                                self.tmp / f"p-{name}-x", "preference")
            self.assertEqual(len(want), len(pairs))
            files = self.write_all_formats(name, pairs, datasets)
            for kind in ("jsonl", "json.gz", "parquet"):
                got = self.prepare(files[kind], self.tmp / f"p-{name}-{kind}", "preference")
                self.assertEqual(got, want, f"{name} {kind}: ptk's implicit prompt differs from TRL's extract_prompt")

    def test_column_mapping_and_eval_split_from_the_command_line(self):
        rows = [{"question": f"What is {i} + {i}?", "solution": f"#### {2 * i}"} for i in range(60)]
        src = ptkref.write_jsonl(self.tmp / "gsm.jsonl", rows)
        out = self.tmp / "p-gsm"
        ptkref.ptk("prepare", "--input", src, "--output", out, "--tokenizer", self.tok, "--format", "rl", "--quiet",
                   'data.columns={"prompt": "question", "answer": "solution"}', "data.eval_split=0.25")
        train, evals = read_prepared(out / "train"), read_prepared(out / "eval")
        self.assertEqual(len(train) + len(evals), 60)
        self.assertGreater(len(evals), 5)
        whole = self.prepare(src, self.tmp / "p-gsm-all", "rl", 'data.columns={"prompt": "question", "answer": "solution"}')
        key = lambda d: d[0]
        self.assertEqual(sorted(train + evals, key=key), sorted(whole, key=key))
        # The split is the same when the file is a JSON array instead.
        arr = ptkref.write_json(self.tmp / "gsm.json", rows)
        ptkref.ptk("prepare", "--input", arr, "--output", self.tmp / "p-gsm2", "--tokenizer", self.tok, "--format", "rl",
                   "--quiet", 'data.columns={"prompt": "question", "answer": "solution"}', "data.eval_split=0.25")
        self.assertEqual(read_prepared(self.tmp / "p-gsm2" / "eval"), evals)
        # Without the mapping: one error naming the file, not one per record.
        p = ptkref.ptk("prepare", "--input", src, "--output", self.tmp / "p-bad", "--tokenizer", self.tok,
                       "--format", "rl", "--quiet", check=False)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn(f"{src}: all 60 records read", p.stdout)
        self.assertNotIn("gsm.jsonl:2:", p.stdout)
        # The same rows as Parquet: its columns are checked once, before any row.
        datasets = ptkref.need("datasets")
        pq = self.tmp / "gsm.parquet"
        datasets.load_dataset("json", data_files=str(src), split="train", cache_dir=str(self.tmp / "hf")).to_parquet(str(pq))
        p = ptkref.ptk("prepare", "--input", pq, "--output", self.tmp / "p-bad2", "--tokenizer", self.tok,
                       "--format", "rl", "--quiet", check=False)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn(f'{pq}: its columns ("question", "solution") hold no rl record: it needs "prompt" + "answer"', p.stdout)
        self.assertEqual(p.stdout.count("gsm.parquet"), 1, p.stdout)
        ptkref.ptk("prepare", "--input", pq, "--output", self.tmp / "p-gsm3", "--tokenizer", self.tok, "--format", "rl",
                   "--quiet", 'data.columns={"prompt": "question", "answer": "solution"}', "data.eval_split=0.25")
        self.assertEqual(read_prepared(self.tmp / "p-gsm3" / "eval"), evals)

    def test_shared_datasets_as_they_are(self):
        if not SHARED.is_dir():
            raise unittest.SkipTest(f"[shared-data] {SHARED} is not here")
        datasets = ptkref.need("datasets")
        data_utils = ptkref.need("trl.data_utils")
        cases = [("sft/lima/lima.json", "sft"), ("sft/sharegpt_zh/sharegpt_zh_1K_format.jsonl", "sft"),
                 ("preference/hh_rlhf/harmless-base/test.jsonl.gz", "preference"),
                 ("preference/llamafactory_demo/dpo_en_demo.json", "preference")]
        for rel, fmt in cases:
            path = SHARED / rel
            if not path.exists():
                continue
            ds = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(self.tmp / "hf"))
            n = len(ds)
            # The only bad records: ShareGPT conversations without an assistant turn (nothing to train on).
            bad = sum(1 for c in ds["conversations"] if not any(t["from"] in ("gpt", "assistant") for t in c)) \
                if fmt == "sft" and "conversations" in ds.column_names else 0
            out = self.tmp / ("p-" + rel.replace("/", "_"))
            got = self.prepare(path, out, fmt, "--on-error", "skip")
            manifest = json.loads((out / "manifest.json").read_text())
            self.assertEqual(manifest["counts"]["read"], n, rel)
            self.assertEqual(manifest["counts"]["skipped"], bad, rel)
            n -= bad
            self.assertEqual(len(got) + manifest["counts"]["dropped"], n, rel)  # dropped: over max_seq_len
            if rel.endswith("test.jsonl.gz"):
                with gzip.open(path, "rt", encoding="utf-8") as f:
                    pairs = [json.loads(line) for _, line in zip(range(300), f)]
                explicit = [data_utils.extract_prompt(p) for p in pairs]
                want = self.prepare(ptkref.write_jsonl(self.tmp / "hh300.jsonl", explicit), self.tmp / "p-hh300", "preference")
                self.assertEqual(got[:300], want)


if __name__ == "__main__":
    ptkref.main()
