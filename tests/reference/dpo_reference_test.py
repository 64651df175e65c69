"""`ptk dpo` against TRL's DPOTrainer (trl 1.16.0) on the harness's tiny Qwen2, fp32 on CPU, one thread.

Both sides train the same random-init model on the same preference pairs (TRL's prompt/chosen/rejected
format, plain strings and chat messages) for 3 optimizer steps of 2 micro-batches x 2 pairs, and the
test compares, step by step, every metric both log — loss, rewards/{chosen,rejected,margins,accuracies},
logps/{chosen,rejected}, logits/{chosen,rejected}, plus grad_norm, entropy and mean_token_accuracy —
and then the trained weights. One case per loss type both implement (sigmoid, hinge, ipo, robust,
sft, sigmoid_norm; TRL's exo_pair, nca_pair, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down
and discopop have no ptk counterpart) and a weighted list, against a live reference model (TRL:
ref_model = a second copy of the initial model; ptk: dpo.precompute_ref_log_probs=false); against
precomputed reference log-probs (TRL: precompute_ref_log_probs=True; ptk:
dpo.precompute_ref_log_probs=true, the cached pass) sigmoid alone and all six in one weighted list;
LD-DPO (ld_alpha) in both modes; chat messages in both modes.

Found and fixed in ptk by this test: with ld_alpha, ptk mixed only the policy's sums (TRL before its
DPO refactor) and also mixed the sft term; TRL 1.16 mixes the reference's sums too (so the log-ratios
weigh the same tokens and are 0 at the start) and keeps the sft term a plain token mean.

Alignment (what had to be equal for the numbers to be):
  - data order: ptk walks a seeded Feistel permutation of the prepared rows per epoch
    (datasets/loader.cpp); `ptkref.ptk_micro_batch_rows` reproduces it and TRL gets the rows in that order through
    train_sampling_strategy="sequential" (6 pairs, 12 micro-batch slots: the run crosses an epoch);
  - LR: constant, no warmup; AdamW (0.9, 0.999, eps 1e-8), weight decay 0.5 on both, which neither
    applies to biases and norm weights (a wrongly decayed RMSNorm weight moves by lr*wd = 5e-4 a step,
    far above the weight tolerance); grad clipping at norm 1 (ipo's gradients are ~15, sigmoid's ~1);
  - loss scaling: each micro-batch's pair mean divided by K (TRL's Trainer; ptk counts one target per
    micro-batch); metrics are per-micro-batch values averaged over the step on both sides;
  - max length: one pair is longer than max_length and is cut; with a prompt under half of it both
    keep the prompt and the reply's start (TRL: keep_start of prompt+reply). (ptk differs only when a
    prompt exceeds half of data.max_seq_len: it then keeps the prompt's end; not exercised here.)
  - plain strings: TRL appends the EOS text to each reply and tokenizes prompt+reply together; ptk
    tokenizes them apart and appends the EOS id. Equal when no BPE merge crosses the prompt/reply
    boundary, which the data below respects (prompts end in punctuation, replies start with a space).
"""
from pathlib import Path

import ptkref

SEED = 1234
B, K, STEPS = 2, 2, 3
LR, WD = 1e-3, 0.5
MAX_LEN = 48        # plain pairs: the last pair is cut
MAX_LEN_CHAT = 256  # chat pairs: none is (TRL drops a pair whose prompt alone fills max_length)
CLIP = 1.0

PLAIN_PAIRS = [
    ("What is 12 + 30?", " The answer is 42.", " The answer is 40."),
    ("Name the capital of France.", " Paris is the capital of France.", " Berlin is the capital of France."),
    ("Write a short poem about the sea.", " The sea is wide, the sea is deep.", " The fox is quick."),
    ("What is 2 + 2?", " 4", " The quick brown fox jumps over the lazy dog."),
    ("Introduce yourself.", " You are Qwen, created by Alibaba Cloud. You are a helpful assistant.", " I am a fox."),
    # Longer than MAX_LEN with either reply: both sides keep the prompt and cut the reply's end.
    ("Making a plan.", " First read the question, then answer it in one sentence. The quick brown fox jumps over "
                       "the lazy dog. Paris is the capital of France; Berlin is the capital of Germany.",
     " Write a short poem about the sea. The sea is wide, the sea is deep. What is 12 + 30? The answer is 42, "
     "and the answer is not 40."),
]

