"""GRPO learns on both sides: a short real `ptk grpo` (its rollout engine, its loop) and a short TRL
GRPOTrainer run (transformers generation) on the same tiny random-init Qwen2, the same prompts, the
same rule reward and hyper-parameters; each one's mean reward must rise. Sampling differs between the
engines, so the numbers are not compared with each other: this is the end-to-end check that ptk's
GRPO wiring (rewards -> advantages -> loss -> optimizer step -> the next rollouts) moves the policy
the way TRL's does; grpo_reference_test.py holds the loss to TRL's number for number.

The task is one a random model can learn in a few dozen steps: the reward is the share of the
completion's characters that are digits (the tiny tokenizer splits numbers into one-digit tokens,
so that is about 10 of its ~400 tokens: ~2.5% at start). ptk's rule verifiers score against an
answer, so ptk gets the same Python function through its reward-server client (grpo.reward_urls,
OpenRLHF's /get_reward protocol), served from this process; TRL calls it directly.
"""
import json
import re

import ptkref

STEPS = 30
PROMPTS_PER_STEP = 4
G = 8
MAX_COMPLETION = 12
LR = 5e-3              # a random tiny model: a high LR so the reward moves within STEPS
PROMPTS = [f"Write a number for item {i}." for i in range(16)]
SPECIALS = re.compile(r"<\|(im_end|endoftext|im_start)\|>")


def digit_share(text):
    """The reward: share of the completion's characters (special tokens removed) that are digits."""
    text = SPECIALS.sub("", text)
    return sum(c.isdigit() for c in text) / max(1, len(text))


def score_request(raw):
    """OpenRLHF's /get_reward: the digit share of each query's response (the query after its prompt)."""
    body = json.loads(raw)
    queries, prompts = body["query"], body.get("prompts") or [""] * len(body["query"])
    rewards = [digit_share(q[len(p):] if q.startswith(p) else q) for q, p in zip(queries, prompts)]
    return 200, json.dumps({"rewards": rewards})


def rising(curve):
    """Mean of the last third minus mean of the first third."""
    k = max(1, len(curve) // 3)
    return sum(curve[-k:]) / k - sum(curve[:k]) / k


class GrpoLearningTest(ptkref.TempDirTestCase):

    def setUp(self):
        super().setUp()
        transformers = ptkref.need("torch", "transformers")
        transformers.utils.logging.disable_progress_bar()
        self.tok = ptkref.tiny_tokenizer(self.tmp / "tok")
        self.model = ptkref.tiny_qwen2(self.tmp / "model", self.tok, seed=0)
        self.data = ptkref.write_jsonl(self.tmp / "prompts.jsonl",
                                       [{"prompt": [{"role": "user", "content": p}], "answer": ""} for p in PROMPTS])

    def ptk_curve(self):
        run = self.tmp / "ptk_run"
        with ptkref.JsonPostServer(score_request) as server:
            ptkref.ptk("grpo", "--threads", "1", "--recipe", self.recipe(run, server.port))
        return [m["reward"] for m in ptkref.metrics(run) if "reward" in m and "step" in m]

    def recipe(self, run, port):
        return ptkref.write_json(self.tmp / "grpo.json", {
            "run": {"dir": str(run), "seed": 1, "threads": 1},
            "model": {"path": str(self.model)},
            "data": {"train": [str(self.data)], "max_seq_len": 256},
            "train": {"max_steps": STEPS, "micro_batch_size": PROMPTS_PER_STEP * G, "grad_accum": 1},
            "optim": {"lr": LR, "schedule": "constant", "warmup_steps": 0, "weight_decay": 0.0,
                      "betas": [0.9, 0.999], "clip_grad_norm": 1.0},
            "grpo": {"num_generations": G, "max_completion_length": MAX_COMPLETION, "temperature": 1.0,
                     "reward_funcs": [], "reward_urls": [f"http://127.0.0.1:{port}"], "beta": 0.0,
                     "loss_type": "dapo", "scale_rewards": "group", "num_iterations": 1,
                     "vllm_importance_sampling_correction": False, "eval_at_start": False,
                     "log_rollouts_every": 0},
        })

    def trl_curve(self):
        ptkref.need("trl", "datasets")
        from datasets import Dataset
        from transformers import AutoTokenizer, PrinterCallback
        from trl import GRPOConfig, GRPOTrainer

        def digits(completions, **kw):
            return [digit_share(c[-1]["content"] if isinstance(c, list) else c) for c in completions]

        tokenizer = AutoTokenizer.from_pretrained(str(self.model))
        # bf16=False: TRL's GRPOConfig defaults to bf16 autocast, ptk trains in float32 on the CPU.
        ds = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in PROMPTS])
        args = GRPOConfig(output_dir=str(self.tmp / "trl"), per_device_train_batch_size=PROMPTS_PER_STEP * G,
                          gradient_accumulation_steps=1, num_generations=G, max_completion_length=MAX_COMPLETION,
                          temperature=1.0, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
                          weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, max_grad_norm=1.0, beta=0.0,
                          loss_type="dapo", scale_rewards="group", num_iterations=1, max_steps=STEPS,
                          logging_steps=1, save_strategy="no", use_cpu=True, bf16=False, report_to="none", seed=1,
                          log_completions=False, disable_tqdm=True)
        trainer = GRPOTrainer(model=str(self.model), reward_funcs=[digits], args=args, train_dataset=ds,
                              processing_class=tokenizer)
        trainer.remove_callback(PrinterCallback)  # disable_tqdm prints every step's dict instead
        trainer.train()
        return [h["reward"] for h in trainer.state.log_history if "reward" in h]

    def test_mean_reward_rises_on_both(self):
        ptk_curve = self.ptk_curve()
        trl_curve = self.trl_curve()
        print("ptk reward:", " ".join(f"{r:.3f}" for r in ptk_curve))
        print("TRL reward:", " ".join(f"{r:.3f}" for r in trl_curve))
        self.assertEqual(len(ptk_curve), STEPS)
        self.assertEqual(len(trl_curve), STEPS)
        # Both start near the random model's ~0.025; a rise of 0.05 (the last third over the first)
        # is many times the step-to-step noise of a 32-completion mean at this level.
        self.assertGreater(rising(ptk_curve), 0.05, f"ptk's reward did not rise: {ptk_curve}")
        self.assertGreater(rising(trl_curve), 0.05, f"TRL's reward did not rise: {trl_curve}")


if __name__ == "__main__":
    ptkref.main()
