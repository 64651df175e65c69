#!/usr/bin/env python3
"""Independent check of prepared folders for tests/datasets/prepare_golden_test.cpp: reads the
binary layout (datasets/shards.h) with its own reader and rebuilds what every file must hold from
the source JSONL with Hugging Face `tokenizers` (ids) and transformers' apply_chat_template (chat
text), using none of ptk's code. Never used by ptk.

    python3 prepare_reference_check.py SPEC.json RESULT.json

SPEC: {"cases": [{"name", "dir", "format": sft|preference|rl, "tokenizer": folder with tokenizer.json,
       "chat_template": file of the Jinja template, "max_seq_len", "packing": bool, "seed",
       "shard_tokens", "sources": [{"path", "weight"}]}]}
RESULT: {name: {"docs", "records", "skipped", "rows", "tokens", "errors": [...]}}; exit status 1 when
any case has errors.

What a document must hold (the formats of docs/DESIGN.md, TRL's semantics):
  sft messages            the template's rendering (no generation prompt), encoded; mask 1 on tokens
                          overlapping an assistant message's content or its <|im_end|>
  sft prompt/completion   strings: encode(prompt) + encode(completion) + EOS (tokenized apart, as
                          at generation), mask 1 on the completion's tokens and the EOS; seg_a =
                          the prompt's tokens; counts.boundary_merged: records where
                          encode(prompt + completion) differs from that. Message lists: the whole conversation rendered, mask 1 on
                          every token from seg_a on, seg_a = the common prefix of its ids and
                          encode(render(prompt, generation prompt)) (TRL's completion_mask: the
                          template's "\n" after <|im_end|> included)
  sft text                encode(text) + EOS, mask 1 everywhere
  sft, all                cut to the first max_seq_len tokens; unpacked, a record the cut leaves
                          without a mask 1 is dropped (TRL)
  preference              prompt, chosen, rejected back to back; strings: encode each, EOS after each
                          reply; messages: render(prompt, generation prompt) and each reply as
                          render(prompt + reply)[len(that):] (TRL). Too long (prompt + longer reply >
                          L): the prompt keeps its last max(L/2, L - longer reply) tokens (at most all),
                          the replies their first L - kept. Mask 0 on the prompt, 1 on the replies;
                          seg_a = prompt tokens, seg_b = chosen tokens; counts.boundary_merged: pairs
                          where encode(prompt + reply) differs from encode(prompt) + encode(reply)
  rl                      render(prompt, generation prompt) or encode(prompt), mask 0; dropped when
                          over max_seq_len; meta.bin holds the record's JSON
Weights: floor(w) copies of each record, one more for a seeded fraction (prepare.cpp's splitmix64
hash, the one ptk-defined choice reimplemented here); copies are consecutive entries of docs.idx.
Bad lines (invalid UTF-8 or JSON, wrong fields or roles) are listed in skipped.txt, never written.
Packing (sft): every document in exactly one row, rows within max_seq_len, and each placement
best-fit decreasing (longest first, ties by index; into the open row with the least room that fits,
else a new row), checked placement by placement.
"""
import json
import math
import os
import re
import struct
import sys
import unicodedata

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from tokenizers import Tokenizer  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

DOC = struct.Struct("<QQIIIIIIII")  # DocEntry: offset, meta_offset, shard, length, seg_a, seg_b, meta_len, source, line, reserved
assert DOC.size == 48


def bytes_to_unicode():
    # GPT-2's byte <-> character map (the ByteLevel alphabet).
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


BYTE_OF = bytes_to_unicode()


