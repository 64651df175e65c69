"""`ptk rm` against TRL's RewardTrainer (trl 1.16.0) on the harness's tiny Qwen2, fp32 on CPU, one
thread: the same Qwen2ForSequenceClassification folder (made by transformers, seeded) is the model
both sides train, on the same preference pairs in the same order with the same hyper-parameters.
Compared: every step's loss, grad_norm, learning_rate, accuracy, margin, min/mean/max_reward, epoch
and num_tokens; an evaluation's metrics; the weights after the last step; and the scores of ptk's
final/ folder as transformers' Qwen2ForSequenceClassification reads them (the last non-pad token), as
`ptk forward` reads them, and as TRL's trained model gives them.

Aligning the two sides:
  - model: one seeded transformers Qwen2ForSequenceClassification folder (score head scaled so the
    rewards are O(1)) is model.path for ptk (which keeps a folder's score head) and the model for TRL;
  - order: ptk shuffles with its loader's keyed permutation (datasets/loader.cpp), mirrored here in
    `ptkref.ptk_row_order`; TRL gets the rows in that order and samples sequentially
    (train_sampling_strategy="sequential"); the steps stay inside the first epoch;
  - truncation: both drop a pair whose prompt + longer reply (EOS included) exceeds max_length; the
    data has one pair at exactly max_length (kept) and one a token over (dropped);
  - optimiser: AdamW (same betas, eps, weight decay; neither decays biases and norm weights),
    constant LR without warmup, the same clip norm, the micro-batch mean loss divided by grad_accum;
  - text data: TRL appends the tokenizer's EOS to each reply, ptk too; TRL tokenizes prompt + reply as
    one text, ptk the prompt and the reply apart, which gives the same ids for this data (asserted in
    test_text_bradley_terry_with_grad_accum); test_text_tokenization_differences_pinned pins where it
    does not, and a reply that already ends in EOS (TRL adds none, ptk a second).
"""
import json
import shutil
from pathlib import Path

import ptkref


def close(name, ours, theirs, rtol, atol):
    """ptkref.assert_close, and prints the largest |ptk - reference| (for the record, not checked)."""
    a, b = ptkref._flat(ours), ptkref._flat(theirs)
    if len(a) == len(b) and a:
        worst = max(abs(x - y) for x, y in zip(a, b))
        print(f"  {name}: max |diff| {worst:.3g} (max |reference| {max(abs(y) for y in b):.3g})")
    ptkref.assert_close(name, ours, theirs, rtol=rtol, atol=atol)


def make_reward_model(tmp, tok_dir, seed=5, score_scale=10.0, eos_token=None):
    """A tiny Qwen2ForSequenceClassification (num_labels 1) saved by transformers, with the tokenizer
    files; `eos_token` rewrites tokenizer_config.json's EOS (Qwen2.5 base checkpoints: <|endoftext|>,
    which is also their pad token). The score head is transformers' normal(0, 0.02) init times
    `score_scale`, so the rewards are O(1) rather than O(0.1)."""
    torch = ptkref.need("torch")
    transformers = ptkref.need("transformers")
    lm = ptkref.tiny_qwen2(tmp / "lm", tok_dir, seed=seed)
    torch.manual_seed(seed + 1)
    m = transformers.Qwen2ForSequenceClassification.from_pretrained(str(lm), num_labels=1, dtype=torch.float32)
    with torch.no_grad():
        m.score.weight.mul_(score_scale)
    out = tmp / "rm_init"
    m.save_pretrained(str(out))
    shutil.copy(tok_dir / "tokenizer.json", out / "tokenizer.json")
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    if eos_token:
        cfg["eos_token"] = eos_token
    ptkref.write_json(out / "tokenizer_config.json", cfg)
    return out


# Standard (text) pairs with an explicit prompt. Replies begin with a space or a newline and prompts
# end in punctuation or a newline, so prompt + reply tokenizes as prompt, then reply (asserted).
TEXT_PAIRS = [
    ("What is 12 + 30?", " The answer is 42.", " The answer is 43."),
    ("Name the capital of France.", " Paris is the capital of France.", " Berlin."),
    ("Write a short poem about the sea.\n", "The sea is wide, the sea is deep.", "The sea is dry."),
    ("Introduce yourself:", " You are Qwen, created by Alibaba Cloud.", " I am a fox."),
    ("def add(a, b):\n", "    return a + b\n", "    return a - b\n"),
    ("What is 3 + 4?", " 7", " The answer is 8, I think, but first read the question."),
    ("Making a plan?", " First read the question, then answer it in one sentence.", " No."),
    ("用一句话介绍你自己。", "我是一个乐于助人的助手。", "我是。"),
    ("Which dog is lazy?", " The quick brown fox jumps over the lazy dog.", " The fox."),
    ("Berlin is the capital of which country?", " Germany.", " France; Paris is."),
    ("What is 30 + 12?", " 42", " 24"),
    ("Is Zürich in France?", " No, it is not.", " Yes: Paris is in Zürich, the fox is quick."),
]


