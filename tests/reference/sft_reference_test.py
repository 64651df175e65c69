"""`ptk sft` against TRL's SFTTrainer (trl 1.16.0, transformers 5.25.0) on the harness's tiny Qwen2, fp32
on the CPU, one thread: the same prompt/completion records, the same rows in the same order, the same
AdamW, LR schedule and clipping; then per optimizer step the logged loss, mean_token_accuracy, entropy,
num_tokens, grad_norm and learning_rate, and the weights after the last step.

  SftAgainstTrl
  - unpacked: conversational prompt/completion records (completion-only loss, TRL's default for the
    format), one record a row padded to the micro-batch's longest, micro-batch 2 x grad_accum 2, five
    steps of a linear schedule with one warmup step (step 1 runs at lr 0, as with transformers'
    get_linear_schedule_with_warmup), weight decay 0.3, clipping at 1.0 acting;
  - packed: plain prompt/completion records (TRL appends EOS to the completion), TRL packing=True
    (best-fit decreasing, padding-free with position_ids) against ptk data.packing=true, constant LR;
  - short last micro-batch of an epoch: ptk fills it from the epoch's start, TRL's is short (pinned).
  PreparedRowsAgainstTrl (no training)
  - completion masks at awkward prompt/completion boundaries and with multi-turn completions, and
    records truncation leaves without a target (dropped by both, unpacked);
  - plain prompt/completion whose text merges across the boundary: ptk tokenizes prompt and completion
    apart, TRL as one text (a pinned, documented difference);
  - packing with rows of equal room (tie-breaking);
  - "messages" records: ptk's loss on assistant turns against TRL's default loss on every token
    (a pinned, documented difference: docs/DESIGN.md's data formats).

Aligning the two sides:
  - The rows. Before any number is compared, ptk's prepared folder (token ids, loss mask, packed rows;
    datasets/shards.h) is read back and must equal TRL's prepared dataset (input_ids, labels, bins), so
    tokenization, completion mask and packing are checked exactly, not inferred from losses.
  - Data order. ptk walks its rows in a keyed permutation of run.seed (datasets/loader.cpp; no switch
    turns it off); TRL's Trainer runs sequentially with train_sampling_strategy="sequential" over its
    prepared dataset, reordered here with ptk's permutation (ptkref.ptk_row_order, a port of the loader's).
    A wrong port shows at once: num_tokens and the loss of step 1 differ.
  - AdamW: TRL's optim="adamw_torch" is torch.optim.AdamW (single-tensor on the CPU), whose arithmetic
    ptk's AdamW reproduces; transformers' get_decay_parameter_names leaves out biases and every
    *norm.weight (layernorm / rmsnorm / norm patterns), as ptk's is_no_decay does; the tied embedding
    is decayed on both sides.
  - Clipping: both clip to max_norm / (norm + 1e-6) when that is < 1 and log the norm before clipping.
  - Loss normalisation under gradient accumulation: both divide each micro-batch's summed NLL by N, the
    targets (shifted labels != -100) of all micro-batches of the optimizer step (transformers'
    _get_num_items_in_batch counts labels[..., 1:]); the logged loss is the sum of the micro-batch
    losses = the token mean over the step. That is the right objective: every target token of the
    step weighs the same, whatever micro-batch it landed in, so grad_accum does not change the
    gradient (a per-micro-batch mean divided by grad_accum would).
"""
import json
import math
import unittest
from pathlib import Path

import ptkref


def read_ptk_prepared(folder):
    """ptk's prepared sft folder (datasets/shards.h): per document its ids and loss mask, and the packed
    rows (lists of document ids) or None when unpacked."""
    import numpy as np
    folder = Path(folder)
    entry = np.dtype([("offset", "<u8"), ("meta_offset", "<u8"), ("shard", "<u4"), ("length", "<u4"),
                      ("seg_a", "<u4"), ("seg_b", "<u4"), ("meta_len", "<u4"), ("source", "<u4"),
                      ("line", "<u4"), ("reserved", "<u4")])
    docs = np.fromfile(folder / "docs.idx", dtype=entry)
    out = []
    for d in docs:
        shard = int(d["shard"])
        tokens = np.memmap(folder / f"tokens-{shard:05d}.u32", dtype="<u4", mode="r")
        mask = np.memmap(folder / f"mask-{shard:05d}.u8", dtype="u1", mode="r")
        a, n = int(d["offset"]), int(d["length"])
        out.append((tokens[a:a + n].tolist(), mask[a:a + n].tolist()))
    rows = None
    if (folder / "rows.idx").exists():
        offsets = np.fromfile(folder / "rows.idx", dtype="<u8")
        ids = np.fromfile(folder / "rows.docs", dtype="<u4")
        rows = [ids[offsets[i]:offsets[i + 1]].tolist() for i in range(len(offsets) - 1)]
    return out, rows