class Tok:
    def __init__(self, folder, template_file):
        path = os.path.join(folder, "tokenizer.json")
        self.tok = Tokenizer.from_file(path)
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
        norm = spec.get("normalizer")
        if norm is None:
            self.normalize = lambda s: s
        elif norm.get("type") == "NFC":
            self.normalize = lambda s: unicodedata.normalize("NFC", s)
        else:
            raise SystemExit(f"normalizer {norm} not handled by this checker")
        self.added = {t["id"]: t["content"].encode() for t in spec["added_tokens"]}
        with open(os.path.join(folder, "tokenizer_config.json"), encoding="utf-8") as f:
            eos = json.load(f)["eos_token"]
        self.eos = self.tok.token_to_id(eos if isinstance(eos, str) else eos["content"])
        with open(template_file, encoding="utf-8") as f:
            self.template = f.read()
        self.hf = PreTrainedTokenizerFast(tokenizer_file=path)
        self.byte_len = {}

    def encode(self, text):
        return self.tok.encode(text).ids

    def token_bytes(self, i):
        if i in self.added:
            return self.added[i]
        return bytes(BYTE_OF[c] for c in self.tok.id_to_token(i))

    def starts(self, text, ids):
        """Byte offset of each token in the normalized text (and checks that they tile it)."""
        out, pos = [], 0
        for i in ids:
            out.append(pos)
            pos += len(self.token_bytes(i))
        assert pos == len(self.normalize(text).encode()), "token bytes do not tile the normalized text"
        return out, pos

    def nbytes(self, text):
        # Where `text` (a prefix ending next to ASCII) ends in the normalized whole.
        return len(self.normalize(text).encode())

    def render(self, messages, gen):
        return self.hf.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                           add_generation_prompt=gen)

    def chat(self, messages):
        """Rendering, ids, and the assistant mask (tokens overlapping an assistant content + <|im_end|>)."""
        text = self.render(messages, False)
        spans = []
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            head = self.render(messages[:k], True)
            want = m["content"] + "<|im_end|>"
            assert text.startswith(head) and text[len(head):].startswith(want), "template renders assistant turns unexpectedly"
            spans.append((self.nbytes(text[:len(head)]), self.nbytes(text[:len(head) + len(want)])))
        ids = self.encode(text)
        starts, end = self.starts(text, ids)
        ends = starts[1:] + [end]
        mask = [int(any(s < b and e > a for a, b in spans)) for s, e in zip(starts, ends)]
        return ids, mask


ROLES = {"system", "user", "assistant"}


def messages_ok(v):
    return (isinstance(v, list) and len(v) > 0 and all(
        isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) and m.get("tool_calls") is None
        for m in v))


def text_or_messages(v):
    return isinstance(v, str) or messages_ok(v)


def has_assistant(v):
    return any(m["role"] == "assistant" for m in v)


def parse(raw, fmt):
    """The record, or None for a line prepare must skip."""
    try:
        rec = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(rec, dict):
        return None
    if fmt == "sft":
        if "messages" in rec:
            return rec if messages_ok(rec["messages"]) and has_assistant(rec["messages"]) else None
        if "prompt" in rec or "completion" in rec:
            p, c = rec.get("prompt"), rec.get("completion")
            if not (text_or_messages(p) and text_or_messages(c)) or isinstance(p, str) != isinstance(c, str):
                return None
            if c == "" or (isinstance(c, list) and not has_assistant(c)):
                return None
            return rec
        if "text" in rec:
            return rec if isinstance(rec["text"], str) and rec["text"] else None
        return None
    if fmt == "preference":
        p, c, r = rec.get("prompt"), rec.get("chosen"), rec.get("rejected")
        if not all(text_or_messages(x) for x in (p, c, r)):
            return None
        if not isinstance(p, str) == isinstance(c, str) == isinstance(r, str) or c == "" or r == "":
            return None
        return rec
    p = rec.get("prompt")
    if not text_or_messages(p) or p == "":
        return None
    a = rec.get("answer")
    return rec if isinstance(a, str) or (isinstance(a, (int, float)) and not isinstance(a, bool)) else None


def sft_doc(tok, rec, L):
    seg_a, merged = 0, False
    if "messages" in rec:
        ids, mask = tok.chat(rec["messages"])
    elif "prompt" in rec:
        p, c = rec["prompt"], rec["completion"]
        if isinstance(p, str):
            pi, ci = tok.encode(p), tok.encode(c)
            merged = tok.encode(p + c) != pi + ci
            ids, mask, seg_a = pi + ci + [tok.eos], [0] * len(pi) + [1] * (len(ci) + 1), len(pi)
        else:
            ids, _ = tok.chat(p + c)
            prompt_ids = tok.encode(tok.render(p, True))
            seg_a = 0  # TRL's common_prefix_length(prompt ids, prompt + completion ids)
            while seg_a < min(len(prompt_ids), len(ids)) and prompt_ids[seg_a] == ids[seg_a]:
                seg_a += 1
            mask = [0] * seg_a + [1] * (len(ids) - seg_a)
    else:
        ids = tok.encode(rec["text"]) + [tok.eos]
        mask = [1] * len(ids)
    truncated = len(ids) > L
    return ids[:L], mask[:L], min(seg_a, L), 0, truncated, merged


