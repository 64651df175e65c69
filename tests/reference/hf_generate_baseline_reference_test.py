"""bench/hf_generate_baseline.py (the generation baseline the GPU benchmark prints beside ptk's engine)
decodes as transformers' generate does, on a CPU in fp32: on a random Qwen2 config (GQA, untied),
with the same state dict and prompts of different lengths left-padded into one batch, greedy decoding
gives the same ids as transformers' Qwen2ForCausalLM.generate(do_sample=False) for every row and step
(so the padding mask, positions, cache growth and last-position logits match). Its sampling path
(prompts repeated G times, multinomial draws) is reproducible with a seeded generator and draws in
range. No figure here is timed.
"""
import importlib.util
from pathlib import Path

import ptkref

ROOT = Path(__file__).resolve().parents[2]

CONFIG = {"vocab_size": 96, "hidden_size": 48, "intermediate_size": 80, "num_hidden_layers": 2,
          "num_attention_heads": 6, "num_key_value_heads": 2, "rope_theta": 5000.0,
          "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "max_position_embeddings": 64,
          "initializer_range": 0.5}


def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class HfGenerateBaselineReference(ptkref.TempDirTestCase):
    def test_greedy_ids_equal_transformers_generate(self):
        torch = ptkref.need("torch")
        transformers = ptkref.need("transformers")
        torch.manual_seed(0)
        gen = load("hf_generate_baseline", ROOT / "bench" / "hf_generate_baseline.py")
        mod = gen.model_module()
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**CONFIG, attn_implementation="sdpa")).float().eval()
        ours = mod.Qwen2Model(mod.Qwen2Config(CONFIG)).float().eval()
        ours.load_state_dict(hf.state_dict(), strict=True)
        prompts = [[5, 17, 33, 2, 9, 40, 41], [7, 8], [90, 1, 1, 60]]
        N = 12
        ids = gen.generate(mod, ours, prompts, 1, N, pad_id=0, greedy=True)
        self.assertEqual(tuple(ids.shape), (3, N))
        L = max(len(p) for p in prompts)
        x = torch.zeros((3, L), dtype=torch.long)
        am = torch.zeros((3, L), dtype=torch.long)
        for i, p in enumerate(prompts):
            x[i, L - len(p):] = torch.tensor(p)
            am[i, L - len(p):] = 1
        with torch.no_grad():
            ref = hf.generate(input_ids=x, attention_mask=am, do_sample=False, max_new_tokens=N, min_new_tokens=N,
                              pad_token_id=0, eos_token_id=None)
        ref = ref[:, L:]
        self.assertEqual(ids.tolist(), ref.tolist())
        # Sampling: every row of a prompt's G samples decodes from the same prefix; with a fixed
        # generator the draws are reproducible and in range.
        g1 = torch.Generator().manual_seed(5)
        g2 = torch.Generator().manual_seed(5)
        a = gen.generate(mod, ours, prompts, 4, 6, generator=g1)
        b = gen.generate(mod, ours, prompts, 4, 6, generator=g2)
        self.assertEqual(tuple(a.shape), (12, 6))
        self.assertTrue(torch.equal(a, b))
        self.assertTrue(bool(((a >= 0) & (a < CONFIG["vocab_size"])).all()))


if __name__ == "__main__":
    ptkref.main()