# Words from the harness tokenizer's corpus, so BPE merges (and their boundaries) matter.
WORDS = ("the quick brown fox jumps over lazy dog answer is capital of France Germany Paris Berlin plan "
         "first read question then sentence short poem about sea wide deep helpful assistant").split()


def sentence(i, n):
    return " ".join(WORDS[(i * 7 + 3 * j) % len(WORDS)] for j in range(n))


def chat_records(count):
    """Conversational prompt/completion records of varied lengths (some with a system turn), so that
    micro-batches hold different numbers of completion tokens and padding."""
    out = []
    for i in range(count):
        a, b = 3 + 7 * i, 11 + 5 * i
        prompt = [{"role": "user", "content": f"What is {a} + {b}? {sentence(i, i % 4)}".strip()}]
        if i % 3 == 0:
            prompt.insert(0, {"role": "system", "content": "You are a helpful assistant."})
        reply = f"The answer is {a + b}." + (" " + sentence(i + 1, 2 + (i * 5) % 9) if i % 2 else "")
        out.append({"prompt": prompt, "completion": [{"role": "assistant", "content": reply}]})
    return out


def plain_records(count):
    """Plain prompt/completion records of 16-37 tokens (with TRL's EOS), two to three a packed row of 64."""
    out = []
    for i in range(count):
        prompt = f"Question {i}: {sentence(i, (i * 3) % 4)}?"
        completion = f" The answer is {sentence(i + 2, (i * 5) % 7)}."
        out.append({"prompt": prompt, "completion": completion})
    return out


def sft_trainer(tmp, model_dir, records, **config):
    """TRL's SFTTrainer on the records, fp32 on the CPU, sequential sampler (ptk's order is applied to
    its prepared rows by the caller), torch.optim.AdamW, no checkpoints."""
    torch = ptkref.need("torch")
    transformers = ptkref.need("transformers")
    datasets = ptkref.need("datasets")
    trl = ptkref.need("trl")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    args = trl.SFTConfig(output_dir=str(tmp / "trl"), report_to=[], save_strategy="no", logging_steps=1,
                         use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
                         dataloader_num_workers=0, disable_tqdm=True, train_sampling_strategy="sequential",
                         shuffle_dataset=False, optim="adamw_torch", **config)
    return trl.SFTTrainer(model=model, args=args, processing_class=tokenizer,
                          train_dataset=datasets.Dataset.from_list(records))


def assert_same_rows(tc, prepared, ptk_prepared_dir, packing):
    """TRL's prepared dataset and ptk's prepared folder hold the same rows: token ids, the loss mask
    (TRL label != -100 <=> ptk mask 1) and, packed, the same documents in each row."""
    docs, rows = read_ptk_prepared(ptk_prepared_dir)
    if packing:
        tc.assertIsNotNone(rows, "ptk's prepared folder is not packed")
        ptk_ids = [[t for d in r for t in docs[d][0]] for r in rows]
        ptk_labels = [[t if m else -100 for d in r for t, m in zip(*docs[d])] for r in rows]
        tc.assertEqual([list(x) for x in prepared["seq_lengths"]], [[len(docs[d][0]) for d in r] for r in rows],
                         "TRL's bfd and ptk's packer made other rows")
    else:
        tc.assertIsNone(rows)
        ptk_ids = [d[0] for d in docs]
        ptk_labels = [[t if m else -100 for t, m in zip(*d)] for d in docs]
    tc.assertEqual([list(x) for x in prepared["input_ids"]], ptk_ids, "token ids of the prepared rows")
    tc.assertEqual([list(x) for x in prepared["labels"]], ptk_labels, "loss masks of the prepared rows")
    return len(ptk_ids)


