"""Assistant masks against transformers 5.25, on the harness's tiny tokenizer (plus Llama 3's special
tokens for Llama 3's templates), for system / user / assistant / tool / tool-call conversations.

- Templates with {% generation %} blocks (TRL's training variants in trl/chat_templates:
  qwen2_5_training, qwen3_training, llama3_training): `ptk tokenize --chat --with-mask
  --chat-template FILE` gives exactly the ids and `assistant_masks` of
  apply_chat_template(tokenize=True, return_assistant_tokens_mask=True, tools=...).
- Templates without (the originals: qwen2_5, qwen3, llama3): ptk derives each assistant turn's span
  from renderings (tokenizer.h's render_chat: G = messages[:i] with the generation prompt, F =
  messages[:i+1], H = all; the longest suffix of F[len(G):] that H continues with at len(G), less
  whitespace after its last added token). This test derives the same spans from transformers'
  renderings and the HF tokenizer's offsets, independently of ptk's renderer and tokenizer, and
  compares masks; and pins how they differ from the training variants' masks where both render the
  same text: by exactly the newline after the end-of-turn token (Qwen2.5 also: the newline after
  "<|im_start|>assistant", which the generation prompt holds); nothing for Llama 3.
"""
import json
from pathlib import Path

import ptkref

try:
    from transformers.utils import logging as _hf_logging
    _hf_logging.disable_progress_bar()
except ImportError:
    pass

LLAMA_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

CALL = {"type": "function", "function": {"name": "add", "arguments": {"a": 12, "b": 30}}}
SCHEMA = {"type": "function", "function": {
    "name": "add", "description": "Adds two integers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}

# (name, messages, tools)
CONVERSATIONS = [
    ("single", [{"role": "user", "content": "What is 12 + 30?"},
                {"role": "assistant", "content": "The answer is 42."}], None),
    ("system_multi_turn", [
        {"role": "system", "content": "Answer in one sentence."},
        {"role": "user", "content": "Write a short poem about the sea."},
        {"role": "assistant", "content": "The sea is wide, the sea is deep."},
        {"role": "user", "content": "And Paris?"},
        {"role": "assistant", "content": "Paris is the capital of France."}], None),
    ("reasoning", [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "<think>greet back</think>Hello!"},
        {"role": "user", "content": "and now?"},
        {"role": "assistant", "content": "Bye.", "reasoning_content": "say bye"}], None),
    ("tool_call", [
        {"role": "user", "content": "What is 12 + 30?"},
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "content": "42"},
        {"role": "assistant", "content": "It is 42."}], [SCHEMA]),
    ("tool_call_null_content_two_results", [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Add twice."},
        {"role": "assistant", "content": None, "tool_calls": [CALL, CALL]},
        {"role": "tool", "content": "42"},
        {"role": "tool", "content": "42"},
        {"role": "assistant", "content": "Both are 42."}], [SCHEMA]),
]

TRL_PAIRS = [("qwen2_5", "qwen2_5_training"), ("qwen3", "qwen3_training"), ("llama3", "llama3_training")]


