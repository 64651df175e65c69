"""LoRA adapters both ways between ptk and PEFT 0.22.0 (transformers 5.25.0) on the harness's tiny Qwen2,
fp32 on the CPU: PEFT is the executable reference for ptk's adapter files and arithmetic.

(a) ptk's adapter in PEFT: a few steps of `ptk sft` with model.lora.enabled=true at a high learning rate
    (so every lora_B is clearly away from its zero init), final/ is a PEFT adapter folder (no full
    weights); PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), final/) gives the
    logits of `ptk forward --model final/` (which loads the base with the adapter merged), and PEFT's
    merge_and_unload() weights equal ptk's final-merged/ (model.lora.save_merged=true). Two runs: all
    linears with tied embeddings; rsLoRA on q_proj, v_proj, down_proj with dropout, untied embeddings.
(b) PEFT's adapter in ptk: get_peft_model(LoraConfig(..., init_lora_weights=False)) (random A and B, so
    the adapter changes the logits), save_pretrained, then `ptk forward` on that folder gives PEFT's
    logits: a subset of targets, and rsLoRA on "all-linear". A SEQ_CLS adapter (PEFT adds the score to
    modules_to_save) on AutoModelForSequenceClassification over the causal base: `ptk forward` scores
    equal PEFT's (left- and right-padded rows).
(c) A PEFT adapter as model.adapter: one step of `ptk sft` at learning rate 0 (the warm-up step of a
    linear schedule) starts from PEFT's weights and keeps them: final/adapter_model.safetensors holds PEFT's tensors under PEFT's names, and its logits are
    PEFT's; at a learning rate > 0 the adapters move away from them.

Every comparison also checks that the adapter changes the base's logits, so no test passes on the base
alone. Tolerances as the other fp32 references (checkpoint_reference_test): logits rtol 1e-5 + atol 1e-5;
merged weights rtol 1e-6 + atol 1e-7 (one fp32 product and sum on both sides).
"""
import json
from pathlib import Path

import ptkref
from checkpoint_reference_test import SFT_ROWS, batch, hf_logits, load_hf, masked, ptk_forward, recipe

try:  # quiet "Loading weights" bars
    from transformers.utils import logging as _hf_logging
    _hf_logging.disable_progress_bar()
except ImportError:
    pass

TOL = dict(rtol=1e-5, atol=1e-5)


def peft_logits(base_dir, adapter_dir, ids, mask):
    ptkref.need("peft")
    from peft import PeftModel
    model = PeftModel.from_pretrained(load_hf(base_dir), str(adapter_dir)).eval()
    return hf_logits(model, ids, mask), model


def assert_differs(name, a, b, at_least=1e-3):
    diff = (a - b).abs().max().item()
    assert diff > at_least, f"{name}: the adapter leaves the base's logits unchanged (max |diff| {diff:.3g})"


def peft_scores(model, ids, mask):
    import torch
    ids, mask = torch.tensor(ids), torch.tensor(mask)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, 0]


