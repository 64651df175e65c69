"""bench/torch_sft_baseline.py (the plain-PyTorch SFT step the GPU benchmark prints beside `ptk sft`)
is the Qwen2 model transformers 5.25 defines, on a CPU in fp32:

(a) on the HF fixture (tests/fixtures/hf-qwen2, tied and untied): the baseline's loss on the fixture's
    right-padded batch, each row run alone without its padding, equals the loss transformers computed
    when the fixture was made (expected.json), and its logits equal those in expected.safetensors;
(b) on a random config (GQA, untied, another rope_theta): the same state dict in transformers'
    Qwen2ForCausalLM and in the baseline gives the same logits, loss and every gradient;
(c) the baseline's training step (fp32 here: AdamW on the parameters themselves; two micro-batches
    an optimizer step) equals torch.optim.AdamW on transformers' model over two steps (loss and
    grad norm each step; the weights after them within 1% of one Adam step), and its bf16 step (fp32 master weights)
    stays within bf16 rounding of the fp32 step (its AdamW split into chunks of 1000 elements).

Tolerances: fp32 rtol 1e-5, atol 1e-5 on logits, loss and gradients (the same formulas; SDPA vs
transformers' eager attention sum in another order); bf16 vs fp32 after 2 steps: 3e-2 relative on the
loss. No figure here is timed.
"""
import importlib.util
import json
from pathlib import Path

import ptkref

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "hf-qwen2"
TOL = dict(rtol=1e-5, atol=1e-5)