class SftAgainstTrl(ptkref.TempDirTestCase):
    SEED = 1234
    MICRO_BATCH = 2
    GRAD_ACCUM = 2

    def make_model(self):
        tok = ptkref.tiny_tokenizer(self.tmp / "tok")
        return ptkref.tiny_qwen2(self.tmp / "model", tok, seed=5)

    def run_ptk(self, model_dir, data_file, hp):
        recipe = {
            "run": {"dir": str(self.tmp / "ptk"), "seed": self.SEED, "threads": 1},
            "model": {"path": str(model_dir)},
            "data": {"train": [str(data_file)], "max_seq_len": hp["max_seq_len"], "packing": hp["packing"]},
            "train": {"epochs": 1, "micro_batch_size": self.MICRO_BATCH, "grad_accum": self.GRAD_ACCUM,
                      "log_every": 1},
            "optim": {"lr": hp["lr"], "min_lr": 0.0, "schedule": hp["schedule"], "warmup_steps": hp["warmup"],
                      "weight_decay": hp["weight_decay"], "betas": list(hp["betas"]), "eps": 1e-8,
                      "clip_grad_norm": hp["clip"]},
        }
        ptkref.write_json(self.tmp / "sft.json", recipe)
        ptkref.ptk("sft", "--threads", 1, "--recipe", self.tmp / "sft.json")
        return self.tmp / "ptk"

    def run_trl(self, model_dir, records, ptk_dir, hp):
        """TRL on the same rows as ptk (checked), in ptk's order; returns (per-step logs, model)."""
        trainer = sft_trainer(
            self.tmp, model_dir, records, seed=self.SEED, per_device_train_batch_size=self.MICRO_BATCH,
            gradient_accumulation_steps=self.GRAD_ACCUM, num_train_epochs=1, max_length=hp["max_seq_len"],
            packing=hp["packing"], learning_rate=hp["lr"], lr_scheduler_type=hp["schedule"],
            warmup_steps=hp["warmup"], weight_decay=hp["weight_decay"], adam_beta1=hp["betas"][0],
            adam_beta2=hp["betas"][1], adam_epsilon=1e-8, max_grad_norm=hp["clip"])
        self.assertTrue(trainer.completion_only_loss, "prompt/completion data: completion-only loss")
        rows = assert_same_rows(self, trainer.train_dataset, ptk_dir / "data" / "train", hp["packing"])
        # ptk fills an epoch's last micro-batch from the epoch's start (as torch's DistributedSampler
        # pads); TRL's last micro-batch is short. An even row count keeps the two on the same rows.
        self.assertEqual(rows % self.MICRO_BATCH, 0, "the data must fill every micro-batch")
        trainer.train_dataset = trainer.train_dataset.select(ptkref.ptk_row_order(rows, self.SEED))
        trainer.train()
        logs = [h for h in trainer.state.log_history if "loss" in h and "step" in h]
        return logs, trainer.model, rows

    def compare(self, ptk_dir, logs, model, steps, hp):
        from safetensors.torch import load_file
        ours = [m for m in ptkref.metrics(ptk_dir) if "step" in m]
        self.assertEqual([m["step"] for m in ours], list(range(1, steps + 1)))
        self.assertEqual([h["step"] for h in logs], list(range(1, steps + 1)))
        # Token counts are exact (TRL: attention_mask ones, padding-free: the flattened length; both
        # running totals): a different row order or padding count shows here first.
        self.assertEqual([int(m["num_tokens"]) for m in ours], [int(h["num_tokens"]) for h in logs], "num_tokens")
        # Losses and metrics: fp32 forward/backward of the same rows on both sides, summed in another
        # order (ptk's fused lm_head op and attention kernel, TRL's chunked lm head and SDPA); measured
        # differences are ~1e-7 relative, 1e-5 leaves room for other BLAS builds. A loss normalised
        # per micro-batch (mean, then / grad_accum: transformers without num_items_in_batch) differs
        # by 5e-4..2.5e-3 relative at steps 1, 3 and 5 of the unpacked test (measured with TRL's
        # model_accepts_loss_kwargs=False). grad_norm is the norm before clipping on both sides.
        for key in ("loss", "mean_token_accuracy", "entropy", "grad_norm"):
            ptkref.assert_close(key, [m[key] for m in ours], [h[key] for h in logs], rtol=1e-5, atol=1e-7)
        # The LR of each step (transformers logs the scheduler's value before stepping it).
        ptkref.assert_close("learning_rate", [m["learning_rate"] for m in ours], [h["learning_rate"] for h in logs],
                            rtol=1e-12, atol=0)
        # The clipping must have acted for the comparison of weights to cover it.
        self.assertTrue(any(h["grad_norm"] > hp["clip"] for h in logs), f"no step's grad_norm exceeds {hp['clip']}")
        # Weights after the last step. Nearly all agree to ~1e-7 (here at most 1.8e-6 and 2.9e-6, two
        # of 31,616 weights above 2e-6). Adam divides each update by sqrt(v), so a coordinate whose
        # gradient is tiny (near its rounding error) gets a step of up to ~lr whose size and sign follow
        # the rounding: on another data set a few dozen weights of the MLPs and k_proj biases differed
        # by up to 3.5e-5 (of a 3e-3 step), and TRL against itself with 1e-7 relative noise on each
        # gradient moved such weights by 1e-4..5e-3. Hence two bounds: every weight within 5% of one
        # step at the peak LR, and 99% of them within 2e-6. A systematic error
        # breaks one of them: decay on the norm weights (~1.0) moves them by sum(lr) * wd >= 1.2e-3;
        # no decay, another clip coefficient or loss scale moves most weights by more than 2e-6.
        theirs = {k: v.detach() for k, v in model.state_dict().items()}
        weights = load_file(str(ptk_dir / "final" / "model.safetensors"))
        start = load_file(str(self.tmp / "model" / "model.safetensors"))
        self.assertGreater(len(weights), 0)
        total = loose = 0
        for name, w in sorted(weights.items()):
            self.assertIn(name, theirs)
            ptkref.assert_close(f"weight {name}", w, theirs[name], rtol=0, atol=0.05 * hp["lr"])
            loose += int(((w - theirs[name]).abs() > 2e-6).sum())
            total += w.numel()
            # The weights moved (a trivially equal comparison proves nothing).
            self.assertGreater(float((w - start[name]).abs().max()), 0.5 * hp["lr"], f"{name} did not move")
        self.assertLessEqual(loose, 0.01 * total, f"{loose} of {total} weights differ by more than 2e-6")
        return ours

    def test_prompt_completion_unpacked_grad_accum(self):
        """Conversational prompt/completion, one record a row, micro-batch 2 x grad_accum 2, five steps of
        a linear schedule with one warmup step, weight decay, clipping."""
        ptkref.need("trl")
        model_dir = self.make_model()
        records = chat_records(20)  # 20 rows = 5 steps of 2 x 2, one epoch
        data = ptkref.write_jsonl(self.tmp / "train.jsonl", records)
        hp = dict(packing=False, max_seq_len=128, lr=5e-3, schedule="linear", warmup=1, weight_decay=0.3,
                  betas=(0.9, 0.95), clip=1.0)
        ptk_dir = self.run_ptk(model_dir, data, hp)
        logs, model, _ = self.run_trl(model_dir, records, ptk_dir, hp)
        ours = self.compare(ptk_dir, logs, model, 5, hp)
        # Warmup semantics (transformers' get_linear_schedule_with_warmup, stepped after each optimizer
        # step): step 1 at lr 0, then linear decay to 0 at step 6.
        ptkref.assert_close("lr schedule", [m["lr"] for m in ours], [0.0, 5e-3, 3.75e-3, 2.5e-3, 1.25e-3],
                            rtol=1e-12, atol=0)

    def test_prompt_completion_packed(self):
        """Plain prompt/completion, TRL packing=True (bfd, padding-free) against ptk data.packing=true."""
        ptkref.need("trl")
        model_dir = self.make_model()
        records = plain_records(32)
        data = ptkref.write_jsonl(self.tmp / "train.jsonl", records)
        hp = dict(packing=True, max_seq_len=64, lr=3e-3, schedule="constant", warmup=0, weight_decay=0.1,
                  betas=(0.9, 0.999), clip=1.0)
        ptk_dir = self.run_ptk(model_dir, data, hp)
        logs, model, rows = self.run_trl(model_dir, records, ptk_dir, hp)
        docs, packed = read_ptk_prepared(ptk_dir / "data" / "train")
        self.assertGreaterEqual(max(len(r) for r in packed), 3, "rows hold several documents")
        steps = math.ceil(rows / (self.MICRO_BATCH * self.GRAD_ACCUM))
        self.assertGreaterEqual(steps, 3)
        self.compare(ptk_dir, logs, model, steps, hp)

    def test_short_last_micro_batch(self):
        """Pinned difference: with rows not filling the epoch's last micro-batch, ptk fills it from the
        start of the epoch's order (as torch's DistributedSampler pads, so every rank takes the same
        number of micro-batches); TRL's last micro-batch (one process) is short. 3 rows, micro-batch 2,
        grad_accum 2: one step over 4 rows in ptk, 3 in TRL."""
        ptkref.need("trl")
        model_dir = self.make_model()
        records = chat_records(3)
        data = ptkref.write_jsonl(self.tmp / "train.jsonl", records)
        hp = dict(packing=False, max_seq_len=128, lr=1e-3, schedule="constant", warmup=0, weight_decay=0.0,
                  betas=(0.9, 0.999), clip=1.0)
        ptk_dir = self.run_ptk(model_dir, data, hp)
        trainer = sft_trainer(self.tmp, model_dir, records, seed=self.SEED, per_device_train_batch_size=2,
                              gradient_accumulation_steps=2, num_train_epochs=1, max_length=128)
        rows = assert_same_rows(self, trainer.train_dataset, ptk_dir / "data" / "train", False)
        order = ptkref.ptk_row_order(rows, self.SEED)
        trainer.train_dataset = trainer.train_dataset.select(order)
        trainer.train()
        logs = [h for h in trainer.state.log_history if "loss" in h and "step" in h]
        ours = [m for m in ptkref.metrics(ptk_dir) if "step" in m]
        self.assertEqual((len(ours), len(logs)), (1, 1))
        lengths = [len(x) for x in trainer.train_dataset["input_ids"]]
        self.assertEqual(int(logs[0]["num_tokens"]), sum(lengths))
        self.assertEqual(int(ours[0]["num_tokens"]), sum(lengths) + lengths[0], "ptk repeats the epoch's first row")


