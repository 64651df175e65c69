"""Checkpoint folders both ways between ptk and transformers 5.25, and greedy generation.

(a) Every stage's final/ loads in transformers: a few steps of `ptk sft` (tied embeddings), `ptk dpo`
    (untied), `ptk rm` (a Qwen2ForSequenceClassification folder: `scores`) and `ptk grpo`, each from a
    tiny Qwen2 that transformers saved; AutoModelForCausalLM / AutoModelForSequenceClassification load
    final/ with no missing or unexpected weights, AutoTokenizer loads its tokenizer, and `ptk forward`
    gives transformers' logits (scores) on a batch with left- and right-padded rows. Each final/ must differ from
    the start model, so the comparison is of what ptk trained and wrote, not of the input re-read.
    The RM batch includes rows that end in <|endoftext|> as a real token (Qwen2.5 base's EOS is its pad
    token): transformers scores the token before it; `ptk forward` scored the EOS itself until fixed.
    Also `model.dtype=bfloat16` with `checkpoint.max_shard_size=20KB`: final/ is a sharded bf16 folder
    (model-0000i-of-0000n.safetensors + model.safetensors.index.json) transformers reads as bf16.
(b) ptk reads what transformers writes: sharded (max_shard_size) and single-file, fp32 and bf16, tied
    and untied embeddings, YaRN RoPE scaling in transformers 5's rope_parameters and 4.x's rope_scaling;
    `ptk forward` logits equal transformers'.
(c) transformers' greedy generate (left padding, do_sample=False, eos from final/'s
    generation_config.json) on `ptk sft`'s final/ gives `ptk generate --temperature 0`'s ids, for prompts
    of different lengths, some stopping at <|im_end|> and some at max_new_tokens. Pinned difference:
    `ptk generate` never emits an id past the tokenizer's vocabulary (the padding rows of Qwen2.5's
    151,936-row embedding); transformers does unless given suppress_tokens, which the comparison passes.

Tolerances (fp32 on CPU): logits rtol 1e-5 + atol 1e-5 (the same weights and formulas; ptk's kernels
sum in another order, which leaves ~1e-6 differences on |logits| ~ 0.1-1).
"""
import json
import shutil
from pathlib import Path

import ptkref

try:  # quiet "Loading weights" bars
    from transformers.utils import logging as _hf_logging
    _hf_logging.disable_progress_bar()
except ImportError:
    pass

TOL = dict(rtol=1e-5, atol=1e-5)

SFT_ROWS = [
    {"messages": [{"role": "user", "content": "What is 12 + 30?"}, {"role": "assistant", "content": "42"}]},
    {"messages": [{"role": "user", "content": "Write a short poem about the sea."},
                  {"role": "assistant", "content": "The sea is wide."}]},
    {"messages": [{"role": "system", "content": "You add numbers."}, {"role": "user", "content": "12 + 30?"},
                  {"role": "assistant", "content": "42"}]},
    {"messages": [{"role": "user", "content": "Paris is the capital of?"}, {"role": "assistant", "content": "France"}]},
]
PREF_ROWS = [
    {"prompt": "What is 12 + 30?", "chosen": " The answer is 42.", "rejected": " The answer is 24."},
    {"prompt": "Paris is the capital of", "chosen": " France.", "rejected": " Germany."},
    {"prompt": "def add(a, b):", "chosen": "\n    return a + b\n", "rejected": "\n    return a - b\n"},
    {"prompt": "The quick brown fox", "chosen": " jumps over the lazy dog.", "rejected": " is lazy."},
]
RL_ROWS = [
    {"prompt": [{"role": "user", "content": "What is 12 + 30?"}], "answer": "42"},
    {"prompt": [{"role": "user", "content": "What is 1 + 1?"}], "answer": "2"},
    {"prompt": [{"role": "user", "content": "What is 2 + 2?"}], "answer": "4"},
    {"prompt": [{"role": "user", "content": "What is 0 + 3?"}], "answer": "3"},
]


def recipe(run_dir, model_dir, data_file, steps, lr=1e-2, weight_decay=0.0, **sections):
    r = {
        "run": {"seed": 7, "threads": 1, "dir": str(run_dir)},
        "model": {"path": str(model_dir)},
        "data": {"train": [str(data_file)], "max_seq_len": 96, "packing": False},
        "train": {"max_steps": steps, "micro_batch_size": 2, "grad_accum": 1, "log_every": 1},
        "optim": {"lr": lr, "schedule": "constant", "warmup_steps": 0, "weight_decay": weight_decay},
        "checkpoint": {"every": 0},
    }
    for k, v in sections.items():
        r.setdefault(k, {}).update(v)
    return r


