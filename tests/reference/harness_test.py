"""The harness itself (tests/reference/ptkref.py): the tiny tokenizer it makes is read identically by
HF tokenizers and `ptk tokenize` (text and chat), and the tiny Qwen2 it saves with transformers gives
the same logits in `ptk forward`. Every other reference test builds on these two."""
import json
import unittest

import ptkref


class Harness(ptkref.TempDirTestCase):
    def test_tiny_tokenizer_ids_match_hf_tokenizers(self):
        tokenizers = ptkref.need("tokenizers")
        folder = ptkref.tiny_tokenizer(self.tmp / "tok")
        texts = ptkref.DEFAULT_CORPUS + ["Making", "  two  spaces\n\n", "unseen: Zürich ½ 🙂", "<|im_end|>x"]
        ptkref.write_jsonl(self.tmp / "in.jsonl", [{"text": t} for t in texts])
        ptkref.ptk("tokenize", "--tokenizer", folder, "--input", self.tmp / "in.jsonl", "--output", self.tmp / "out.jsonl")
        ours = [json.loads(l)["ids"] for l in open(self.tmp / "out.jsonl")]
        hf = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        theirs = [hf.encode(t, add_special_tokens=False).ids for t in texts]
        self.assertEqual(ours, theirs)
        self.assertGreater(ptkref.tokenizer_size(folder), 300, "merges were trained")

    def test_tiny_qwen2_logits_match_transformers(self):
        torch = ptkref.need("torch")
        transformers = ptkref.need("transformers")
        tok = ptkref.tiny_tokenizer(self.tmp / "tok")
        model_dir = ptkref.tiny_qwen2(self.tmp / "model", tok, seed=3)
        ids = [[5, 17, 42, 99, 7, 250], [3, 8, 13, 21, 34, 55]]
        ptkref.write_json(self.tmp / "in.json", {"input_ids": ids, "attention_mask": [[1] * 6] * 2})
        ptkref.ptk("forward", "--model", model_dir, "--input", self.tmp / "in.json", "--output", self.tmp / "out.safetensors")
        from safetensors.torch import load_file
        ours = load_file(str(self.tmp / "out.safetensors"))["logits"]
        m = transformers.Qwen2ForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        with torch.no_grad():
            theirs = m(torch.tensor(ids)).logits
        ptkref.assert_close("logits", ours, theirs, rtol=1e-4, atol=1e-5)

    def test_assert_close_reports_the_worst_element(self):
        ptkref.assert_close("same", [1.0, 2.0], [1.0, 2.0 + 1e-9])
        with self.assertRaisesRegex(AssertionError, r"x: element 1 of 2: ptk 2\.5 vs reference 2\.0"):
            ptkref.assert_close("x", [1.0, 2.5], [1.0, 2.0])
        with self.assertRaisesRegex(AssertionError, "ptk has 1 values, the reference 2"):
            ptkref.assert_close("n", [1.0], [1.0, 2.0])


if __name__ == "__main__":
    ptkref.main()