def baseline():
    spec = importlib.util.spec_from_file_location("torch_sft_baseline", ROOT / "bench" / "torch_sft_baseline.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


RANDOM_CONFIG = {"vocab_size": 96, "hidden_size": 48, "intermediate_size": 80, "num_hidden_layers": 2,
                 "num_attention_heads": 6, "num_key_value_heads": 2, "rope_theta": 5000.0,
                 "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "max_position_embeddings": 64,
                 "initializer_range": 0.05}


class TorchBaselineReference(ptkref.TempDirTestCase):
    def setUp(self):
        super().setUp()
        self.torch = ptkref.need("torch")
        self.torch.manual_seed(0)

    def test_fixture_loss_and_logits(self):
        torch = self.torch
        safetensors = ptkref.need("safetensors.torch")
        if not FIXTURES.is_dir():
            ptkref.skip_without("shared", f"{FIXTURES} is absent")
        b = baseline()
        for name in ("tiny-tied", "tiny-untied"):
            with self.subTest(name):
                folder = FIXTURES / name
                cfg_json = json.loads((folder / "checkpoint" / "config.json").read_text())
                model = b.Qwen2Model(b.Qwen2Config(cfg_json)).eval()
                sd = safetensors.load_file(str(folder / "checkpoint" / "model.safetensors"))
                missing, unexpected = model.load_state_dict(sd, strict=False)
                self.assertEqual(unexpected, [])
                self.assertEqual([m for m in missing if m != "lm_head.weight" or not cfg_json["tie_word_embeddings"]], [])
                inputs = json.loads((folder / "inputs.json").read_text())["right_padded"]
                expected = json.loads((folder / "expected.json").read_text())
                logits_ref = safetensors.load_file(str(folder / "expected.safetensors"))["right.logits"]
                nll, n = 0.0, 0
                with torch.no_grad():
                    for r, (ids, mask, labels) in enumerate(zip(inputs["input_ids"], inputs["attention_mask"],
                                                                inputs["labels"])):
                        T = sum(mask)
                        x = torch.tensor([ids[:T]])
                        y = torch.tensor([labels[:T]])
                        logits = model(x)
                        ptkref.assert_close(f"{name} row {r} logits", logits[0], logits_ref[r, :T], **TOL)
                        lp = torch.log_softmax(logits[0, :-1].double(), -1)
                        tgt = y[0, 1:]
                        keep = tgt != -100
                        nll -= lp[keep].gather(1, tgt[keep][:, None]).sum().item()
                        n += int(keep.sum())
                loss_ref = expected["loss"]
                loss_ref = loss_ref["right_padded"] if isinstance(loss_ref, dict) else loss_ref
                ptkref.assert_close(f"{name} loss", nll / n, loss_ref, **TOL)

    def _pair(self):
        """transformers' Qwen2ForCausalLM at RANDOM_CONFIG and the baseline with its weights."""
        torch = self.torch
        transformers = ptkref.need("transformers")
        b = baseline()
        hf_cfg = transformers.Qwen2Config(**RANDOM_CONFIG, attn_implementation="eager")
        hf = transformers.Qwen2ForCausalLM(hf_cfg).float()
        ours = b.Qwen2Model(b.Qwen2Config(RANDOM_CONFIG)).float()
        ours.load_state_dict(hf.state_dict(), strict=True)
        ids = torch.randint(0, RANDOM_CONFIG["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(3))
        return b, hf, ours, ids

    def test_random_config_logits_loss_gradients(self):
        torch = self.torch
        b, hf, ours, ids = self._pair()
        out = hf(input_ids=ids, labels=ids)
        out.loss.backward()
        logits = ours(ids)
        loss = b.sft_loss(logits, ids)
        loss.backward()
        ptkref.assert_close("logits", logits, out.logits, **TOL)
        ptkref.assert_close("loss", loss.item(), out.loss.item(), **TOL)
        hf_params = dict(hf.named_parameters())
        for n, p in ours.named_parameters():
            ptkref.assert_close(f"grad {n}", p.grad, hf_params[n].grad, rtol=1e-5, atol=1e-6)

    def test_training_step_equals_adamw_on_transformers(self):
        torch = self.torch
        b, hf, ours, ids = self._pair()
        bf = b.Qwen2Model(b.Qwen2Config(RANDOM_CONFIG))
        bf.load_state_dict(ours.state_dict())
        bf = bf.to(torch.bfloat16)
        lr, betas, eps = 1e-2, (0.9, 0.999), 1e-8
        tr = b.Trainer(ours, lr, 0.0, betas, eps, fused=False)
        tr_bf = b.Trainer(bf, lr, 0.0, betas, eps, fused=False, chunk=1000)  # several AdamW chunks
        opt = torch.optim.AdamW(hf.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=0.0)
        n_targets = ids.shape[0] * (ids.shape[1] - 1)
        for step in (1, 2):
            halves = [(ids[:1], ids[:1]), (ids[1:], ids[1:])]  # two micro-batches, one optimizer step
            loss, norm = tr.step(halves, n_targets, clip=1e9)
            loss_bf, _ = tr_bf.step(halves, n_targets, clip=1e9)
            out = hf(input_ids=ids, labels=ids)
            out.loss.backward()
            hf_norm = torch.nn.utils.clip_grad_norm_(hf.parameters(), 1e9)
            opt.step()
            opt.zero_grad()
            ptkref.assert_close(f"step {step} loss", loss.item(), out.loss.item(), **TOL)
            ptkref.assert_close(f"step {step} grad norm", norm.item(), hf_norm.item(), **TOL)
            ptkref.assert_close(f"step {step} bf16 loss vs fp32", loss_bf.item(), loss.item(), rtol=3e-2, atol=0)
        # Adam's step is ~lr whatever the gradient's size, so a weight whose gradient is ~1e-8 moves by
        # the sign of float noise: the bound is 1% of one step (step 2's loss above is the tight check).
        hf_params = dict(hf.named_parameters())
        for n, p in ours.named_parameters():
            ptkref.assert_close(f"after 2 steps {n}", p.detach(), hf_params[n].detach(), rtol=1e-5, atol=0.01 * lr)
        self.assertTrue(all(p.dtype == torch.bfloat16 for p in bf.parameters()))
        self.assertTrue(all(m.dtype == torch.float32 for m in tr_bf.master))

    def test_flops_count(self):
        """The FLOPs per token at the Qwen2.5-0.5B shape (bench/shapes/qwen2.5-0.5b.json), by hand:
        decoder matmuls 24 x (896·896 + 2·896·128 + 896·896 + 3·896·4864) = 357,826,560; output layer
        151,936 x 896 = 136,134,656; attention 6 x 24 x 896 x 4096 = 528,482,304.
        causal = 6 x (357,826,560 + 136,134,656) + 528,482,304 = 3,492,249,600."""
        b = baseline()
        cfg = b.Qwen2Config(json.loads((ROOT / "bench" / "shapes" / "qwen2.5-0.5b.json").read_text()))
        causal, mosaic = b.model_flops_per_token(cfg, 4096)
        self.assertEqual(causal, 3_492_249_600)
        self.assertGreater(mosaic, causal)


if __name__ == "__main__":
    ptkref.main()
