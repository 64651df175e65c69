"""`ptk merge-lora` against PEFT (peft==0.22.0): adapters PEFT made (random A and B, so the merge
matters) on a tiny Qwen2 that transformers saved, merged by ptk into a plain folder that transformers
loads; its tensors equal PEFT's merge_and_unload() and its outputs the adapter model's.
  - CAUSAL_LM: all-linear LoRA, rsLoRA off; AutoModelForCausalLM on the merged folder.
  - SEQ_CLS (a reward model): the adapter goes onto the causal-LM folder with the score head as
    modules_to_save (what `ptk rm` with model.lora writes); AutoModelForSequenceClassification on it.
And the other way: a reward model `ptk rm` trained with model.lora (a SEQ_CLS adapter folder) loads in
PEFT (PeftModel.from_pretrained on AutoModelForSequenceClassification of the base) with the scores
`ptk forward` gives for it.
The ptk side of merge-lora (logits, refusals) is tests/model/merge_lora_cli_test.cpp.
"""
import ptkref

IDS = [[5, 17, 42, 99, 3, 250, 7, 8], [11, 12, 13, 14, 15, 16, 17, 18]]


class MergeLoraReference(ptkref.TempDirTestCase):
    def _peft_adapter(self, task_type):
        torch = ptkref.need("torch")
        ptkref.need("transformers")
        peft = ptkref.need("peft")
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
        tok = ptkref.tiny_tokenizer(self.tmp / "tok")
        base = ptkref.tiny_qwen2(self.tmp / "base", tok, seed=3)
        torch.manual_seed(7)
        if task_type == "SEQ_CLS":
            model = AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=1)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(base))
        cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0,
                              init_lora_weights=False, task_type=task_type)
        pm = peft.get_peft_model(model, cfg)
        pm.eval()
        adapter = self.tmp / "adapter"
        pm.save_pretrained(str(adapter))
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (adapter / f).write_bytes((tok / f).read_bytes())
        return torch, pm, adapter

    def _merge_and_compare(self, task_type, auto_class):
        torch, pm, adapter = self._peft_adapter(task_type)
        merged = self.tmp / "merged"
        ptkref.ptk("merge-lora", "--threads", "1", "--adapter", str(adapter), "--output", str(merged))
        for f in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
            self.assertTrue((merged / f).exists(), f)
        self.assertFalse((merged / "adapter_config.json").exists())
        ours = auto_class.from_pretrained(str(merged))
        ours.eval()
        ids = torch.tensor(IDS)
        with torch.no_grad():
            want = pm(input_ids=ids).logits
            got = ours(input_ids=ids).logits
            theirs = pm.merge_and_unload().state_dict()
        ptkref.assert_close(f"{task_type} outputs of the merged folder vs the PEFT model", got, want,
                            rtol=1e-5, atol=1e-5)
        mine = ours.state_dict()
        for name, t in theirs.items():
            self.assertIn(name, mine, f"{name} missing from ptk's merged folder")
            ptkref.assert_close(f"{task_type} merged tensor {name}", mine[name], t, rtol=1e-6, atol=1e-7)
        return ours

    def test_causal_lm_adapter_merges_as_peft_does(self):
        ptkref.need("transformers")
        from transformers import AutoModelForCausalLM
        self._merge_and_compare("CAUSAL_LM", AutoModelForCausalLM)

    def test_seq_cls_adapter_merges_into_a_reward_model(self):
        ptkref.need("transformers")
        from transformers import AutoModelForSequenceClassification
        ours = self._merge_and_compare("SEQ_CLS", AutoModelForSequenceClassification)
        self.assertEqual(ours.config.architectures, ["Qwen2ForSequenceClassification"])
        self.assertEqual(ours.config.num_labels, 1)


    def test_ptk_rm_adapter_loads_in_peft(self):
        torch = ptkref.need("torch")
        ptkref.need("transformers", "safetensors")
        peft = ptkref.need("peft")
        from safetensors.torch import load_file
        from transformers import AutoModelForSequenceClassification
        tok = ptkref.tiny_tokenizer(self.tmp / "tok")
        base = ptkref.tiny_qwen2(self.tmp / "base", tok, seed=4)
        pairs = [{"prompt": f"What is {a} + {b}?", "chosen": f" {a + b}", "rejected": f" {a + b + 1}"}
                 for a in range(3, 9) for b in (10, 20)]
        data = ptkref.write_jsonl(self.tmp / "pairs.jsonl", pairs)
        ptkref.write_json(self.tmp / "rm.json", {
            "run": {"seed": 3, "dir": str(self.tmp / "rm")},
            "model": {"path": str(base), "lora": {"enabled": True, "rank": 4, "alpha": 8}},
            "tokenizer": {"path": str(base)},
            "data": {"train": [str(data)], "max_seq_len": 64},
            "train": {"max_steps": 3, "micro_batch_size": 4},
            "optim": {"lr": 5e-2, "schedule": "constant", "warmup_steps": 0},
            "checkpoint": {"every": 0}})
        ptkref.ptk("rm", "--recipe", self.tmp / "rm.json", "--threads", 1)
        final = self.tmp / "rm" / "final"
        self.assertTrue((final / "adapter_config.json").exists())
        ptkref.write_json(self.tmp / "probe.json", {"input_ids": IDS, "attention_mask": [[1] * len(r) for r in IDS]})
        ptkref.ptk("forward", "--threads", 1, "--model", final, "--input", self.tmp / "probe.json",
                   "--output", self.tmp / "probe.safetensors")
        ours = load_file(str(self.tmp / "probe.safetensors"))["scores"]
        model = AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=1)
        pm = peft.PeftModel.from_pretrained(model, str(final))
        pm.eval()
        with torch.no_grad():
            theirs = pm(input_ids=torch.tensor(IDS)).logits.squeeze(-1)
        ptkref.assert_close("scores of ptk's RM adapter in PEFT vs ptk forward", ours, theirs, rtol=1e-5, atol=1e-5)
        # The adapter did something: PEFT with it off scores otherwise.
        with torch.no_grad(), pm.disable_adapter():
            off = pm(input_ids=torch.tensor(IDS)).logits.squeeze(-1)
        self.assertGreater(float((off - theirs).abs().max()), 1e-4)

if __name__ == "__main__":
    ptkref.main()