def conversation(prompt, reply):
    return [{"role": "user", "content": prompt}], [{"role": "assistant", "content": reply}]


class RewardTrainerReference(ptkref.TempDirTestCase):
    # ---- the two runs ----------------------------------------------------------------------------

    def run_ptk(self, model_dir, data_file, h):
        recipe = {
            "run": {"seed": h["seed"], "dir": str(self.tmp / "ptk_run"), "threads": 1},
            "model": {"path": str(model_dir)},
            "tokenizer": {"path": str(model_dir)},
            "data": {"train": [str(data_file)], "max_seq_len": h["max_length"],
                     "eval": [str(data_file)] if h.get("eval") else []},
            "train": {"max_steps": h["steps"], "micro_batch_size": h["batch"], "grad_accum": h["accum"],
                      "log_every": 1},
            "optim": {"lr": h["lr"], "schedule": "constant", "warmup_steps": 0, "weight_decay": h["weight_decay"],
                      "betas": list(h["betas"]), "eps": h["eps"], "clip_grad_norm": h["clip"]},
            "checkpoint": {"every": 0},
            "rm": {"center_rewards_coefficient": h.get("center") or 0.0, "eval_micro_batch_size": 64},
        }
        ptkref.write_json(self.tmp / "rm.json", recipe)
        ptkref.ptk("rm", "--recipe", self.tmp / "rm.json", "--threads", 1)
        run = self.tmp / "ptk_run"
        return [m for m in ptkref.metrics(run) if "step" in m and "loss" in m], run / "final"

    def run_trl(self, model_dir, rows, h):
        ptkref.need("torch")
        datasets = ptkref.need("datasets")
        trl = ptkref.need("trl")
        transformers = ptkref.need("transformers")
        tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
        args = trl.RewardConfig(
            output_dir=str(self.tmp / "trl_out"), seed=h["seed"], use_cpu=True, bf16=False, fp16=False,
            per_device_train_batch_size=h["batch"], gradient_accumulation_steps=h["accum"], max_steps=h["steps"],
            learning_rate=h["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=h["weight_decay"],
            adam_beta1=h["betas"][0], adam_beta2=h["betas"][1], adam_epsilon=h["eps"], optim="adamw_torch",
            max_grad_norm=h["clip"], max_length=h["max_length"], center_rewards_coefficient=h.get("center"),
            activation_checkpointing=False, train_sampling_strategy="sequential", dataloader_num_workers=0,
            logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, per_device_eval_batch_size=64)
        trainer = trl.RewardTrainer(model=str(model_dir), args=args, processing_class=tok,
                                    train_dataset=datasets.Dataset.from_list(rows))
        trainer.train()
        logs = [l for l in trainer.state.log_history if "loss" in l and "step" in l]
        if h.get("eval"):  # the training rows, in file order, in one batch after the last step
            logs[-1].update(trainer.evaluate(datasets.Dataset.from_list(h["eval"])))
        return trainer, logs

    # ---- comparisons ------------------------------------------------------------------------------

    def compare_steps(self, ours, theirs, steps):
        self.assertEqual(len(ours), steps, "ptk metrics.jsonl training lines")
        self.assertEqual(len(theirs), steps, "TRL log_history training entries")
        for s, (a, b) in enumerate(zip(ours, theirs), start=1):
            self.assertEqual(a["step"], s)
            # Scalars of one fp32 forward/backward on the same weights agree to ~1e-6 relative at step 1;
            # later steps add the fp32 rounding of a few AdamW updates (~1e-7 relative each). 1e-5 relative
            # (atol 1e-6 for values near 0) leaves room for that and for summation order, while a wrong
            # normalisation, margin sign, centering weight or pooled token is off by 1e-3 or more.
            for key in ("loss", "grad_norm", "mean_reward", "min_reward", "max_reward", "margin", "epoch"):
                close(f"step {s} {key}", a[key], b[key], rtol=1e-5, atol=1e-6)
            close(f"step {s} learning_rate", a["learning_rate"], b["learning_rate"], rtol=1e-12, atol=0)
            # Accuracy is a fraction k / pairs (TRL's a float32 mean): the same k unless a pair's two
            # rewards are within rounding of each other; 1e-6 tells every k apart.
            close(f"step {s} accuracy", a["accuracy"], b["accuracy"], rtol=0, atol=1e-6)
            # Tokens seen so far (attention-mask ones of chosen and rejected rows): exact.
            self.assertEqual(int(a["num_tokens"]), int(b["num_tokens"]), f"step {s} num_tokens")
        if "eval_loss" in theirs[-1]:
            # Evaluation after the last step, every pair in one batch on both sides (TRL averages its
            # per-batch metrics, ptk takes them over all pairs: the same with one batch).
            a, b = ours[-1], theirs[-1]
            for key in ("loss", "mean_reward", "min_reward", "max_reward", "margin", "accuracy"):
                close(f"eval {key}", a[f"eval/{key}"], b[f"eval_{key}"], rtol=1e-5, atol=1e-6)

    def compare_weights(self, final_dir, trl_model, h):
        from safetensors.torch import load_file
        ours = {}
        for f in sorted(Path(final_dir).glob("*.safetensors")):
            ours.update(load_file(str(f)))
        theirs = {k: v.detach() for k, v in trl_model.state_dict().items()}
        self.assertEqual(sorted(ours), sorted(theirs), "parameter names of ptk's final/ vs TRL's model")
        # Every weight agrees to ~1e-6 relative after the steps, except the k_proj biases: their gradient
        # is 0 in exact arithmetic (q·(k + b) shifts every key's logit for a query by the same q·b, which
        # softmax ignores), so what both sides compute is rounding noise, and AdamW turns noise into
        # updates of up to lr a step whatever its size. Those get atol lr * steps; the rest atol 1e-5 and
        # rtol 1e-4 (measured: <= 1.3e-6). In the text test a wrong weight-decay grouping would move norm
        # weights by lr * wd * steps = 9e-4; a wrong clip, normalisation or pooled token changes every
        # update by far more.
        worst = {}
        for name in sorted(ours):
            noise = name.endswith("k_proj.bias")
            atol = h["lr"] * h["steps"] if noise else 1e-5
            d = (ours[name].double() - theirs[name].double()).abs().max().item()
            worst[noise] = max(worst.get(noise, (0.0, "")), (d, name))
            ptkref.assert_close(f"weight {name}", ours[name], theirs[name], rtol=1e-4, atol=atol)
        for noise, (d, name) in sorted(worst.items()):
            print(f"  weights{' (k_proj.bias)' if noise else ''}: max |diff| {d:.3g} ({name})")
        return ours

    def probe_scores(self, final_dir, trl_model, id_rows, pad_id):
        """Scores of `id_rows` (right-padded with pad_id): transformers on ptk's final/, `ptk forward` on
        final/, TRL's trained model."""
        torch = ptkref.need("torch")
        transformers = ptkref.need("transformers")
        T = max(len(r) for r in id_rows)
        ids = [r + [pad_id] * (T - len(r)) for r in id_rows]
        mask = [[1] * len(r) + [0] * (T - len(r)) for r in id_rows]
        hf = transformers.Qwen2ForSequenceClassification.from_pretrained(str(final_dir), dtype=torch.float32).eval()
        self.assertEqual(hf.config.pad_token_id, pad_id, "final/config.json pad_token_id (where the score is read)")
        trl_model = trl_model.eval()
        with torch.no_grad():
            t_ids, t_mask = torch.tensor(ids), torch.tensor(mask)
            hf_scores = hf(input_ids=t_ids, attention_mask=t_mask).logits.squeeze(-1)
            trl_scores = trl_model(input_ids=t_ids, attention_mask=t_mask).logits.squeeze(-1)
        ptkref.write_json(self.tmp / "probe.json", {"input_ids": ids, "attention_mask": mask})
        ptkref.ptk("forward", "--model", final_dir, "--input", self.tmp / "probe.json",
                   "--output", self.tmp / "probe.safetensors", "--threads", 1)
        from safetensors.torch import load_file
        ptk_scores = load_file(str(self.tmp / "probe.safetensors"))["scores"]
        return hf_scores, ptk_scores, trl_scores

    def compare_scores(self, final_dir, trainer, pad_id, extra_rows=()):
        ds = trainer.train_dataset
        rows = list(ds["chosen_ids"]) + list(ds["rejected_ids"]) + [list(r) for r in extra_rows]
        hf, ours, trl_s = self.probe_scores(final_dir, trainer.model, rows, pad_id)
        # Same weights, same forward: one fp32 forward of each implementation (~1e-6).
        close("scores: ptk forward vs transformers on ptk's final/", ours, hf, rtol=1e-5, atol=1e-5)
        # Two trainings whose weights agree to the tolerance above: scores O(1) within ~1e-4.
        close("scores: ptk's final/ vs TRL's model", hf, trl_s, rtol=1e-4, atol=1e-4)

    def ordered_rows(self, kept, dropped, seed):
        """TRL's dataset: ptk's visiting order of the kept rows, after the over-long rows (which TRL must
        drop itself, else step 1 differs)."""
        return list(dropped) + [kept[i] for i in ptkref.ptk_row_order(len(kept), seed)]

    # ---- tests ------------------------------------------------------------------------------------

    def test_text_bradley_terry_with_grad_accum(self):
        """Standard text pairs, explicit prompt, plain Bradley–Terry loss; 2 pairs a micro-batch,
        grad_accum 2, 3 steps; weight decay and clipping on. The tokenizer's EOS is <|endoftext|>, its
        pad token too (as Qwen2.5 base checkpoints have it): both sides then read the score at the
        token before the appended EOS."""
        transformers = ptkref.need("transformers")
        tok_dir = ptkref.tiny_tokenizer(self.tmp / "tok")
        model_dir = make_reward_model(self.tmp, tok_dir, eos_token="<|endoftext|>")
        tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
        self.assertEqual(tok.eos_token_id, tok.pad_token_id)
        eos = tok.eos_token

        def ids(text):
            return tok(text)["input_ids"]

        for p, c, r in TEXT_PAIRS:
            for reply in (c, r):
                self.assertEqual(ids(p + reply + eos), ids(p) + ids(reply) + [tok.eos_token_id],
                                 f"prompt {p!r} + reply {reply!r} tokenize as prompt, then reply")
        lengths = [(len(ids(p + c + eos)), len(ids(p + r + eos))) for p, c, r in TEXT_PAIRS]
        max_length = max(max(l) for l in lengths)  # the longest pair is kept: exactly max_length
        p, c, r = TEXT_PAIRS[[max(l) for l in lengths].index(max_length)]
        over = None
        for filler in (" ok", " a", "!", " the sea", " quick brown", " is deep", " fox fox"):
            cand = {"prompt": p, "chosen": c + filler, "rejected": r + filler}
            if max(len(ids(p + cand["chosen"] + eos)), len(ids(p + cand["rejected"] + eos))) == max_length + 1:
                over = cand
                break
        self.assertIsNotNone(over, "a pair one token over max_length")
        kept = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in TEXT_PAIRS]
        h = {"seed": 11, "steps": 3, "batch": 2, "accum": 2, "lr": 3e-3, "weight_decay": 0.1,
             "betas": (0.9, 0.99), "eps": 1e-8, "clip": 1.0, "max_length": max_length, "center": None}
        # ptk reads the file in its order: the over-long pair first (dropped), then the 12 kept.
        data = ptkref.write_jsonl(self.tmp / "pairs.jsonl", [over] + kept)
        ours, final_dir = self.run_ptk(model_dir, data, h)
        trainer, theirs = self.run_trl(model_dir, self.ordered_rows(kept, [over], h["seed"]), h)
        self.assertEqual(len(trainer.train_dataset), 12, "TRL dropped the pair over max_length, kept the one at it")
        self.compare_steps(ours, theirs, h["steps"])
        self.compare_weights(final_dir, trainer.model, h)
        # A row whose real last token is the pad id (an EOS that is also the pad token): transformers
        # reads the score before it; so must `ptk forward`.
        self.compare_scores(final_dir, trainer, tok.pad_token_id,
                            extra_rows=[ids("The sea is wide.") + [tok.eos_token_id]])

    def test_chat_margin_and_centering(self):
        """Conversational pairs (Qwen2.5's chat template, EOS <|im_end|>), a `margin` column and
        center_rewards_coefficient 0.1; 3 pairs a micro-batch, no accumulation, 4 steps; then an
        evaluation on the same pairs (data.eval / trainer.evaluate)."""
        tok_dir = ptkref.tiny_tokenizer(self.tmp / "tok")
        model_dir = make_reward_model(self.tmp, tok_dir, seed=9)
        margins = [0.5, -0.25, 1.0, 0.0, 2.0, 0.75, -1.0, 0.125, 1.5, 0.3, 0.0, 0.9]
        rows = []
        for (p, c, r), m in zip(TEXT_PAIRS, margins):
            prompt, chosen = conversation(p.strip(), c.strip())
            _, rejected = conversation(p.strip(), r.strip())
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "margin": m})
        h = {"seed": 3, "steps": 4, "batch": 3, "accum": 1, "lr": 2e-3, "weight_decay": 0.0,
             "betas": (0.9, 0.999), "eps": 1e-8, "clip": 0.5, "max_length": 256, "center": 0.1, "eval": rows}
        data = ptkref.write_jsonl(self.tmp / "pairs.jsonl", rows)
        ours, final_dir = self.run_ptk(model_dir, data, h)
        trainer, theirs = self.run_trl(model_dir, self.ordered_rows(rows, [], h["seed"]), h)
        self.assertIn("margin", trainer.train_dataset.column_names)
        self.compare_steps(ours, theirs, h["steps"])
        self.compare_weights(final_dir, trainer.model, h)
        self.compare_scores(final_dir, trainer, trainer.processing_class.pad_token_id)

    def test_text_tokenization_differences_pinned(self):
        """How text pairs become ids: one known difference, pinned (the test fails when either side
        changes, so the README's "Differences from TRL" can be updated), and one former difference:
          1. TRL's RewardTrainer tokenizes prompt + reply as one text; ptk tokenizes the prompt and the
             reply apart (one prompt for both replies, as for DPO). The ids differ where the prompt's
             last pre-token and the reply's first would join: a prompt ending in a space before a word
             ("Capital: " + "Paris": TRL " Paris", ptk " " + "Paris"), or a word run across the boundary.
          2. Both append EOS to a reply unless its text already ends with the EOS token (ptk used to
             append it always, giving two EOS: this test showed it).
        Both sides' ids are counted through num_tokens (step 1) and TRL's own dataset preparation."""
        ptkref.need("torch")
        datasets = ptkref.need("datasets")
        trl = ptkref.need("trl")
        transformers = ptkref.need("transformers")
        tok_dir = ptkref.tiny_tokenizer(self.tmp / "tok")
        model_dir = make_reward_model(self.tmp, tok_dir)
        tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
        eos = tok.eos_token

        def ids(text):
            return tok(text)["input_ids"]

        # "Capital: " + "Berlin": TRL's one pre-token " Berlin" is ["ĠBer", "lin"]; ptk's " " and
        # "Berlin" are ["Ġ"] + ["Ber", "lin"] (with this vocabulary " Paris" splits the same either way).
        boundary = {"prompt": "The capital of Germany: ", "chosen": "Berlin", "rejected": "Paris"}
        ends_eos = {"prompt": "Write a poem.\n", "chosen": "The sea is wide." + eos, "rejected": "The sea."}
        rows = [boundary, ends_eos]
        ptk_rows = [ids(r["prompt"]) + ids(r[k]) + ([] if r[k].endswith(eos) else [tok.eos_token_id])
                    for r in rows for k in ("chosen", "rejected")]
        args = trl.RewardConfig(output_dir=str(self.tmp / "trl_out"), use_cpu=True, bf16=False, report_to=[],
                                max_length=None)
        prepared = trl.RewardTrainer._prepare_dataset(None, datasets.Dataset.from_list(rows), tok, args, "train")
        trl_rows = [prepared[i][k] for i in range(2) for k in ("chosen_ids", "rejected_ids")]
        self.assertEqual(trl_rows[0], ptk_rows[0][:-4] + ids(" Berlin") + [tok.eos_token_id], "1: TRL's ids")
        self.assertEqual(len(trl_rows[0]), len(ptk_rows[0]) - 1, "1: ptk's ' ' + 'Berlin' is one id more")
        self.assertEqual(trl_rows[1], ptk_rows[1], "1: ' Paris' splits the same either way")
        self.assertEqual(trl_rows[2], ptk_rows[2], "2: neither side adds a second EOS")
        self.assertEqual(ptk_rows[2].count(tok.eos_token_id), 1)
        self.assertEqual(trl_rows[3], ptk_rows[3])
        h = {"seed": 1, "steps": 1, "batch": 2, "accum": 1, "lr": 1e-6, "weight_decay": 0.0,
             "betas": (0.9, 0.999), "eps": 1e-8, "clip": 1.0, "max_length": 64, "center": None}
        ours, _ = self.run_ptk(model_dir, ptkref.write_jsonl(self.tmp / "pairs.jsonl", rows), h)
        self.assertEqual(int(ours[0]["num_tokens"]), sum(len(r) for r in ptk_rows),
                         "ptk rm's tokens: prompt and reply tokenized apart, one EOS a reply")


if __name__ == "__main__":
    ptkref.main()