CHAT_PAIRS = [
    ("What is 12 + 30?", "The answer is 42.", "The answer is 40."),
    ("Name the capital of France.", "Paris is the capital of France.", "Berlin."),
    ("Write a short poem about the sea.", "The sea is wide, the sea is deep.", "The fox is quick."),
    ("What is 2 + 2?", "4", "The quick brown fox jumps over the lazy dog."),
    ("用一句话介绍你自己。", "我是一个乐于助人的助手。", "I am a fox."),
    ("def add(a, b):", "return a + b", "return a - b"),
]

# Per-step scalars: one fp32 forward/backward on each side, summed in different orders (ptk's fused
# lm_head op vs TRL's chunked one, ptk's attention kernel vs SDPA): measured <= 5e-6 relative (logits,
# a vocabulary mean of ~1e-3 that cancels), most ~1e-7; rtol 1e-5 leaves a margin, and a wrong formula
# (a missing length normalisation, a 1/K, a vocabulary mean over the wrong positions) is off by far
# more. Rewards are beta * (policy - reference) log-prob sums of ~100 nats each: their float noise is
# absolute, ~beta * 100 * 6e-8 * a few = 1e-6 (measured <= 5e-7), hence atol 2e-6 for them; step 1's
# rewards are exactly 0 on both sides (policy == reference).
METRICS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
           "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "grad_norm", "entropy",
           "mean_token_accuracy"]
RTOL = 1e-5
ATOL = {"rewards/chosen": 2e-6, "rewards/rejected": 2e-6, "rewards/margins": 2e-6, "logits/chosen": 1e-8,
        "logits/rejected": 1e-8}
ATOL_DEFAULT = 1e-7

