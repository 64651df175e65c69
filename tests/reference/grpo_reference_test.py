"""GRPO against TRL 1.16's GRPOTrainer: the same prompts, completions, rewards, log-probs (current,
old, reference) and entropies through TRL's real code and through ptk's rl/grpo_loss.{h,cpp}.

Sampled completions cannot match between two engines, so generation is taken out on both sides: on
TRL's side `_generate` is replaced by one that returns fixed token ids, the reward functions return
fixed rewards, and `_generate_and_score_completions` (TRL's own) turns them into advantages; then
`_compute_loss` (TRL's own) runs once per micro-batch with `_get_per_token_logps_and_entropies`
replaced by a slice of one leaf tensor. On ptk's side tests/reference/grpo_loss_probe.cpp calls
grpo_advantages and grpo_loss on the same tensors, scaled as rl/grpo_stage.cpp scales them.

test_loss_advantages_metrics_gradients_match_trl compares the gradient at the per-token log-probs
(d loss / d logps, summed over the micro-batches): that is the loss's whole contribution to the
parameter gradient (which is J^T times it, J the Jacobian of the model's log-probs, a property of
the forward pass, not of the loss), and at this seam a wrong sign, normalizer, clip or KL term
shows up undiluted, with no forward-pass rounding mixed in; it runs every case.
test_model_parameter_gradients_match_trl takes ℓ and H from the tiny Qwen2 itself on both sides
(TRL's fused log-prob head, ptk's forward + lm_head_logprobs as rl/grpo_stage.cpp calls them,
at temperature 0.7 and 1) and compares the log-probs and the gradient at every parameter, for two
cases. Both sides
cut the generation batch into micro-batches in order (TRL and ptk each shuffle it first, with their
own seeds; the order only decides which rows share a micro-batch).

Compared, for every loss type both have (grpo, bnpo, dr_grpo, dapo, cispo, sapo) with beta 0 and
0.04 and with mu 1 (no old log-probs: ratio 1) and mu 2 (old log-probs off by up to +-0.6 nats, so
ratios reach 0.55 .. 1.8 and many fall outside [1 - eps_low, 1 + eps_high]): the advantages, the
reward metrics, each micro-batch's loss, the kl / entropy / clip_ratio/* / cispo_clip_ratio metrics
of each micro-batch, and the gradient. Plus GSPO (sequence-level ratio, bias-corrected KL) and DAPO
with the two-sided clip (delta) and the top-entropy mask.
"""
import json
import logging
import os
import subprocess
from pathlib import Path

import ptkref

PROBE = os.environ.get("PTK_GRPO_PROBE", str(ptkref.SOURCE_DIR / "build" / "tests" / "reference" / "grpo_loss_probe"))

G = 4                  # num_generations
PROMPTS = 3            # groups: 12 completions, one generation batch
MICRO = 6              # per_device_train_batch_size: two micro-batches (= grad accumulation 2), each
                       # crossing a group boundary, so bnpo's per-micro-batch normalizer matters
# Completion lengths (tokens incl. EOS); T = 9 columns. The TRUNCATED rows end without EOS.
LENGTHS = [9, 3, 5, 7, 2, 9, 6, 4, 8, 1, 5, 9]
TRUNCATED = {0, 5, 11}
# Two reward functions (weights 1.0, 0.5); None = the function could not score that completion.
# Row 5 is unscorable (both None: advantage 0, left out of its group's mean); group 2's weighted
# sums are all 1.0 (zero std: advantage 0).
REWARDS_F1 = [1.0, 0.0, 0.5, 1.0, 0.2, None, 0.9, 0.0, 1.0, 1.0, 1.0, 1.0]
REWARDS_F2 = [0.0, 1.0, None, 0.4, 1.0, None, 0.0, 0.3, 0.0, 0.0, 0.0, 0.0]
WEIGHTS = [1.0, 0.5]