def preference_doc(tok, rec, L):
    p, c, r = rec["prompt"], rec["chosen"], rec["rejected"]
    if isinstance(p, str):
        pi, ci, ri = tok.encode(p), tok.encode(c) + [tok.eos], tok.encode(r) + [tok.eos]
        merged = tok.encode(p + c) != pi + ci[:-1] or tok.encode(p + r) != pi + ri[:-1]
    else:
        pt = tok.render(p, True)
        parts = []
        for reply in (c, r):
            full = tok.render(p + reply, False)
            assert full.startswith(pt), "prompt + reply does not render after the prompt"
            parts.append(full[len(pt):])
        pi, ci, ri = tok.encode(pt), tok.encode(parts[0]), tok.encode(parts[1])
        merged = tok.encode(pt + parts[0]) != pi + ci or tok.encode(pt + parts[1]) != pi + ri
    longest = max(len(ci), len(ri))
    truncated = len(pi) + longest > L
    if truncated:
        keep = min(len(pi), max(L // 2, L - min(longest, L)))
        pi = pi[len(pi) - keep:]
        ci, ri = ci[:L - keep], ri[:L - keep]
    ids = pi + ci + ri
    return ids, [0] * len(pi) + [1] * (len(ci) + len(ri)), len(pi), len(ci), truncated, merged


def rl_doc(tok, rec, L):
    p = rec["prompt"]
    ids = tok.encode(tok.render(p, True)) if isinstance(p, list) else tok.encode(p)
    return ids, [0] * len(ids), 0, 0, False, False


def splitmix64(x):
    m = (1 << 64) - 1
    x = (x + 0x9E3779B97F4A7C15) & m
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
    return x ^ (x >> 31)


def copies(weight, seed, source, line):
    n = int(math.floor(weight))
    frac = weight - n
    if frac > 0:
        h = splitmix64(seed ^ splitmix64(((source << 40) ^ line) & ((1 << 64) - 1)))
        if (h >> 11) * 2.0 ** -53 < frac:
            n += 1
    return n


def lines_of(path):
    with open(path, "rb") as f:
        data = f.read()
    out = data.split(b"\n")
    if out and out[-1] == b"":
        out.pop()
    return [(k + 1, l[:-1] if l.endswith(b"\r") else l) for k, l in enumerate(out)]


def check_case(tok, case, errors):
    fmt, L, d = case["format"], case["max_seq_len"], case["dir"]
    err = errors.append
    make = {"sft": sft_doc, "preference": preference_doc, "rl": rl_doc}[fmt]
    expected = []  # (source, line, ids, mask, seg_a, seg_b, meta, copies)
    skipped = set()
    counts = dict(read=0, skipped=0, truncated=0, dropped=0, excluded_by_weight=0, boundary_merged=0)
    per_source = []
    kept_frac = []
    for si, src in enumerate(case["sources"]):
        ps = dict(records=0, skipped=0, docs=0, tokens=0)
        n_kept = n_valid = 0
        for line_no, raw in lines_of(src["path"]):
            if not raw.strip(b" \t\r"):
                continue
            counts["read"] += 1
            ps["records"] += 1
            rec = parse(raw, fmt)
            if rec is None:
                counts["skipped"] += 1
                ps["skipped"] += 1
                skipped.add((src["path"], line_no))
                continue
            n = copies(src["weight"], case["seed"], si, line_no)
            n_valid += 1
            n_kept += n > 0
            if n == 0:
                counts["excluded_by_weight"] += 1
                continue
            ids, mask, seg_a, seg_b, truncated, merged = make(tok, rec, L)
            if fmt == "rl" and len(ids) > L:
                counts["dropped"] += 1
                continue
            if fmt == "sft" and truncated and not case["packing"] and 1 not in mask:
                counts["dropped"] += 1  # TRL drops rows truncation left without a target (unpacked)
                continue
            counts["truncated"] += truncated
            counts["boundary_merged"] += merged
            meta = rec if fmt == "rl" else None
            expected.append((si, line_no, ids, mask, seg_a, seg_b, meta, n))
            ps["docs"] += n
            ps["tokens"] += len(ids)
        per_source.append(ps)
        if src["weight"] != math.floor(src["weight"]) and n_valid >= 20:
            kept_frac.append((src["weight"] - math.floor(src["weight"]), n_kept / n_valid, n_valid))
    # A seeded fraction: the share kept is the fraction give or take 4 standard deviations.
    for frac, got, n in kept_frac:
        if abs(got - frac) > 4 * math.sqrt(frac * (1 - frac) / n):
            err(f"a weight's fraction {frac} kept {got:.3f} of {n} records")

    # docs.idx, tokens and masks through our own reader.
    raw = open(os.path.join(d, "docs.idx"), "rb").read()
    entries = [DOC.unpack_from(raw, k) for k in range(0, len(raw), DOC.size)]
    want_entries = sum(e[7] for e in expected)
    if len(entries) != want_entries:
        err(f"docs.idx has {len(entries)} entries, expected {want_entries}")
    manifest = json.load(open(os.path.join(d, "manifest.json"), encoding="utf-8"))
    shard_counts = manifest["shards"]
    tokens, masks = [], []
    for k in range(len(shard_counts)):
        t = open(os.path.join(d, f"tokens-{k:05d}.u32"), "rb").read()
        m = open(os.path.join(d, f"mask-{k:05d}.u8"), "rb").read()
        tokens.append(struct.unpack(f"<{len(t) // 4}I", t))
        masks.append(m)
        if len(t) != 4 * shard_counts[k] or len(m) != shard_counts[k]:
            err(f"shard {k}: {len(t)} token bytes, {len(m)} mask bytes for {shard_counts[k]} tokens")
    if os.path.exists(os.path.join(d, f"tokens-{len(shard_counts):05d}.u32")):
        err("a token shard beyond the manifest's list")
    meta_bin = open(os.path.join(d, "meta.bin"), "rb").read() if fmt == "rl" else b""
    e_iter = iter(entries)
    pos = [0, 0]  # where the next distinct document must start: shard, offset
    targets = doc_tokens = 0
    lengths = []
    for si, line_no, ids, mask, seg_a, seg_b, meta, n in expected:
        for c in range(n):
            e = next(e_iter, None)
            if e is None:
                break
            offset, meta_off, shard, length, ea, eb, meta_len, source, line, reserved = e
            where = f"{case['sources'][si]['path']}:{line_no} copy {c}"
            if (source, line) != (si, line_no):
                err(f"{where}: docs.idx entry is source {source} line {line}")
                return counts
            if c == 0:
                # Distinct documents back to back; a new shard when the next one does not fit.
                if pos[1] > 0 and pos[1] + len(ids) > case["shard_tokens"]:
                    pos = [pos[0] + 1, 0]
                if [shard, offset] != pos:
                    err(f"{where}: at shard {shard} offset {offset}, expected {pos}")
                pos[1] = offset + length
                pos[0] = shard
            got = list(tokens[shard][offset:offset + length]) if shard < len(tokens) else []
            got_mask = list(masks[shard][offset:offset + length]) if shard < len(masks) else []
            if got != ids:
                err(f"{where}: ids {got[:12]}... != HF {ids[:12]}... ({len(got)} vs {len(ids)})")
            if got_mask != mask:
                err(f"{where}: mask differs from the format's ({''.join(map(str, got_mask))} vs {''.join(map(str, mask))})")
            if (ea, eb, reserved) != (seg_a, seg_b, 0):
                err(f"{where}: seg_a, seg_b = {ea}, {eb}, expected {seg_a}, {seg_b}")
            if fmt == "rl":
                if json.loads(meta_bin[meta_off:meta_off + meta_len].decode("utf-8")) != meta:
                    err(f"{where}: meta.bin does not hold the record")
            elif (meta_off, meta_len) != (0, 0):
                err(f"{where}: meta fields set outside rl")
            targets += sum(mask[0 if fmt == "preference" else 1:])
            doc_tokens += len(ids)
            lengths.append(len(ids))
    if [pos[0] + 1 if expected else 0, pos[1]] != [len(shard_counts), shard_counts[-1]]:
        err(f"the documents end at {pos}, the shards hold {shard_counts}")

    # Packing.
    rows = len(entries)
    if fmt == "sft" and case["packing"]:
        idx = open(os.path.join(d, "rows.idx"), "rb").read()
        offs = struct.unpack(f"<{len(idx) // 8}Q", idx)
        rd = open(os.path.join(d, "rows.docs"), "rb").read()
        row_docs = struct.unpack(f"<{len(rd) // 4}I", rd)
        rows = len(offs) - 1
        if offs[0] != 0 or offs[-1] != len(row_docs) or any(a >= b for a, b in zip(offs, offs[1:])):
            err(f"rows.idx offsets are not 0 < ... < {len(row_docs)}")
        row_of = {}
        for r in range(rows):
            for k in range(offs[r], offs[r + 1]):
                if row_docs[k] in row_of:
                    err(f"document {row_docs[k]} in rows {row_of[row_docs[k]]} and {r}")
                row_of[row_docs[k]] = r
        if sorted(row_of) != list(range(len(lengths))):
            err("rows do not hold every document exactly once")
        else:
            order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
            rank = {doc: k for k, doc in enumerate(order)}
            free, created = {}, 0  # row -> free tokens; rows appear in creation order
            for doc in order:
                r, n = row_of[doc], lengths[doc]
                fits = [f for f in free.values() if f >= n]
                if r not in free:
                    if fits or r != created:
                        err(f"document {doc} opened row {r} though a row had room, or out of order")
                        break
                    free[r] = L
                    created += 1
                elif free[r] != min(fits):
                    err(f"document {doc} ({n} tokens) went into a row with {free[r]} free, best fit {min(fits)}")
                    break
                free[r] -= n
            for r in range(rows):
                docs_r = row_docs[offs[r]:offs[r + 1]]
                if [rank[x] for x in docs_r] != sorted(rank[x] for x in docs_r):
                    err(f"row {r}: documents not in placement order")
    # Manifest and skipped.txt.
    want = dict(counts, docs=want_entries, rows=rows)
    for k, v in want.items():
        if manifest["counts"][k] != v:
            err(f"manifest counts.{k} = {manifest['counts'][k]}, expected {v}")
    written = sum(len(e[2]) for e in expected)
    if manifest["tokens"]["written"] != written or manifest["tokens"]["targets"] != targets:
        err(f"manifest tokens {manifest['tokens']}, expected written {written}, targets {targets}")
    pad = 1 - doc_tokens / (rows * L) if fmt == "sft" and rows else 0.0
    if abs(manifest["tokens"]["padding_fraction"] - pad) > 1e-12:
        err(f"padding_fraction {manifest['tokens']['padding_fraction']}, expected {pad}")
    for si, ps in enumerate(per_source):
        got = {k: manifest["per_source"][si][k] for k in ps}
        if got != ps:
            err(f"per_source[{si}] = {got}, expected {ps}")
    for name, size in manifest["files"].items():
        if os.path.getsize(os.path.join(d, name)) != size:
            err(f"manifest files.{name} = {size}, the file has {os.path.getsize(os.path.join(d, name))}")
    key = manifest["key"]
    if (key["format"], key["max_seq_len"], key["packing"]) != (fmt, L, fmt == "sft" and case["packing"]):
        err(f"manifest key {key['format']}, {key['max_seq_len']}, {key['packing']} differs from the options")
    listed = set()
    path = os.path.join(d, "skipped.txt")
    if os.path.exists(path):
        for s in open(path, encoding="utf-8").read().splitlines():
            m = re.match(r"(.*):(\d+): ", s)
            listed.add((m.group(1), int(m.group(2))) if m else s)
    if listed != skipped:
        err(f"skipped.txt lists {sorted(listed)[:5]}..., expected {sorted(skipped)[:5]}... ({len(listed)} vs {len(skipped)})")
    return dict(docs=len(entries), records=counts["read"], skipped=len(skipped), rows=rows, tokens=written,
                truncated=counts["truncated"], boundary_merged=counts["boundary_merged"])


def main():
    spec_path, out_path = sys.argv[1:3]
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    result, bad = {}, False
    toks = {}
    for case in spec["cases"]:
        key = (case["tokenizer"], case["chat_template"])
        if key not in toks:
            toks[key] = Tok(*key)
        errors = []
        try:
            r = check_case(toks[key], case, errors)
        except Exception as e:  # a file missing or malformed: report, do not crash the others
            r = {}
            errors.append(f"{type(e).__name__}: {e}")
        r["errors"] = errors[:20] + ([f"... {len(errors) - 20} more"] if len(errors) > 20 else [])
        bad = bad or bool(errors)
        result[case["name"]] = r
        print(case["name"], {k: v for k, v in r.items() if k != "errors"}, "errors:", len(errors))
        for e in r["errors"]:
            print("  ", e)
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(result, f, ensure_ascii=False, indent=1)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