class DefaultsAgainstTrl(ptkref.TempDirTestCase):
    def test_defaults_the_readme_names(self):
        """Pinned for README "Differences from TRL": the SFT defaults that differ (ptk: cosine, lr 1e-5,
        packing on; TRL: linear, 2e-5, off) and the chat-loss default (TRL trains every token unless
        assistant_only_loss). Read from `ptk sft --help` and TRL's SFTConfig: either side changing one
        fails here, and the README follows."""
        trl = ptkref.need("trl")
        cfg = trl.SFTConfig(output_dir=str(self.tmp / "defaults"), use_cpu=True, report_to="none")
        self.assertEqual((cfg.learning_rate, str(cfg.lr_scheduler_type.value), cfg.packing, cfg.assistant_only_loss),
                         (2e-5, "linear", False, False))
        help_text = ptkref.ptk("sft", "--help").stdout
        for line in ("optim.lr                    (float, default 1e-05)",
                     'optim.schedule              (constant|linear|cosine, default "cosine")',
                     "data.packing                (bool, default true)"):
            self.assertIn(line, help_text)


class PreparedRowsAgainstTrl(ptkref.TempDirTestCase):
    """What each side trains on, without training: ptk's prepared folders against TRL's preparation."""

    def test_completion_masks(self):
        """Completion masks at awkward prompt/completion boundaries and with multi-turn completions; a
        record that truncation leaves without a target is dropped (unpacked)."""
        ptkref.need("trl")
        tok = ptkref.tiny_tokenizer(self.tmp / "tok")
        model_dir = ptkref.tiny_qwen2(self.tmp / "model", tok, seed=5)
        chat = [
            {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "yo"}]},
            {"prompt": [{"role": "system", "content": "Be short."}, {"role": "user", "content": "Paris?"},
                        {"role": "assistant", "content": "France."}, {"role": "user", "content": "Berlin?"}],
             "completion": [{"role": "assistant", "content": "Germany."}]},
            # A completion holding a user turn: TRL's completion_mask covers it too.
            {"prompt": [{"role": "user", "content": "a"}],
             "completion": [{"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
                            {"role": "assistant", "content": "\nd"}]},
        ]
        plain = [{"prompt": "Answer: ", "completion": "yes"}, {"prompt": "Hel", "completion": "lo world"},
                 {"prompt": "What is 2+3?", "completion": " 5"}, {"prompt": "x\n", "completion": "\nThe answer"},
                 {"prompt": "a  ", "completion": " b"}, {"prompt": "The quick brown", "completion": " fox"},
                 # Longer than max_length: the cut leaves no target, and both drop the record.
                 {"prompt": "The quick brown fox jumps over the lazy dog. " * 20, "completion": " Yes."},
                 {"prompt": "Paris?", "completion": " France."}]
        for name, records in (("chat", chat), ("plain", plain)):
            with self.subTest(name):
                data = ptkref.write_jsonl(self.tmp / f"{name}.jsonl", records)
                ptkref.ptk("prepare", "--threads", 1, "--tokenizer", model_dir, "--input", data,
                           "--output", self.tmp / f"prep-{name}", "--no-packing", "--max-seq-len", 128)
                trainer = sft_trainer(self.tmp, model_dir, records, max_length=128)
                assert_same_rows(self, trainer.train_dataset, self.tmp / f"prep-{name}", False)

    def test_boundary_merge_tokenized_apart(self):
        """Pinned difference: a plain prompt/completion record whose text merges across the boundary as one
        text ("the ans" + "wer" is 'the' 'Ġanswer' with the harness tokenizer; Qwen2.5 makes '.M'|'aking' of
        "Describe it." + "Making"). TRL tokenizes prompt + completion as one text and starts the loss where
        that leaves the prompt's own ids (common_prefix_length), so it trains 'Ġanswer' after 'the': ids the
        model never sees at generation, and prompt text ("ans") in the target. ptk tokenizes the prompt and
        the completion apart, as generation does: 'the' 'Ġans' | 'wer' EOS, the loss on exactly the
        completion. Records without such a merge are the same on both sides."""
        ptkref.need("trl")
        tok = ptkref.tiny_tokenizer(self.tmp / "tok")
        model_dir = ptkref.tiny_qwen2(self.tmp / "model", tok, seed=5)
        records = [{"prompt": "the ans", "completion": "wer"}, {"prompt": "What is 2+3?", "completion": " 5"},
                   {"prompt": "The quick brown fox jumps over the lazy dog. The ans", "completion": "wer is Paris."}]
        data = ptkref.write_jsonl(self.tmp / "merge.jsonl", records)
        out = ptkref.ptk("prepare", "--threads", 1, "--tokenizer", model_dir, "--input", data,
                         "--output", self.tmp / "prep", "--no-packing", "--max-seq-len", 128)
        self.assertIn("2 boundary merges avoided (prompt and completion tokenized apart)", out.stdout)
        docs, _ = read_ptk_prepared(self.tmp / "prep")
        trainer = sft_trainer(self.tmp, model_dir, records, max_length=128)
        hf = trainer.processing_class
        enc = lambda text: hf(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        eos = hf.eos_token_id
        merged = 0
        for (ids, mask), row, rec in zip(docs, trainer.train_dataset, records):
            p, c = rec["prompt"], rec["completion"]
            apart, joint = enc(p) + enc(c), enc(p + c)
            # ptk: the prompt's ids, then the completion's, the loss on the completion and the EOS.
            self.assertEqual(ids, apart + [eos])
            self.assertEqual(mask, [0] * len(enc(p)) + [1] * (len(enc(c)) + 1))
            self.assertEqual(hf.decode([t for t, m in zip(ids, mask) if m]), c + hf.eos_token)
            # TRL: one text.
            self.assertEqual(list(row["input_ids"]), joint + [eos])
            if apart == joint:
                self.assertEqual(list(row["labels"]), [t if m else -100 for t, m in zip(ids, mask)])
                continue
            merged += 1
            self.assertNotEqual(list(row["input_ids"]), ids)
            trl_trained = hf.decode([t for t in row["labels"] if t != -100])
            self.assertTrue(trl_trained.endswith(c + hf.eos_token))
            self.assertNotEqual(trl_trained, c + hf.eos_token, "TRL's target starts inside the prompt")
        self.assertEqual(merged, 2, "the data must hold records that merge across the boundary")

    def test_messages_loss_on_assistant_turns_only(self):
        """Pinned difference: a "messages" record trains ptk on its assistant turns (content and
        <|im_end|>, what TRL's assistant_only_loss=True marks), TRL by default (assistant_only_loss=False)
        on every token, system and user turns included."""
        ptkref.need("trl")
        tok = ptkref.tiny_tokenizer(self.tmp / "tok")
        model_dir = ptkref.tiny_qwen2(self.tmp / "model", tok, seed=5)
        records = [{"messages": [{"role": "system", "content": "Be short."}, {"role": "user", "content": "Paris?"},
                                 {"role": "assistant", "content": "France."}, {"role": "user", "content": "Berlin?"},
                                 {"role": "assistant", "content": "Germany."}]},
                   {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
        data = ptkref.write_jsonl(self.tmp / "messages.jsonl", records)
        ptkref.ptk("prepare", "--threads", 1, "--tokenizer", model_dir, "--input", data, "--output", self.tmp / "prep",
                   "--no-packing", "--max-seq-len", 128)
        docs, _ = read_ptk_prepared(self.tmp / "prep")
        trainer = sft_trainer(self.tmp, model_dir, records, max_length=128)
        hf = trainer.processing_class
        for (ids, mask), row, rec in zip(docs, trainer.train_dataset, records):
            self.assertEqual(ids, list(row["input_ids"]))
            self.assertEqual(list(row["labels"]), ids, "TRL's default: loss on every token")
            # Assistant spans: from the render of the turns before (with the generation prompt) to that
            # plus the content and <|im_end|> (the template's "\n" after it is not an assistant token).
            want = [0] * len(ids)
            messages = rec["messages"]
            for k, m in enumerate(messages):
                if m["role"] == "assistant":
                    head = hf.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True)
                    a = len(hf(head, add_special_tokens=False)["input_ids"])
                    b = len(hf(head + m["content"] + "<|im_end|>", add_special_tokens=False)["input_ids"])
                    want[a:b] = [1] * (b - a)
            self.assertEqual(mask, want, "ptk: loss on the assistant turns only")
            self.assertLess(sum(mask), len(ids) - 1)

    def test_packing_ties(self):
        """Rows of equal room: the older one takes the document, as in TRL's bfd."""
        datasets = ptkref.need("datasets")
        data_utils = ptkref.need("trl.data_utils")
        tok = ptkref.tiny_tokenizer(self.tmp / "tok")
        # Digits are one token each (Qwen2's pre-tokenizer splits them), plus the EOS: these lengths make
        # several rows with equal room (see the by-hand case in tests/datasets/loader_test.cpp).
        lengths = [3, 5, 3, 5, 3, 5, 2, 2, 7, 6, 6, 4, 4]
        records = [{"text": "".join(str((i + k) % 10) for k in range(n - 1))} for i, n in enumerate(lengths)]
        data = ptkref.write_jsonl(self.tmp / "text.jsonl", records)
        ptkref.ptk("prepare", "--threads", 1, "--tokenizer", tok, "--input", data, "--output", self.tmp / "prep",
                   "--max-seq-len", 10)
        docs, rows = read_ptk_prepared(self.tmp / "prep")
        self.assertEqual([len(ids) for ids, _ in docs], lengths)
        packed = data_utils.pack_dataset(
            datasets.Dataset.from_dict({"input_ids": [ids for ids, _ in docs],
                                        "doc": [[i] * len(ids) for i, (ids, _) in enumerate(docs)]}), 10, "bfd")
        trl_rows = [list(dict.fromkeys(r)) for r in packed["doc"]]
        self.assertEqual(rows, trl_rows)


if __name__ == "__main__":
    ptkref.main()
