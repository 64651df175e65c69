"""ptk's TensorBoard event files (run.dir/tb, written without a protobuf library) read by TensorBoard's
own reader: tensorboard.backend.event_processing (its record reader checks every length and data
CRC32C, and event_pb2 parses the Events). `wandb sync --sync-tensorboard` reads the same files.

- A tiny `ptk sft` run: the first Event is file_version "brain.Event:2", a SessionLog START follows,
  every scalar of metrics.jsonl is there as train/<name> or eval/<name> at its step, with its value
  (float32, as TensorBoard stores simple_value).
- A resumed run (final/ and the last checkpoint removed, as after a crash) writes a second file, and
  EventAccumulator shows each step once, with the values of metrics.jsonl: the redone steps of the
  first file are purged by the START event.
"""
import math
import shutil

import ptkref
from ptkref import ptk

MODEL = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 259, "hidden_size": 32,
         "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "max_position_embeddings": 128, "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "hidden_act": "silu",
         "initializer_range": 0.02, "tie_word_embeddings": True, "use_sliding_window": False,
         "eos_token_id": 258, "pad_token_id": 256}


class TensorBoardFiles(ptkref.TempDirTestCase):
    def setUp(self):
        super().setUp()
        ea = ptkref.need("tensorboard.backend.event_processing.event_accumulator")
        self.ea = ea
        self.loader = ptkref.need("tensorboard.backend.event_processing.event_file_loader")
        data = self.tmp / "data"
        ptk("make-data", "arithmetic", "--out", data, "--train", "64", "--eval", "16", "--tokenizer", "bytes")
        ptkref.write_json(self.tmp / "model.json", MODEL)
        self.run_dir = self.tmp / "run"
        self.recipe = ptkref.write_json(self.tmp / "sft.json", {
            "model": {"config": str(self.tmp / "model.json")},
            "tokenizer": {"path": str(data)},
            "data": {"train": [str(data / "sft_train.jsonl")], "eval": [str(data / "sft_eval.jsonl")],
                     "max_seq_len": 128},
            "train": {"max_steps": 4, "micro_batch_size": 2, "eval_every": 2},
            "optim": {"lr": 1e-3},
            "checkpoint": {"every": 2, "keep_last": 2},
            "run": {"dir": str(self.run_dir)},
        })

    def sft(self):
        return ptk("sft", "--threads", "1", "--recipe", self.recipe)

    def scalars(self):
        acc = self.ea.EventAccumulator(str(self.run_dir / "tb"), size_guidance={self.ea.SCALARS: 0})
        acc.Reload()
        return acc, {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}

    def expected(self):
        """metrics.jsonl as TensorBoard tags: {tag: [(step, value)]}."""
        want = {}
        for line in ptkref.metrics(self.run_dir):
            for k, v in line.items():
                if k == "step" or v is None:
                    continue
                tag = k if k.startswith("eval/") else "train/" + k
                want.setdefault(tag, []).append((line["step"], float(v)))
        return want

    def assert_same(self, got, want):
        self.assertEqual(sorted(got), sorted(want))
        for tag, points in want.items():
            self.assertEqual([s for s, _ in got[tag]], [s for s, _ in points], tag)
            for (step, ours), (_, theirs) in zip(got[tag], points):
                self.assertTrue(math.isclose(ours, theirs, rel_tol=1e-6, abs_tol=1e-30),
                                f"{tag} at step {step}: event file {ours}, metrics.jsonl {theirs}")

    def test_tensorboard_reads_every_metric(self):
        self.sft()
        files = sorted((self.run_dir / "tb").glob("events.out.tfevents.*"))
        self.assertEqual(len(files), 1)
        events = list(self.loader.EventFileLoader(str(files[0])).Load())  # checks each record's CRCs
        self.assertEqual(events[0].file_version, "brain.Event:2")
        self.assertEqual(events[1].session_log.status, events[1].session_log.START)
        self.assertEqual(events[1].step, 1)
        self.assertEqual([e.step for e in events[2:]], [1, 2, 3, 4])
        acc, got = self.scalars()
        self.assertEqual(acc.file_version, 2.0)
        self.assertIn("train/loss", got)
        self.assertIn("eval/loss", got)
        self.assertEqual([s for s, _ in got["eval/loss"]], [2, 4])
        self.assert_same(got, self.expected())

    def test_resumed_run_shows_each_step_once(self):
        self.sft()
        shutil.rmtree(self.run_dir / "final")
        shutil.rmtree(self.run_dir / "checkpoints" / "step-4")
        out = self.sft().stdout
        self.assertIn("at step 2", out)
        files = sorted((self.run_dir / "tb").glob("events.out.tfevents.*"))
        self.assertEqual(len(files), 2, files)
        second = list(self.loader.EventFileLoader(str(files[1])).Load())
        self.assertEqual((second[1].session_log.status, second[1].step), (second[1].session_log.START, 3))
        _, got = self.scalars()
        self.assertEqual([s for s, _ in got["train/loss"]], [1, 2, 3, 4])
        self.assert_same(got, self.expected())


if __name__ == "__main__":
    ptkref.main()