# Tolerances. The losses and gradients are float32 on both sides, computed by the same sequence of
# operations except the advantages, which ptk computes in float64 and TRL in float32 (then both cast
# to float32): relative differences stay within a few float32 ulps (~1e-7), so 1e-5 relative with a
# 1e-7 absolute floor (gradient entries are ~1e-3 .. 1e-1; masked ones exactly 0) fails on any
# formula difference (a wrong normalizer moves a value by >= 1/12 relative) but not on rounding.
RTOL, ATOL = 1e-5, 1e-7
# Metrics are ratios of counts (clip ratios: exact) or means of float32 values (kl, entropy).
METRIC_RTOL, METRIC_ATOL = 1e-5, 1e-7
# Model mode: the log-probs come from two float32 forward passes with different kernels (ptk's
# attention and lm_head_logprobs, transformers' SDPA and TRL's chunked log-prob head), which agree to
# a few ulps (measured: everything within 1e-6 relative); parameter gradients sum products in
# different orders, so each tensor is held to 1e-5 of its own largest entry. Under TRL's default
# bf16 autocast the log-probs were 1e-3 off: far outside these.
MODEL_RTOL, MODEL_ATOL = 1e-5, 1e-7
MODEL_GRAD_RTOL = 1e-5


def cases():
    """(name, GRPOConfig overrides): each loss type x beta {0, 0.04} x mu {1, 2},
    plus GSPO and DAPO with delta and the top-entropy mask."""
    out = []
    extra = {"grpo": {}, "bnpo": {}, "dr_grpo": {"max_completion_length": 16},  # 16 != T: the constant shows
             "dapo": {"epsilon_high": 0.28}, "cispo": {"epsilon_high": 1.15},   # cispo: a cap some ratios pass
             "sapo": {}}
    scale = {"grpo": "group", "bnpo": "batch", "dr_grpo": "none", "dapo": "group", "cispo": "group",
             "sapo": "group"}
    for loss_type in ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"]:
        for beta in [0.0, 0.04]:
            for mu in [1, 2]:
                cfg = {"loss_type": loss_type, "beta": beta, "num_iterations": mu,
                       "scale_rewards": scale[loss_type], **extra[loss_type]}
                out.append((f"{loss_type}_beta{beta:g}_mu{mu}", cfg))
    out.append(("gspo_sequence_bias_corrected_kl",
                {"loss_type": "grpo", "beta": 0.04, "num_iterations": 2, "scale_rewards": "group",
                 "importance_sampling_level": "sequence", "use_bias_correction_kl": True,
                 "epsilon": 3e-4, "epsilon_high": 4e-4}))
    out.append(("dapo_delta_top_entropy",
                {"loss_type": "dapo", "beta": 0.0, "num_iterations": 2, "scale_rewards": "group",
                 "epsilon_high": 0.28, "delta": 1.3, "top_entropy_quantile": 0.5}))
    return out