class ChatMasks(ptkref.TempDirTestCase):
    def setUp(self):
        super().setUp()
        transformers = ptkref.need("transformers")
        trl = ptkref.need("trl")
        self.templates = Path(trl.__file__).parent / "chat_templates"
        self.qwen_dir = ptkref.tiny_tokenizer(self.tmp / "qwen")
        self.llama_dir = self.llama_tokenizer(self.tmp / "llama")
        self.hf = {d: transformers.AutoTokenizer.from_pretrained(str(d)) for d in (self.qwen_dir, self.llama_dir)}

    def llama_tokenizer(self, folder):
        """The tiny tokenizer with Llama 3's special tokens added, bos "<|begin_of_text|>", eos "<|eot_id|>"."""
        from tokenizers import Tokenizer
        ptkref.tiny_tokenizer(folder)
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        tok.add_special_tokens(LLAMA_SPECIALS)
        tok.save(str(folder / "tokenizer.json"))
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
        for t in LLAMA_SPECIALS:
            cfg["added_tokens_decoder"][str(tok.token_to_id(t))] = {
                "content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
        cfg["bos_token"], cfg["eos_token"] = "<|begin_of_text|>", "<|eot_id|>"
        ptkref.write_json(folder / "tokenizer_config.json", cfg)
        return folder

    def tok_dir(self, family):
        return self.llama_dir if family.startswith("llama") else self.qwen_dir

    def ptk_masks(self, family, template, name):
        src = ptkref.write_jsonl(self.tmp / f"{name}.jsonl", [
            {"messages": m, **({"tools": t} if t else {})} for _, m, t in CONVERSATIONS])
        out = self.tmp / f"{name}_out.jsonl"
        ptkref.ptk("tokenize", "--threads", 1, "--tokenizer", self.tok_dir(family), "--input", src, "--output", out,
                   "--chat", "--with-mask", "--chat-template", self.templates / f"{template}.jinja")
        return [json.loads(l) for l in out.read_text(encoding="utf-8").splitlines()]

    def hf_masks(self, family, template, messages, tools):
        out = self.hf[self.tok_dir(family)].apply_chat_template(
            messages, tools=tools, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
            chat_template=(self.templates / f"{template}.jinja").read_text())
        return list(out["input_ids"]), list(out["assistant_masks"])

    def derived(self, family, template, messages, tools):
        """render_chat's rule, on transformers' renderings and the HF tokenizer's offsets."""
        tok = self.hf[self.tok_dir(family)]
        tmpl = (self.templates / f"{template}.jinja").read_text()
        render = lambda msgs, gen: tok.apply_chat_template(msgs, tools=tools, tokenize=False,
                                                           add_generation_prompt=gen, chat_template=tmpl)
        added = [t.content for t in tok.added_tokens_decoder.values()]
        h = render(messages, False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            g, f = render(messages[:i], True), render(messages[:i + 1], False)
            self.assertTrue(f.startswith(g) and h.startswith(g), (template, i))
            d = f[len(g):]
            keep = max(k for k in range(len(d) + 1) if h.startswith(d[len(d) - k:], len(g)))
            b, e = len(g), len(g) + keep
            w = e
            while w > b and h[w - 1] in " \n\t\r\f\v":
                w -= 1
            if w < e and any(h[b:w].endswith(t) for t in added):
                e = w
            self.assertLess(b, e, (template, i))
            spans.append((b, e))
        enc = tok(h, add_special_tokens=False, return_offsets_mapping=True)
        mask, s = [0] * len(enc["input_ids"]), 0
        for k, (tb, te) in enumerate(enc["offset_mapping"]):  # transformers' overlap rule
            while s < len(spans) and tb >= spans[s][1]:
                s += 1
            if s == len(spans):
                break
            if te > spans[s][0]:
                mask[k] = 1
        return list(enc["input_ids"]), mask, h

    def test_generation_blocks_equal_transformers_mask(self):
        for family, training in TRL_PAIRS:
            ours = self.ptk_masks(family, training, training)
            for (name, messages, tools), line in zip(CONVERSATIONS, ours):
                with self.subTest(template=training, conversation=name):
                    ids, mask = self.hf_masks(family, training, messages, tools)
                    self.assertIn(1, mask)
                    self.assertEqual(line["ids"], ids)
                    self.assertEqual(line["assistant_mask"], mask)

    def test_masks_derived_from_the_rendering(self):
        for family, training in TRL_PAIRS:
            ours = self.ptk_masks(family, family, family)
            tok = self.hf[self.tok_dir(family)]
            end_of_turn = tok.convert_tokens_to_ids("<|eot_id|>" if family == "llama3" else "<|im_end|>")
            for (name, messages, tools), line in zip(CONVERSATIONS, ours):
                with self.subTest(template=family, conversation=name):
                    ids, mask, text = self.derived(family, family, messages, tools)
                    self.assertEqual(line["ids"], ids)
                    self.assertEqual(line["assistant_mask"], mask)
                    # Every assistant turn ends its span with the end-of-turn token, which is trained.
                    ends = [k for k in range(len(ids)) if mask[k] and (k + 1 == len(ids) or not mask[k + 1])]
                    self.assertEqual(len(ends), sum(m["role"] == "assistant" for m in messages))
                    self.assertTrue(all(ids[k] == end_of_turn for k in ends), [tok.decode([ids[k]]) for k in ends])
                    # Where the training variant renders the same text, its mask differs only by newlines
                    # the template writes around a turn.
                    t_ids, t_mask = self.hf_masks(family, training, messages, tools)
                    if t_ids != ids:
                        self.assertEqual(family, "qwen3", "only Qwen3's history turns render differently")
                        continue
                    diff = [k for k in range(len(ids)) if mask[k] != t_mask[k]]
                    self.assertTrue(all(t_mask[k] and not mask[k] for k in diff), (name, diff))
                    self.assertTrue(all(tok.decode([ids[k]]) == "\n" for k in diff), (name, diff))
                    if family == "llama3":
                        self.assertEqual(diff, [])


if __name__ == "__main__":
    ptkref.main()