class LoraAgainstPeft(ptkref.TempDirTestCase):
    def setUp(self):
        super().setUp()
        ptkref.need("torch", "transformers", "peft", "safetensors")
        self.tok = ptkref.tiny_tokenizer(self.tmp / "tok")
        self.ids, self.mask = batch(self.tok)

    def base(self, name, tie=True, seed=3):
        return ptkref.tiny_qwen2(self.tmp / name, tokenizer_folder=self.tok, seed=seed, tie=tie)

    # ---- (a) ptk's adapter in PEFT ----------------------------------------------------------------

    def sft_lora(self, base_dir, run, lora, steps=3, lr=5e-2, optim=None, **model):
        data = ptkref.write_jsonl(self.tmp / "sft.jsonl", SFT_ROWS)
        rec = recipe(self.tmp / run, base_dir, data, steps, lr=lr)
        rec["optim"].update(optim or {})
        rec["model"].update(model)
        rec["model"]["lora"] = lora
        path = ptkref.write_json(self.tmp / f"{run}.json", rec)
        ptkref.ptk("sft", "--recipe", path, "--threads", 1)
        return self.tmp / run / "final"

    def check_ptk_adapter(self, base_dir, final, expect_targets, rank, alpha, rslora):
        import torch
        from safetensors.torch import load_file
        cfg = json.loads((final / "adapter_config.json").read_text(encoding="utf-8"))
        self.assertEqual(cfg.get("peft_type"), "LORA")
        self.assertEqual(cfg.get("task_type"), "CAUSAL_LM")
        self.assertEqual((cfg["r"], cfg["lora_alpha"], bool(cfg.get("use_rslora"))), (rank, alpha, rslora))
        self.assertEqual(sorted(cfg["target_modules"]), sorted(expect_targets))
        self.assertFalse((final / "model.safetensors").exists(), "final/ of a LoRA run holds the full weights")
        tensors = load_file(str(final / "adapter_model.safetensors"))
        bs = [t for n, t in tensors.items() if ".lora_B." in n]
        self.assertEqual(len(bs), 2 * len(expect_targets), sorted(tensors))  # 2 layers
        for n, t in tensors.items():
            if ".lora_B." in n:
                self.assertGreater(t.abs().max().item(), 1e-3, f"{n} is still ~zero after training")
        # PEFT: the adapter on transformers' base gives ptk's logits.
        ours = ptk_forward(self.tmp, final, self.ids, self.mask, final.parent.name)["logits"]
        theirs, peft_model = peft_logits(base_dir, final, self.ids, self.mask)
        ptkref.assert_close(f"{final}: logits, ptk forward vs PEFT", masked(ours, self.mask),
                            masked(theirs, self.mask), **TOL)
        assert_differs(str(final), masked(theirs, self.mask), masked(hf_logits(load_hf(base_dir), self.ids, self.mask),
                                                                     self.mask))
        # merge_and_unload's weights are ptk's final-merged/ (a plain HF folder).
        merged_dir = final.parent / "final-merged"
        self.assertTrue((merged_dir / "config.json").exists(), "model.lora.save_merged=true wrote no final-merged/")
        ptk_merged = {}
        for f in sorted(merged_dir.glob("*.safetensors")):
            ptk_merged.update(load_file(str(f)))
        peft_merged = peft_model.merge_and_unload().state_dict()
        tied = "lm_head.weight" in peft_merged and "lm_head.weight" not in ptk_merged
        for name, w in peft_merged.items():
            if tied and name == "lm_head.weight":
                continue
            self.assertIn(name, ptk_merged, f"final-merged/ lacks {name}")
            ptkref.assert_close(f"merged {name}", ptk_merged[name], w, rtol=1e-6, atol=1e-7)
        base_sd = load_hf(base_dir).state_dict()
        changed = [n for n in ptk_merged if not torch.equal(ptk_merged[n], base_sd[n])]
        self.assertEqual(len(changed), 2 * len(expect_targets), "merging changed other weights than the targets")

    def test_ptk_adapter_all_linear_in_peft(self):
        base_dir = self.base("base")
        final = self.sft_lora(base_dir, "all", {"enabled": True, "rank": 4, "alpha": 8, "targets": ["all-linear"],
                                                "save_merged": True})
        self.check_ptk_adapter(base_dir, final, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"], 4, 8, False)

    def test_ptk_rslora_subset_in_peft(self):
        base_dir = self.base("base_untied", tie=False, seed=5)
        final = self.sft_lora(base_dir, "rs", {"enabled": True, "rank": 8, "alpha": 6, "rslora": True,
                                               "dropout": 0.1, "targets": ["q_proj", "v_proj", "down_proj"],
                                               "save_merged": True})
        self.check_ptk_adapter(base_dir, final, ["q_proj", "v_proj", "down_proj"], 8, 6, True)

    # ---- (b) PEFT's adapter in ptk ----------------------------------------------------------------

    def peft_adapter(self, base_dir, out, seed=11, seq_cls=False, **lora):
        import torch
        from peft import LoraConfig, get_peft_model
        torch.manual_seed(seed)
        if seq_cls:
            base = load_hf_unchecked(base_dir, "AutoModelForSequenceClassification")
        else:
            base = load_hf(base_dir)
        model = get_peft_model(base, LoraConfig(init_lora_weights=False, lora_dropout=0.0,
                                                task_type="SEQ_CLS" if seq_cls else "CAUSAL_LM", **lora))
        model.eval()
        model.save_pretrained(str(out))
        return model

    def test_peft_adapter_in_ptk(self):
        base_dir = self.base("base_untied", tie=False)
        cases = {
            "subset": dict(r=4, lora_alpha=12, target_modules=["q_proj", "k_proj", "o_proj", "up_proj"]),
            "rslora_all": dict(r=8, lora_alpha=16, use_rslora=True, target_modules="all-linear"),
        }
        base_logits = masked(hf_logits(load_hf(base_dir), self.ids, self.mask), self.mask)
        for name, lora in cases.items():
            with self.subTest(name):
                adapter = self.tmp / f"peft_{name}"
                model = self.peft_adapter(base_dir, adapter, **lora)
                theirs = masked(hf_logits(model, self.ids, self.mask), self.mask)
                assert_differs(name, theirs, base_logits)
                ours = ptk_forward(self.tmp, adapter, self.ids, self.mask, f"peft_{name}")["logits"]
                ptkref.assert_close(f"{name}: logits, ptk forward of PEFT's adapter vs PEFT", masked(ours, self.mask),
                                    theirs, **TOL)

    def test_peft_seq_cls_adapter_scores_in_ptk(self):
        base_dir = self.base("base_untied", tie=False)
        adapter = self.tmp / "peft_rm"
        model = self.peft_adapter(base_dir, adapter, seq_cls=True, r=4, lora_alpha=8,
                                  target_modules=["q_proj", "v_proj", "gate_proj"])
        cfg = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
        self.assertEqual(cfg["task_type"], "SEQ_CLS")
        self.assertIn("score", cfg["modules_to_save"] or [])
        theirs = peft_scores(model, self.ids, self.mask)
        with model.disable_adapter():
            assert_differs("SEQ_CLS", theirs, peft_scores(model, self.ids, self.mask), at_least=1e-4)
        out = ptk_forward(self.tmp, adapter, self.ids, self.mask, "peft_rm")
        self.assertIn("scores", out, "ptk forward wrote no scores for a SEQ_CLS adapter")
        ptkref.assert_close("SEQ_CLS adapter: scores, ptk forward vs PEFT", out["scores"], theirs, **TOL)

    # ---- (c) a PEFT adapter as model.adapter ------------------------------------------------------

    def test_peft_adapter_starts_ptk_sft(self):
        import torch
        from safetensors.torch import load_file
        base_dir = self.base("base")
        adapter = self.tmp / "peft_start"
        model = self.peft_adapter(base_dir, adapter, r=4, lora_alpha=8, target_modules="all-linear")
        theirs = masked(hf_logits(model, self.ids, self.mask), self.mask)
        start = load_file(str(adapter / "adapter_model.safetensors"))
        lora = {"enabled": True, "rank": 4, "alpha": 8, "targets": ["all-linear"]}
        # One step at learning rate 0 (a linear schedule's warm-up step; optim.lr must be > 0): the run's
        # adapter is PEFT's, tensor for tensor, and so are its logits.
        final = self.sft_lora(base_dir, "cont0", lora, steps=1, lr=1e-2, optim={"schedule": "linear", "warmup_steps": 1},
                              adapter=str(adapter))
        kept = load_file(str(final / "adapter_model.safetensors"))
        self.assertEqual(sorted(kept), sorted(start))
        for n, t in start.items():
            self.assertTrue(torch.equal(kept[n], t), f"{n}: ptk sft at lr 0 changed PEFT's start weights")
        ours = ptk_forward(self.tmp, final, self.ids, self.mask, "cont0")["logits"]
        ptkref.assert_close("model.adapter at lr 0: logits vs PEFT", masked(ours, self.mask), theirs, **TOL)
        # A learning rate > 0 moves them from there.
        final = self.sft_lora(base_dir, "cont1", lora, steps=2, lr=1e-2, adapter=str(adapter))
        moved = load_file(str(final / "adapter_model.safetensors"))
        for n, t in start.items():
            d = (moved[n] - t).abs().max().item()
            self.assertGreater(d, 0, f"{n} did not move at lr 1e-2")
            self.assertLess(d, 0.1, f"{n} moved by {d}: not continued from PEFT's weights")


def load_hf_unchecked(folder, cls):
    """A transformers model whose head is new (AutoModelForSequenceClassification over a causal LM)."""
    import torch
    import transformers
    return getattr(transformers, cls).from_pretrained(str(folder), dtype=torch.float32, num_labels=1).eval()


if __name__ == "__main__":
    ptkref.main()