def make_inputs(torch, eos_id, pad_id):
    """The completions and the per-token tensors every case shares (deterministic)."""
    gen = torch.Generator().manual_seed(1234)
    T = max(LENGTHS)
    n = G * PROMPTS
    prompt_ids = [torch.randint(3, 300, (3 + (i // G) % 3,), generator=gen).tolist() for i in range(n)]
    completion_ids = []
    for i, length in enumerate(LENGTHS):
        ids = torch.randint(3, 300, (length,), generator=gen).tolist()
        if i not in TRUNCATED:
            ids[-1] = eos_id
        completion_ids.append(ids)

    def uniform(lo, hi):
        return lo + (hi - lo) * torch.rand((n, T), generator=gen, dtype=torch.float32)

    logps = uniform(-3.0, -0.05)
    old = logps + uniform(-0.6, 0.6)     # mu 2: |log ratio| up to 0.6
    # Every completion's first token has ratio e^0.5 (clipped high where A > 0, every cap here is below
    # it) and, where it has a second one, that one e^-0.5 (clipped low where A < 0): each micro-batch clips.
    old[:, 0] = logps[:, 0] - 0.5
    old[:, 1] = logps[:, 1] + 0.5
    ref = logps + uniform(-0.5, 0.5)
    entropy = uniform(0.1, 2.5)
    return prompt_ids, completion_ids, {"logps": logps, "old_logps": old, "ref_logps": ref, "entropy": entropy}


class GrpoLossTest(ptkref.TempDirTestCase):
    """Each case: TRL's advantages, losses, metrics and gradient vs ptk's on the same inputs."""

    def _setup(self):
        self.torch = ptkref.need("torch")
        ptkref.need("trl", "datasets", "safetensors")
        if not Path(PROBE).exists():
            raise AssertionError(f"grpo_loss_probe not found at {PROBE} (build it: ninja grpo_loss_probe)")
        from datasets import Dataset
        from transformers import AutoTokenizer
        import transformers
        # Row 5 is unscorable on purpose: TRL warns about it on every case.
        logging.getLogger("trl.trainer.grpo_trainer").setLevel(logging.ERROR)
        transformers.utils.logging.disable_progress_bar()
        tok_dir = ptkref.tiny_tokenizer(self.tmp / "tok")
        self.model_dir = ptkref.tiny_qwen2(self.tmp / "model", tok_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        self.prompt_ids, self.completion_ids, self.tensors = make_inputs(self.torch, self.tokenizer.eos_token_id,
                                                                         self.tokenizer.pad_token_id)
        self.dataset = Dataset.from_list([{"prompt": f"question {i}", "row": 0} for i in range(PROMPTS)])

    def _run_cases(self, case_list, model_mode):
        failures = []
        for name, cfg in case_list:
            with self.subTest(case=name):
                try:
                    self._case(name, cfg, model_mode)
                except AssertionError as e:
                    failures.append(f"{name}: {e}")
        if failures:
            raise AssertionError(f"{len(failures)} case(s) differ:\n" + "\n".join(failures))

    def test_trl_defaults_the_readme_names(self):
        """Pinned for README "Differences from TRL": TRL's GRPOConfig defaults to bf16 (autocast on
        the CPU too, where ptk trains in float32) and applies the sampler importance-sampling
        correction only with vLLM. A TRL that changes either fails here, and the README follows."""
        trl = ptkref.need("trl")
        cfg = trl.GRPOConfig(output_dir=str(self.tmp / "defaults"), use_cpu=True, report_to="none")
        self.assertTrue(cfg.bf16, "TRL's GRPOConfig no longer defaults to bf16")
        self.assertFalse(cfg.use_vllm)

    def test_loss_advantages_metrics_gradients_match_trl(self):
        """At the log-prob seam: every case of cases(), d loss / d logps compared."""
        self._setup()
        self._run_cases(cases(), model_mode=False)

    def test_model_parameter_gradients_match_trl(self):
        """Through the model: ℓ and H from the tiny Qwen2 on each side (TRL's _get_per_token_logps_and_
        entropies, ptk's forward + lm_head_logprobs as rl/grpo_stage.cpp calls them, at a temperature
        other than 1), the gradient compared at every parameter."""
        self._setup()
        self._run_cases([
            ("model_dapo_beta0.04_mu2_temperature0.7",
             {"loss_type": "dapo", "beta": 0.04, "num_iterations": 2, "scale_rewards": "group",
              "epsilon_high": 0.28, "temperature": 0.7}),
            ("model_grpo_beta0_mu1", {"loss_type": "grpo", "beta": 0.0, "num_iterations": 1,
                                      "scale_rewards": "group"}),
        ], model_mode=True)

    def _case(self, name, cfg, model_mode):
        torch = self.torch
        from safetensors.torch import load_file, save_file
        from trl import GRPOConfig, GRPOTrainer
        tensors, tokenizer = self.tensors, self.tokenizer
        n = len(LENGTHS)

        def func0(prompts, completions, row, **kw):
            return [REWARDS_F1[r] for r in row]

        def func1(prompts, completions, row, **kw):
            return [REWARDS_F2[r] for r in row]

        def fake_generate(prompts):
            return (self.prompt_ids, self.completion_ids, None, [tokenizer.decode(c) for c in self.completion_ids],
                    None, {}, None, None)

        cfg = dict(cfg)
        mu = cfg["num_iterations"]
        # bf16=False: TRL's GRPOConfig defaults to bf16=True, which on the CPU runs the forward under
        # bfloat16 autocast (log-probs ~1e-3 off fp32); ptk trains in float32 (model.dtype auto).
        args = GRPOConfig(output_dir=str(self.tmp / "trl" / name), per_device_train_batch_size=MICRO,
                          gradient_accumulation_steps=n // MICRO, num_generations=G,
                          max_completion_length=cfg.pop("max_completion_length", 512), reward_weights=WEIGHTS,
                          use_cpu=True, bf16=False, report_to="none", seed=0, **cfg)
        trainer = GRPOTrainer(model=str(self.model_dir), reward_funcs=[func0, func1], args=args,
                              train_dataset=self.dataset, processing_class=tokenizer)
        trainer.model.train()
        trainer._generate = fake_generate
        rows = [{"prompt": f"question {i // G}", "row": i} for i in range(n)]

        # TRL: advantages by its own _generate_and_score_completions, then its _compute_loss per micro-batch.
        batch = trainer._generate_and_score_completions(rows)
        T = batch["completion_ids"].size(1)
        self.assertEqual(T, max(LENGTHS))
        mask = batch["completion_mask"].float()
        self.assertEqual(mask.sum(1).tolist(), [float(x) for x in LENGTHS])
        # The old and reference log-probs TRL's model computed (mu 2, beta > 0) give way to chosen ones:
        # the leaf mode's, or (model mode) the model's own ℓ^old moved by the same offsets, so that the
        # ratios leave the clip range and the KL is not 0.
        if model_mode and mu > 1:
            base = batch["old_per_token_logps"].detach()
            old = base + (tensors["old_logps"] - tensors["logps"])
            ref = base + (tensors["ref_logps"] - tensors["logps"])
        else:
            old, ref = tensors["old_logps"].clone(), tensors["ref_logps"].clone()
        self.assertTrue(not (model_mode and args.beta != 0 and mu == 1), "model mode with beta needs mu 2")
        batch.pop("old_per_token_logps", None)
        batch.pop("ref_per_token_logps", None)
        if mu > 1:
            batch["old_per_token_logps"] = old
        if args.beta != 0:
            batch["ref_per_token_logps"] = ref
        adv_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if v}
        trainer._metrics["train"].clear()
        leaf = tensors["logps"].clone().requires_grad_(True)
        trainer.current_gradient_accumulation_steps = n // MICRO
        trl_losses, trl_metrics, trl_logps = [], [], []
        if model_mode:
            forward = trainer._get_per_token_logps_and_entropies

            def capture(*a, **kw):
                out = forward(*a, **kw)
                trl_logps.append(out[0].detach())
                return out
            trainer._get_per_token_logps_and_entropies = capture
        for b in range(0, n, MICRO):
            mb = {k: (v[b:b + MICRO] if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in batch.items()}
            if not model_mode:
                trainer._get_per_token_logps_and_entropies = (
                    lambda *a, _b=b, **kw: (leaf[_b:_b + MICRO], tensors["entropy"][_b:_b + MICRO], None))
            loss = trainer._compute_loss(trainer.model, mb)
            loss.backward()
            trl_losses.append(loss.item())
            trl_metrics.append({k: v[-1] for k, v in trainer._metrics["train"].items() if v})
            trainer._metrics["train"].clear()

        # ptk: the probe on the same tensors.
        d = self.tmp / "ptk" / name
        d.mkdir(parents=True)
        nan = float("nan")
        rewards = torch.tensor([[nan if x is None else x for x in REWARDS_F1],
                                [nan if x is None else x for x in REWARDS_F2]], dtype=torch.float64).T.contiguous()
        inputs = {"rewards_per_func": rewards, "mask": mask.contiguous()}
        if not model_mode:
            inputs.update(logps=tensors["logps"], entropy=tensors["entropy"])
        if mu > 1:
            inputs["old_logps"] = old.contiguous()
        if args.beta != 0:
            inputs["ref_logps"] = ref.contiguous()
        save_file(inputs, str(d / "in.safetensors"))
        loss_opts = {"loss_type": args.loss_type, "importance_sampling_level": args.importance_sampling_level,
                     "beta": args.beta, "epsilon": args.epsilon, "top_entropy_quantile": args.top_entropy_quantile,
                     "max_completion_length": args.max_completion_length,
                     "sapo_temperature_pos": args.sapo_temperature_pos,
                     "sapo_temperature_neg": args.sapo_temperature_neg}
        if args.epsilon_high is not None:
            loss_opts["epsilon_high"] = args.epsilon_high
        if args.delta is not None:
            loss_opts["delta"] = args.delta
        if args.use_bias_correction_kl:
            loss_opts["use_bias_correction_kl"] = True
        case = {"in": "in.safetensors", "out": "out.safetensors", "metrics_out": "out.json",
                "advantage": {"num_generations": G, "reward_weights": WEIGHTS, "scale_rewards": args.scale_rewards},
                "loss": loss_opts, "micro_batches": [[b, b + MICRO] for b in range(0, n, MICRO)]}
        if model_mode:
            case.update(model=str(self.model_dir), temperature=args.temperature, pad_id=tokenizer.pad_token_id,
                        rows=[[p, c] for p, c in zip(self.prompt_ids, self.completion_ids)])
        ptkref.write_json(d / "case.json", case)
        p = subprocess.run([PROBE, str(d / "case.json")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
        if p.returncode != 0:
            raise AssertionError(f"grpo_loss_probe exited {p.returncode}: {p.stdout[-3000:]}")
        out = load_file(str(d / "out.safetensors"))
        ptk_metrics = json.loads((d / "out.json").read_text())

        print(f"  {name}: loss {[round(x, 6) for x in trl_losses]}, clipped "
              f"{[round(m.get('clip_ratio/region_mean', m.get('cispo_clip_ratio', 0)), 3) for m in trl_metrics]}")
        # The data must exercise what the case is about: with mu 2 every micro-batch clips some tokens
        # (sequence level: some completion of the batch; two of 12 have a nonzero advantage in micro-batch 1).
        if mu > 1 and args.loss_type != "sapo":
            key = "cispo_clip_ratio" if args.loss_type == "cispo" else "clip_ratio/region_mean"
            clipped = [m[key] for m in trl_metrics]
            if args.importance_sampling_level == "sequence":
                clipped = [sum(clipped)]
            self.assertGreater(min(clipped), 0.0, f"nothing clipped: {trl_metrics}")

        rtol, atol = (MODEL_RTOL, MODEL_ATOL) if model_mode else (RTOL, ATOL)
        ptkref.assert_close("advantages", out["advantages"], batch["advantages"], RTOL, 1e-6)
        for k, v in ptk_metrics["advantage_metrics"].items():
            self.assertIn(k, adv_metrics, f"ptk logs {k}, TRL does not")
            ptkref.assert_close(k, [nan if v is None else v], [adv_metrics[k]], METRIC_RTOL, METRIC_ATOL)
        ptkref.assert_close("loss per micro-batch", out["loss"], trl_losses, rtol, atol)
        if model_mode:
            ptkref.assert_close("logps (masked)", out["logps"] * mask, torch.cat(trl_logps) * mask,
                                MODEL_RTOL, MODEL_ATOL)
            params = dict(trainer.model.named_parameters())
            grads = {k[len("grad."):]: v for k, v in out.items() if k.startswith("grad.")}
            self.assertEqual(sorted(grads), sorted(params), "parameter names")
            for k, g in grads.items():
                theirs = params[k].grad
                # Relative to the tensor's largest entry: see MODEL_GRAD_RTOL.
                scale = float(theirs.abs().max())
                ptkref.assert_close(f"d loss / d {k}", g, theirs, 0.0, MODEL_GRAD_RTOL * scale + 1e-12)
        else:
            ptkref.assert_close("d loss / d logps", out["logps_grad"], leaf.grad, RTOL, ATOL)
        for i, (ours, theirs) in enumerate(zip(ptk_metrics["micro_batches"], trl_metrics)):
            theirs = {k: v for k, v in theirs.items() if k not in ("policy_loss",)}
            self.assertEqual(sorted(ours), sorted(theirs), f"micro-batch {i}: metric names")
            for k in ours:
                ptkref.assert_close(f"micro-batch {i} {k}", [nan if ours[k] is None else ours[k]], [theirs[k]],
                                    rtol if k in ("kl", "entropy") else METRIC_RTOL,
                                    atol if k in ("kl", "entropy") else METRIC_ATOL)


if __name__ == "__main__":
    ptkref.main()