def records(pairs, chat):
    if not chat:
        return [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in pairs]
    return [{"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]} for p, c, r in pairs]


class _TinyModel(ptkref.TempDirTestCase):
    """The tiny tokenizer and Qwen2, made once per class in a folder of its own."""

    @classmethod
    def setUpClass(cls):
        import tempfile
        cls._shared_tmp = tempfile.TemporaryDirectory(prefix="ptkref-dpo-")
        cls._model = None

    @classmethod
    def tearDownClass(cls):
        cls._shared_tmp.cleanup()

    def model_dir(self):
        cls = type(self)
        if cls._model is None:
            shared = Path(cls._shared_tmp.name)
            cls._model = ptkref.tiny_qwen2(shared / "model", ptkref.tiny_tokenizer(shared / "tok"), seed=7)
        return cls._model


class DpoAgainstTrl(_TinyModel):
    """ptk and TRL on the same pairs and hyper-parameters, metric by metric and weight by weight."""

    # -- the two sides --------------------------------------------------------------------------

    def run_ptk(self, model, data, loss_type, weights, label_smoothing, ld_alpha, precompute, max_len):
        run_dir = self.tmp / "ptk"
        recipe = {
            "run": {"seed": SEED, "threads": 1, "dir": str(run_dir)},
            "model": {"path": str(model)},
            "data": {"train": [str(data)], "max_seq_len": max_len},
            "train": {"max_steps": STEPS, "micro_batch_size": B, "grad_accum": K, "log_every": 1},
            "optim": {"lr": LR, "schedule": "constant", "warmup_steps": 0, "weight_decay": WD,
                      "betas": [0.9, 0.999], "eps": 1e-8, "clip_grad_norm": CLIP},
            "checkpoint": {"every": 0},
            "dpo": {"loss_type": loss_type, "loss_weights": weights, "beta": 0.1,
                    "label_smoothing": label_smoothing, "ld_alpha": 1.0 if ld_alpha is None else ld_alpha,
                    "precompute_ref_log_probs": precompute},
        }
        ptkref.write_json(self.tmp / "dpo.json", recipe)
        ptkref.ptk("dpo", "--recipe", self.tmp / "dpo.json", "--threads", "1")
        steps = [m for m in ptkref.metrics(run_dir) if "step" in m and "loss" in m]
        from safetensors.torch import load_file
        weights_out = {}
        for f in sorted((run_dir / "final").glob("*.safetensors")):
            weights_out.update(load_file(str(f)))
        return steps, weights_out

    def run_trl(self, model, rows, loss_type, weights, label_smoothing, ld_alpha, precompute, max_len):
        torch = ptkref.need("torch")
        ptkref.need("trl", "datasets", "transformers")
        import datasets
        import transformers
        from trl import DPOConfig, DPOTrainer
        torch.set_num_threads(ptkref.THREADS)
        args = DPOConfig(
            output_dir=str(self.tmp / "trl"), seed=SEED, use_cpu=True, bf16=False, fp16=False,
            gradient_checkpointing=False, report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True,
            per_device_train_batch_size=B, gradient_accumulation_steps=K, max_steps=STEPS,
            train_sampling_strategy="sequential", dataloader_num_workers=0,
            learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch",
            adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, weight_decay=WD, max_grad_norm=CLIP,
            max_length=max_len, truncation_mode="keep_start",
            beta=0.1, loss_type=list(loss_type), loss_weights=list(weights) if weights else None,
            label_smoothing=label_smoothing, ld_alpha=ld_alpha, precompute_ref_log_probs=precompute,
        )
        tok = transformers.AutoTokenizer.from_pretrained(str(model))
        load = lambda: transformers.AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
        policy = load()
        ref = None if precompute else load()  # precompute: TRL scores the initial policy itself
        trainer = DPOTrainer(model=policy, ref_model=ref, args=args, processing_class=tok,
                             train_dataset=datasets.Dataset.from_list(rows))
        self.overlong = sum(len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) > max_len
                            for r in trainer.train_dataset)
        trainer.train()
        steps = [h for h in trainer.state.log_history if "loss" in h and "step" in h]
        return steps, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

    # -- one comparison -------------------------------------------------------------------------

    def compare(self, loss_type, weights=(), label_smoothing=0.0, ld_alpha=None, precompute=False, chat=False):
        model = self.model_dir()
        pairs = CHAT_PAIRS if chat else PLAIN_PAIRS
        recs = records(pairs, chat)
        data = ptkref.write_jsonl(self.tmp / "pairs.jsonl", recs)
        order = ptkref.ptk_micro_batch_rows(len(recs), B, STEPS * K, SEED)
        max_len = MAX_LEN_CHAT if chat else MAX_LEN
        ours, our_weights = self.run_ptk(model, data, list(loss_type), list(weights), label_smoothing, ld_alpha,
                                         precompute, max_len)
        theirs, their_weights = self.run_trl(model, [recs[i] for i in order], loss_type, weights, label_smoothing,
                                             ld_alpha, precompute, max_len)
        # The plain set's long pair is cut (it appears twice in the 12 rows); chat pairs are not.
        self.assertEqual(self.overlong, 0 if chat else 2, "pairs longer than max_length")
        self.assertEqual(len(ours), STEPS, f"ptk logged {len(ours)} training steps: {ours}")
        self.assertEqual(len(theirs), STEPS, f"TRL logged {len(theirs)} training steps: {theirs}")
        for s in range(STEPS):
            for key in METRICS:
                if precompute and s == 0 and key == "rewards/accuracies":
                    # Step 1 with precomputed reference log-probs: policy == reference, so every reward
                    # is 0 up to float noise, and "chosen reward > rejected reward" is decided by that
                    # noise. TRL precomputes in the training micro-batches (same padding, bit-equal
                    # sums: exactly 0, accuracy 0); ptk precomputes 8 pairs at a time in stored order
                    # (other padding: ~1e-7 rewards, accuracy 0-1). The rewards themselves are compared.
                    continue
                self.assertIn(key, ours[s], f"ptk's step {s + 1} has no {key}")
                self.assertIn(key, theirs[s], f"TRL's step {s + 1} has no {key}")
                ptkref.assert_close(f"step {s + 1} {key}", ours[s][key], theirs[s][key], rtol=RTOL,
                                    atol=ATOL.get(key, ATOL_DEFAULT))
        # The run must have moved the rewards off zero (step 1 is always 0: policy == reference).
        self.assertGreater(abs(theirs[-1]["rewards/margins"]), 1e-4)
        # Weights after 3 Adam steps of lr 1e-3 (each weight moves ~3e-3): measured <= 2.7e-6 apart
        # (most <= 1e-7; the worst are single elements whose gradient nearly cancels, k_proj biases
        # among them: a key bias shifts every attention logit of a query alike, which softmax ignores,
        # except through RoPE). Adam divides each gradient by its own running RMS, so a gradient's
        # float noise becomes update noise of the same relative size however small the gradient.
        # atol 1e-5 = 0.3% of the movement still fails a wrong decay group (wd 0.5: lr * wd * |w| is
        # 5e-4 a step on a norm weight, ~2e-5 on a matrix entry), a clipping difference (ipo clips by
        # ~15x each step; Adam is not invariant to a per-step scale) or a micro-batch out of order.
        tied = "lm_head.weight" not in our_weights
        compared = 0
        for name, t in their_weights.items():
            if tied and name == "lm_head.weight":
                continue
            self.assertIn(name, our_weights, f"ptk's final/ lacks {name}")
            ptkref.assert_close(f"weight {name}", our_weights[name], t, rtol=0, atol=1e-5)
            compared += 1
        self.assertGreater(compared, 10)
        return ours, theirs


def _case(loss_type, weights=(), label_smoothing=0.0, **kw):
    def test(self):
        self.compare(loss_type, weights, label_smoothing, **kw)
    return test


# Against a live reference: each loss type alone, and TRL's weighted list form (RPO-style).
for _name, _args in {
    "sigmoid": (["sigmoid"],),
    "hinge": (["hinge"],),
    "ipo": (["ipo"],),
    "robust": (["robust"], (), 0.1),
    "sft": (["sft"],),
    "sigmoid_norm": (["sigmoid_norm"],),
    "sigmoid_sft_weighted": (["sigmoid", "sft"], (1.0, 0.5)),
}.items():
    setattr(DpoAgainstTrl, f"test_{_name}_live_reference", _case(*_args))
# Against precomputed reference log-probs: sigmoid alone, then every loss type at once (a weighted
# list: a wrong term anywhere changes the sum), which keeps the module's run time down.
DpoAgainstTrl.test_sigmoid_precomputed_reference = _case(["sigmoid"], precompute=True)
DpoAgainstTrl.test_all_losses_weighted_precomputed_reference = _case(
    ["sigmoid", "hinge", "ipo", "robust", "sft", "sigmoid_norm"], (1.0, 0.5, 0.01, 2.0, 0.3, 1.5), 0.1,
    precompute=True)
# LD-DPO (ld_alpha): the reply tokens past the shorter reply weigh alpha in the sequence sums, for the
# policy and the reference alike (TRL since its DPO refactor, PR #3906), while the sft term stays a
# plain token mean. With the sft term, and with precomputed reference log-probs.
DpoAgainstTrl.test_ld_alpha_sigmoid_sft_live_reference = _case(["sigmoid", "sft"], (1.0, 0.5), ld_alpha=0.5)
DpoAgainstTrl.test_ld_alpha_ipo_precomputed_reference = _case(["ipo"], ld_alpha=0.3, precompute=True)
# Chat messages (Qwen2.5's template, default system prompt): both reference modes.
DpoAgainstTrl.test_chat_sigmoid_live_reference = _case(["sigmoid"], chat=True)
DpoAgainstTrl.test_chat_ipo_precomputed_reference = _case(["ipo"], precompute=True, chat=True)


class DpoTruncationDiffersFromTrl(_TinyModel):
    """Pinned difference: a prompt longer than half of data.max_seq_len. TRL (max_length, keep_start)
    cuts prompt+reply to its first max_length tokens, so the prompt stays whole and the replies lose
    their ends (a pair whose prompt alone fills max_length is dropped); ptk keeps the prompt's END, cut
    to max(half, max_seq_len - longest reply), and the replies' starts (datasets/prepare.cpp), as TRL's
    DPOTrainer did with max_prompt_length before its refactor: the replies, which carry the loss,
    keep their tokens and the prompt keeps the part next to them. One step's logps/chosen on the
    initial model pins each side's cut against a transformers forward of the rows it implies."""

    def test_long_prompt_keeps_its_end_in_ptk_and_its_start_in_trl(self):
        torch = ptkref.need("torch")
        transformers = ptkref.need("transformers")
        trl_dpo = ptkref.need("trl.trainer.dpo_trainer")
        model = self.model_dir()
        L = 48
        prompt = "The quick brown fox jumps over the lazy dog. What is 12 + 30?"  # 31 ids
        chosen, rejected = " The answer is 42.", " The answer is 40, not 42. The sea is wide."  # 7, 20 ids
        tok = transformers.AutoTokenizer.from_pretrained(str(model))
        p = tok(prompt)["input_ids"]
        c = tok(chosen)["input_ids"] + [tok.eos_token_id]
        r = tok(rejected)["input_ids"] + [tok.eos_token_id]
        self.assertEqual(tok(prompt + rejected + tok.eos_token)["input_ids"], p + r, "clean prompt/reply boundary")
        self.assertTrue(L // 2 < len(p) < L and len(p) + len(r) > L, (len(p), len(c), len(r)))
        # ptk's rows (datasets/prepare.cpp tokenize_preference): the prompt's last keep_p ids, then
        # each reply's first L - keep_p (here both replies stay whole).
        keep_p = min(len(p), max(L // 2, L - min(max(len(c), len(r)), L)))
        ptk_rows = [(p[len(p) - keep_p:], x[:L - keep_p]) for x in (c, r)]
        # TRL's rows: its collator's keep_start on prompt + reply (the rejected reply loses its end).
        batch = trl_dpo.DataCollatorForPreference(pad_token_id=tok.pad_token_id, max_length=L)(
            [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r}])
        trl_rows = [(p, ids[mask.bool()].tolist()[len(p):])
                    for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
        self.assertEqual(len(trl_rows[1][1]), L - len(p))

        hf = transformers.AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()

        def logp(prompt_ids, reply_ids):
            ids = torch.tensor([prompt_ids + reply_ids])
            with torch.no_grad():
                lp = torch.log_softmax(hf(ids).logits[0, :-1].double(), -1)
            tgt = ids[0, 1:]
            return lp[torch.arange(len(tgt)), tgt][len(prompt_ids) - 1:].sum().item()

        data = ptkref.write_jsonl(self.tmp / "pairs.jsonl", [{"prompt": prompt, "chosen": chosen, "rejected": rejected}])
        run_dir = self.tmp / "ptk"
        ptkref.write_json(self.tmp / "dpo.json", {
            "run": {"seed": SEED, "threads": 1, "dir": str(run_dir)}, "model": {"path": str(model)},
            "data": {"train": [str(data)], "max_seq_len": L},
            "train": {"max_steps": 1, "micro_batch_size": 1, "grad_accum": 1}, "checkpoint": {"every": 0},
            "dpo": {"precompute_ref_log_probs": False}})
        ptkref.ptk("dpo", "--recipe", self.tmp / "dpo.json", "--threads", "1")
        ours = [m for m in ptkref.metrics(run_dir) if "step" in m and "loss" in m][0]
        # Step 1's logps are the initial model's: fp32 forwards of the same rows agree to ~1e-7.
        for i, key in enumerate(["logps/chosen", "logps/rejected"]):
            ptkref.assert_close(f"{key} vs ptk's cut", ours[key], logp(*ptk_rows[i]), rtol=1e-5)
        self.assertGreater(abs(ours["logps/rejected"] - logp(*trl_rows[1])), 1.0, "TRL's cut scores fewer tokens")

if __name__ == "__main__":
    ptkref.main()