def run_stage(tmp, stage, rec, *overrides):
    path = ptkref.write_json(Path(tmp) / f"{stage}.json", rec)
    ptkref.ptk(stage, "--recipe", path, *overrides)
    final = Path(rec["run"]["dir"]) / "final"
    assert (final / "config.json").exists(), f"{stage}: no final/config.json"
    return final


def batch(tok_dir):
    """Three texts twice in one batch: right-padded, then left-padded (pad = <|endoftext|>)."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(Path(tok_dir) / "tokenizer.json"))
    pad = tok.token_to_id("<|endoftext|>")
    texts = ["What is 12 + 30? The answer is 42.", "Paris is the capital", "用一句话介绍你自己。"]
    seqs = [tok.encode(t, add_special_tokens=False).ids for t in texts]
    T = max(map(len, seqs))
    ids, mask = [], []
    for left in (False, True):
        for s in seqs:
            p = T - len(s)
            ids.append([pad] * p + s if left else s + [pad] * p)
            mask.append([0] * p + [1] * len(s) if left else [1] * len(s) + [0] * p)
    return ids, mask


def ptk_forward(tmp, model_dir, ids, mask, name, dtype="float32"):
    from safetensors.torch import load_file
    src = ptkref.write_json(Path(tmp) / f"{name}_in.json", {"input_ids": ids, "attention_mask": mask})
    out = Path(tmp) / f"{name}_out.safetensors"
    ptkref.ptk("forward", "--threads", 1, "--model", model_dir, "--input", src, "--output", out, "--dtype", dtype)
    return load_file(str(out))


def ptk_generate_greedy(tmp, model_dir, conversations, max_new):
    """`ptk generate --temperature 0` on chat prompts; its output lines (ids, text, finish_reason)."""
    src = ptkref.write_jsonl(tmp / "prompts.jsonl", [{"messages": m} for m in conversations])
    out = tmp / "gen.jsonl"
    ptkref.ptk("generate", "--threads", 1, "--model", model_dir, "--input", src, "--output", out,
               "--temperature", 0, "--max-new-tokens", max_new)
    return [json.loads(l) for l in out.read_text(encoding="utf-8").splitlines()]


def hf_logits(model, ids, mask):
    import torch
    ids, mask = torch.tensor(ids), torch.tensor(mask)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # ptk forward's default positions (HF generate's)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits


def masked(x, mask):
    """The values at attended positions only (padded positions are garbage on both sides)."""
    import torch
    m = torch.tensor(mask, dtype=torch.bool)
    return x[m]


def load_hf(folder, cls="AutoModelForCausalLM", dtype="float32"):
    import torch
    import transformers
    model, info = getattr(transformers, cls).from_pretrained(str(folder), dtype=getattr(torch, dtype),
                                                             output_loading_info=True)
    for k in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info.get(k), f"{folder}: transformers reports {k} {info[k]}"
    return model.eval()


def assert_same_config(test, final, start, skip=()):
    """transformers reads the same model from ptk's config.json as from the one it wrote itself (the
    logits alone cannot show this: ptk and transformers would both read a wrong rope_theta alike)."""
    import transformers
    a = transformers.AutoConfig.from_pretrained(str(start)).to_dict()
    b = transformers.AutoConfig.from_pretrained(str(final)).to_dict()
    ignore = {"_name_or_path", *skip}
    test.assertEqual({k: v for k, v in b.items() if k not in ignore}, {k: v for k, v in a.items() if k not in ignore},
                     f"{final}/config.json as transformers reads it")


class _Base(ptkref.TempDirTestCase):
    def setUp(self):
        super().setUp()
        self.torch = ptkref.need("torch")
        self.transformers = ptkref.need("transformers")
        ptkref.need("safetensors", "tokenizers")
        self.tok = ptkref.tiny_tokenizer(self.tmp / "tok")


class StageFinalFoldersLoadInTransformers(_Base):
    def check_causal(self, final, start, dtype="float32"):
        tok = self.transformers.AutoTokenizer.from_pretrained(str(final))
        self.assertEqual(tok.eos_token, "<|im_end|>")
        self.assertEqual(tok("What is 12 + 30?")["input_ids"],
                         self.transformers.AutoTokenizer.from_pretrained(str(self.tok))("What is 12 + 30?")["input_ids"])
        assert_same_config(self, final, start, skip=("dtype",))
        model = load_hf(final, dtype=dtype)
        self.assertEqual(str(model.dtype), f"torch.{dtype}")
        self.assertEqual(str(model.config.dtype), f"torch.{dtype}")  # what config.json says
        model = model.float()  # bf16 -> fp32 is exact: both sides compute in fp32 on the same weights
        ref = load_hf(start)
        ids, mask = batch(self.tok)
        ours = ptk_forward(self.tmp, final, ids, mask, final.parent.name)["logits"]
        theirs = hf_logits(model, ids, mask)
        ptkref.assert_close(f"{final.parent.name} final/ logits", masked(ours, mask), masked(theirs, mask), **TOL)
        moved = (masked(theirs, mask) - masked(hf_logits(ref, ids, mask), mask)).abs().max().item()
        self.assertGreater(moved, 1e-3, "training changed the weights")

    def test_sft_final_tied(self):
        start = ptkref.tiny_qwen2(self.tmp / "start", self.tok, seed=1, tie=True)
        train = ptkref.write_jsonl(self.tmp / "sft.jsonl", SFT_ROWS)
        final = run_stage(self.tmp, "sft", recipe(self.tmp / "sft", start, train, 3))
        self.assertTrue(json.loads((final / "config.json").read_text())["tie_word_embeddings"])
        self.check_causal(final, start)

    def test_sft_final_bfloat16_sharded(self):
        start = ptkref.tiny_qwen2(self.tmp / "start", self.tok, seed=2, tie=False)
        train = ptkref.write_jsonl(self.tmp / "sft.jsonl", SFT_ROWS)
        limit = 20000  # "20KB": transformers' units (KB = 1000 bytes); the embeddings alone are 25.8 kB in bf16
        final = run_stage(self.tmp, "sft", recipe(self.tmp / "sft", start, train, 3, model={"dtype": "bfloat16"},
                                                  checkpoint={"max_shard_size": "20KB"}))
        self.assertFalse((final / "model.safetensors").exists())
        index = json.loads((final / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        self.assertGreater(len(shards), 2)
        self.assertEqual(shards, [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])
        from safetensors import safe_open
        total = 0
        for name in shards:
            with safe_open(str(final / name), "pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            self.assertEqual({index["weight_map"][k] for k in tensors}, {name}, "the index names each shard's tensors")
            self.assertEqual({str(t.dtype) for t in tensors.values()}, {"torch.bfloat16"})
            size = sum(t.numel() * t.element_size() for t in tensors.values())
            total += size
            # As save_pretrained: a shard stays within the limit unless one tensor alone is larger.
            self.assertTrue(size <= limit or len(tensors) == 1, f"{name}: {size} bytes in {len(tensors)} tensors")
        self.assertEqual(index["metadata"]["total_size"], total)
        self.check_causal(final, start, dtype="bfloat16")

    def test_dpo_final_untied(self):
        start = ptkref.tiny_qwen2(self.tmp / "start", self.tok, seed=3, tie=False)
        train = ptkref.write_jsonl(self.tmp / "pref.jsonl", PREF_ROWS)
        final = run_stage(self.tmp, "dpo", recipe(self.tmp / "dpo", start, train, 3, dpo={"eval_at_start": False}))
        self.assertFalse(json.loads((final / "config.json").read_text())["tie_word_embeddings"])
        self.check_causal(final, start)

    def test_grpo_final(self):
        start = ptkref.tiny_qwen2(self.tmp / "start", self.tok, seed=4, tie=True)
        train = ptkref.write_jsonl(self.tmp / "rl.jsonl", RL_ROWS)
        # A random model rarely earns a reward, and groups that all score 0 have no gradient: AdamW's
        # decoupled weight decay still moves the weights, so final/ differs from the start model.
        rec = recipe(self.tmp / "grpo", start, train, 2, weight_decay=0.5,
                     train={"micro_batch_size": 8},
                     grpo={"num_generations": 4, "max_completion_length": 8, "reward_funcs": ["math"],
                           "eval_at_start": False})
        final = run_stage(self.tmp, "grpo", rec)
        self.check_causal(final, start)

    def test_rm_final_scores(self):
        torch = self.torch
        start = ptkref.tiny_qwen2(self.tmp / "start", self.tok, seed=5, tie=True)
        train = ptkref.write_jsonl(self.tmp / "pref.jsonl", PREF_ROWS)
        final = run_stage(self.tmp, "rm", recipe(self.tmp / "rm", start, train, 3))
        cfg = json.loads((final / "config.json").read_text())
        self.assertEqual(cfg["architectures"], ["Qwen2ForSequenceClassification"])
        assert_same_config(self, final, start, skip=("architectures", "id2label", "label2id"))
        model = load_hf(final, "AutoModelForSequenceClassification")
        self.assertEqual(model.config.num_labels, 1)
        self.assertEqual(model.config.pad_token_id, cfg["pad_token_id"])
        self.transformers.AutoTokenizer.from_pretrained(str(final))
        ids, mask = batch(self.tok)
        # Two more rows that end in <|endoftext|> as a real token: Qwen2.5 base's EOS is its pad token, and
        # TRL's RewardTrainer appends the EOS to plain-text replies. transformers scores the last token that
        # is not pad_token_id, i.e. the one before that EOS (and ptk's RM training pools there too).
        pad = cfg["pad_token_id"]
        for row in ids[:2]:
            real = [t for t in row if t != pad]
            ids.append(real + [pad] + [pad] * (len(row) - len(real) - 1) if len(real) < len(row) else real[:-1] + [pad])
            mask.append([1] * (len(real) + 1) + [0] * (len(row) - len(real) - 1) if len(real) < len(row) else [1] * len(row))
        ours = ptk_forward(self.tmp, final, ids, mask, "rm")["scores"]
        with torch.no_grad():
            # transformers scores the last token that is not pad_token_id: the last real token either way.
            theirs = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                           position_ids=(torch.tensor(mask).cumsum(-1) - 1).clamp(min=0)).logits[:, 0]
        ptkref.assert_close("rm final/ scores", ours, theirs, **TOL)
        self.assertGreater(theirs.abs().max().item(), 1e-4, "the score head was written")


class TransformersFoldersLoadInPtk(_Base):
    def compare(self, folder, dtype="float32"):
        torch = self.torch
        self.assertEqual(json.loads((folder / "config.json").read_text()).get("dtype"), dtype)
        theirs_model = load_hf(folder, dtype="float32")  # bf16 weights upcast exactly
        ids, mask = batch(self.tok)
        ours = ptk_forward(self.tmp, folder, ids, mask, folder.name)["logits"]
        theirs = hf_logits(theirs_model, ids, mask)
        ptkref.assert_close(f"{folder.name} logits", masked(ours, mask), masked(theirs, mask), **TOL)
        if dtype == "bfloat16":
            # Both computing in bf16: each side's error against the fp32 result on the same weights is
            # bf16 rounding (~2^-8 relative per op); ptk's must be of transformers' size, not beyond it
            # (a wrong formula would be off by the logits' own size).
            bf = load_hf(folder, dtype="bfloat16")
            exact = masked(hf_logits(theirs_model, ids, mask), mask)
            ours = masked(ptk_forward(self.tmp, folder, ids, mask, f"{folder.name}bf", "bfloat16")["logits"], mask)
            theirs = masked(hf_logits(bf, ids, mask).float(), mask)
            err_ours, err_theirs = (ours - exact).abs().max().item(), (theirs - exact).abs().max().item()
            scale = exact.abs().max().item()
            print(f"{folder.name}: bf16 max |error| vs fp32: ptk {err_ours:.3g}, transformers {err_theirs:.3g}, "
                  f"max |logit| {scale:.3g}")
            self.assertLess(err_ours, max(2 * err_theirs, 1e-3 * scale),
                            f"ptk bf16 off the fp32 logits by {err_ours:.3g}, transformers bf16 by {err_theirs:.3g}")
            self.assertLess(err_ours, 0.05 * scale)

    def test_sharded_and_single_file_fp32_and_bf16_tied_and_untied(self):
        for tie in (True, False):
            for dtype in ("float32", "bfloat16"):
                for shard in (None, "20KB"):
                    name = f"{'tied' if tie else 'untied'}_{dtype}_{'sharded' if shard else 'single'}"
                    with self.subTest(folder=name):
                        folder = ptkref.tiny_qwen2(self.tmp / name, self.tok, seed=11, tie=tie, dtype=dtype,
                                                   max_shard_size=shard)
                        index = folder / "model.safetensors.index.json"
                        self.assertEqual(index.exists(), bool(shard))
                        if shard:
                            files = set(json.loads(index.read_text())["weight_map"].values())
                            self.assertGreater(len(files), 2, "several shards")
                            keys = json.loads(index.read_text())["weight_map"]
                            self.assertEqual("lm_head.weight" in keys, not tie)
                        self.compare(folder, dtype)

    def test_yarn_rope_both_spellings(self):
        """Qwen2.5's long-context setting (rope_scaling yarn, factor 4): transformers 5 writes it as
        rope_parameters, 4.x folders as rope_scaling beside a top-level rope_theta; transformers 5.25
        reads both, and so must ptk, with the same frequencies and attention factor."""
        torch = self.torch
        from transformers import Qwen2Config, Qwen2ForCausalLM
        n_tok = ptkref.tokenizer_size(self.tok)
        yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
        cfg = Qwen2Config(vocab_size=n_tok, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                          rms_norm_eps=1e-6, tie_word_embeddings=True, initializer_range=0.2,
                          rope_parameters={"rope_theta": 10000.0, **yarn})  # 0.2: sharper attention than 0.02
        torch.manual_seed(31)
        model = Qwen2ForCausalLM(cfg).eval()
        v5 = self.tmp / "yarn_v5"
        model.save_pretrained(str(v5))
        self.assertEqual(json.loads((v5 / "config.json").read_text())["rope_parameters"]["rope_type"], "yarn")
        v4 = self.tmp / "yarn_v4"
        shutil.copytree(v5, v4)
        c = json.loads((v4 / "config.json").read_text())
        del c["rope_parameters"]
        c["rope_theta"] = 10000.0
        c["rope_scaling"] = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
        ptkref.write_json(v4 / "config.json", c)
        # 40 tokens: past original_max_position_embeddings, where YaRN's interpolation matters most.
        ids = [[(7 * i + 3) % n_tok for i in range(40)], [(11 * i + 5) % n_tok for i in range(40)]]
        mask = [[1] * 40, [0] * 9 + [1] * 31]
        plain = None
        for folder in (v5, v4):
            hf = load_hf(folder)
            self.assertEqual(hf.config.rope_parameters["rope_type"], "yarn")
            theirs = hf_logits(hf, ids, mask)
            ours = ptk_forward(self.tmp, folder, ids, mask, folder.name)["logits"]
            ptkref.assert_close(f"{folder.name} logits", masked(ours, mask), masked(theirs, mask), **TOL)
            if plain is None:
                cfg_plain = Qwen2Config(**{**cfg.to_dict(), "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}})
                m = Qwen2ForCausalLM(cfg_plain).eval()
                m.load_state_dict(model.state_dict())
                plain = hf_logits(m, ids, mask)
                self.assertGreater((masked(plain, mask) - masked(theirs, mask)).abs().max().item(), 1e-3,
                                   "YaRN changes the logits (else the test shows nothing)")


class GreedyGenerateMatchesTransformers(_Base):
    def test_ptk_generate_ids_equal_hf_generate_on_sft_final(self):
        torch = self.torch
        start = ptkref.tiny_qwen2(self.tmp / "start", self.tok, seed=6, tie=True)
        # Short replies the model learns to end with <|im_end|> within a few dozen steps.
        rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                for q, a in [("What is 12 + 30?", "42"), ("Paris?", "France"), ("hi", "Hello!"),
                             ("Write a short poem about the sea.", "The sea is wide, the sea is deep.")]]
        train = ptkref.write_jsonl(self.tmp / "sft.jsonl", rows)
        final = run_stage(self.tmp, "sft", recipe(self.tmp / "sft", start, train, 40, lr=1e-2))
        prompts = [[{"role": "user", "content": "What is 12 + 30?"}],
                   [{"role": "user", "content": "hi"}],
                   [{"role": "system", "content": "You add numbers."}, {"role": "user", "content": "Paris?"}],
                   [{"role": "user", "content": "用一句话介绍你自己。 The quick brown fox jumps over the lazy dog."}],
                   [{"role": "user", "content": "Write"}]]
        max_new = 16
        ours = ptk_generate_greedy(self.tmp, final, prompts, max_new)

        tok = self.transformers.AutoTokenizer.from_pretrained(str(final), padding_side="left")
        model = load_hf(final)
        eos = model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        self.assertIn(tok.convert_tokens_to_ids("<|im_end|>"), eos, "final/'s generation_config stops at <|im_end|>")
        enc = tok.apply_chat_template(prompts, add_generation_prompt=True, tokenize=True, return_dict=True,
                                      padding=True, return_tensors="pt")
        self.assertGreater(len(set(enc["attention_mask"].sum(-1).tolist())), 2, "prompts of different lengths")
        with torch.no_grad():
            gen = model.generate(**enc, do_sample=False, max_new_tokens=max_new, pad_token_id=tok.pad_token_id,
                                 output_scores=True, return_dict_in_generate=True)
        new = gen.sequences[:, enc["input_ids"].shape[1]:].tolist()
        reasons = set()
        for i, (row, line) in enumerate(zip(new, ours)):
            stop = next((k for k, t in enumerate(row) if t in eos), None)
            theirs = row[:stop + 1] if stop is not None else row
            reasons.add("stop" if stop is not None else "length")
            # Greedy ids can differ only where two logits tie within float error: check the margins.
            for k in range(len(theirs)):
                top2 = gen.scores[k][i].topk(2).values
                self.assertGreater((top2[0] - top2[1]).item(), 1e-4, f"prompt {i}, token {k}: a near tie")
            self.assertEqual(line["ids"], theirs, f"prompt {i}")
            self.assertEqual(line["finish_reason"], "stop" if stop is not None else "length")
            self.assertEqual(line["text"], tok.decode(theirs, skip_special_tokens=True))
        self.assertEqual(reasons, {"stop", "length"}, "some prompts end at <|im_end|>, some at max_new_tokens")

    def test_padded_vocabulary_rows_are_never_generated(self):
        """Qwen2.5's embedding has 151,936 rows for 151,665 tokens; `ptk generate` never picks a row past
        the tokenizer's vocabulary, which transformers' generate does unless told (suppress_tokens). With
        those rows suppressed on the HF side, greedy ids are equal; without, a random model here picks
        padding rows, which decode to nothing (1,024 padding rows here, so a random model does)."""
        torch = self.torch
        n_tok = ptkref.tokenizer_size(self.tok)
        model_dir = ptkref.tiny_qwen2(self.tmp / "padded", self.tok, seed=21, tie=False, vocab_size=n_tok + 1024)
        prompts = [[{"role": "user", "content": "What is 12 + 30?"}], [{"role": "user", "content": "hi"}],
                   [{"role": "user", "content": "Paris is the capital of France; Berlin is the capital of"}]]
        max_new = 16
        ours = [line["ids"] for line in ptk_generate_greedy(self.tmp, model_dir, prompts, max_new)]
        tok = self.transformers.AutoTokenizer.from_pretrained(str(model_dir), padding_side="left")
        model = load_hf(model_dir)
        enc = tok.apply_chat_template(prompts, add_generation_prompt=True, tokenize=True, return_dict=True,
                                      padding=True, return_tensors="pt")
        eos = {model.generation_config.eos_token_id}

        def hf(**kw):
            with torch.no_grad():
                g = model.generate(**enc, do_sample=False, max_new_tokens=max_new, pad_token_id=tok.pad_token_id,
                                   output_scores=True, return_dict_in_generate=True, **kw)
            rows = []
            for i, row in enumerate(g.sequences[:, enc["input_ids"].shape[1]:].tolist()):
                stop = next((k for k, t in enumerate(row) if t in eos), None)
                row = row[:stop + 1] if stop is not None else row
                for k in range(len(row)):
                    top2 = g.scores[k][i].topk(2).values
                    self.assertGreater((top2[0] - top2[1]).item(), 1e-4, f"prompt {i}, token {k}: a near tie")
                rows.append(row)
            return rows

        self.assertEqual(ours, hf(suppress_tokens=list(range(n_tok, n_tok + 1024))))
        self.assertTrue(all(t < n_tok for r in ours for t in r))
        unrestricted = hf()
        self.assertTrue(any(t >= n_tok for r in unrestricted for t in r),
                        "this random model picks padding rows when nothing stops it (else the test shows nothing)")


if __name__ == "__main__":
    ptkref.main()
