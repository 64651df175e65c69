"""Chat rendering against transformers 5.25: `ptk tokenize --chat` gives the text and ids of
`apply_chat_template` with Qwen2.5's template (the harness tokenizer carries
tests/tokenizer/data/qwen2.5_tokenizer_config.json), and ptk's assistant mask is TRL's.

- Text and ids: single and multi-turn, Qwen's default system prompt and a custom one, a system turn
  in the middle, generation prompt on and off, unicode (CJK, emoji, combining marks that NFC folds),
  newlines that merge with the template's, an empty reply, a special token inside content.
- Assistant mask: Qwen2.5's published template has no `{% generation %}` block, so transformers'
  `return_assistant_tokens_mask` gives nothing for it. TRL's way for this model (SFTTrainer with
  assistant_only_loss) is its training variant, trl/chat_templates/qwen2_5_training.jinja, which
  `get_training_chat_template` substitutes and whose `{% generation %}` block spans
  "\\n" + content + "<|im_end|>\\n". ptk's mask spans content + "<|im_end|>" only: the pinned
  difference is exactly the two newline tokens the template itself writes around each reply (a reply
  that starts with "\\n" would merge with the header's where the vocabulary has "\\n\\n"; the tiny
  tokenizer has no such merge).
- Tools: tool calls (assistant "tool_calls", content "" or null), tool results (role "tool") and a
  "tools" list next to the messages render as transformers renders them, in `ptk tokenize --chat`
  and in prepared SFT rows (tests/reference/chat_mask_reference_test.py checks their masks).
"""
import json
import unicodedata

import ptkref

try:  # quiet "Loading weights" bars
    from transformers.utils import logging as _hf_logging
    _hf_logging.disable_progress_bar()
except ImportError:
    pass

DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# (name, messages). Every case is rendered with and without the generation prompt.
CASES = [
    ("single_turn_default_system", [
        {"role": "user", "content": "What is 12 + 30?"},
        {"role": "assistant", "content": "The answer is 42."}]),
    ("custom_system", [
        {"role": "system", "content": "You add numbers."},
        {"role": "user", "content": "What is 12 + 30?"},
        {"role": "assistant", "content": "The answer is 42."}]),
    ("multi_turn_custom_system", [
        {"role": "system", "content": "Answer in one sentence."},
        {"role": "user", "content": "Write a short poem about the sea."},
        {"role": "assistant", "content": "The sea is wide, the sea is deep."},
        {"role": "user", "content": "And Paris?"},
        {"role": "assistant", "content": "Paris is the capital of France."}]),
    ("multi_turn_default_system", [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "def add(a, b):"},
        {"role": "assistant", "content": "    return a + b\n"}]),
    ("prompt_only", [{"role": "user", "content": "Making a plan: first read the question."}]),
    ("system_mid_conversation", [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "ok"},
        {"role": "system", "content": "Now answer in German."},
        {"role": "user", "content": "Berlin?"},
        {"role": "assistant", "content": "Berlin ist die Hauptstadt."}]),
    ("unicode", [
        {"role": "user", "content": "用一句话介绍你自己。 Zürich ½ 🙂"},
        {"role": "assistant", "content": "我是一个乐于助人的助手。 Ça va? 👍🏽"}]),
    ("newlines", [
        {"role": "user", "content": "\n\nleading and trailing newlines\n"},
        {"role": "assistant", "content": "\nA reply that starts with a newline.\n\n"}]),
    ("empty_reply", [
        {"role": "user", "content": "Say nothing."},
        {"role": "assistant", "content": ""}]),
    ("special_token_in_content", [
        {"role": "user", "content": "What does <|im_end|> mean?"},
        {"role": "assistant", "content": "It ends a turn: <|im_end|>"}]),
    # Not NFC: "e" + U+0301 and the Angstrom sign; the tokenizer's NFC normalizer folds both, on both sides.
    ("not_nfc", [
        {"role": "user", "content": "Cafe\u0301 \u212b"},
        {"role": "assistant", "content": "e\u0301"}]),
]


def hf_ids(tok, messages, gen, **kw):
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, add_generation_prompt=gen, **kw)
    return list(out["input_ids"])


class ChatTemplate(ptkref.TempDirTestCase):
    def setUp(self):
        super().setUp()
        transformers = ptkref.need("transformers")
        self.tok_dir = ptkref.tiny_tokenizer(self.tmp / "tok")
        self.tok = transformers.AutoTokenizer.from_pretrained(str(self.tok_dir))

    def ptk_chat(self, convs, *flags, name="chat"):
        src = ptkref.write_jsonl(self.tmp / f"{name}.jsonl", [{"messages": m} for m in convs])
        out = self.tmp / f"{name}_out.jsonl"
        ptkref.ptk("tokenize", "--threads", 1, "--tokenizer", self.tok_dir, "--input", src, "--output", out,
                   "--chat", *flags)
        return [json.loads(l) for l in out.read_text(encoding="utf-8").splitlines()]

    def test_text_and_ids_equal_apply_chat_template(self):
        convs = [m for _, m in CASES]
        for gen in (False, True):
            ours = self.ptk_chat(convs, *(["--add-generation-prompt"] if gen else []), name=f"gen{int(gen)}")
            self.assertEqual(len(ours), len(CASES))
            for (name, messages), line in zip(CASES, ours):
                with self.subTest(case=name, add_generation_prompt=gen):
                    text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
                    self.assertEqual(line["ids"], hf_ids(self.tok, messages, gen))
                    # Byte-level BPE decodes losslessly (special tokens included), so ptk's ids decode to
                    # the text transformers rendered, up to the NFC normalizer both tokenizers run.
                    self.assertEqual(self.tok.decode(line["ids"], skip_special_tokens=False),
                                     unicodedata.normalize("NFC", text))
                    # The template's own choices, so that a test that passed on an empty rendering fails.
                    if messages[0]["role"] != "system":
                        self.assertTrue(text.startswith(f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"))
                    self.assertEqual(text.endswith("<|im_start|>assistant\n"), gen)

    def test_assistant_mask_is_trls_training_template_mask_without_the_template_newlines(self):
        ptkref.need("trl")
        from trl import chat_template_utils
        # What SFTTrainer(assistant_only_loss=True) does with Qwen2.5's template: get_training_chat_template
        # swaps in TRL's training variant. It matches the template text exactly, and TRL's copy ends in a
        # newline that this one (as shipped in tokenizer_config.json) lacks; Jinja drops a single trailing
        # newline, so both render the same.
        self.tok.chat_template += "\n"
        training_template = chat_template_utils.get_training_chat_template(self.tok)
        self.assertEqual(training_template, chat_template_utils.qwen2_5_training_chat_template)
        # The published template has no {% generation %} block: transformers marks nothing.
        plain = self.tok.apply_chat_template(CASES[0][1], tokenize=True, return_dict=True,
                                             return_assistant_tokens_mask=True)
        self.assertNotIn(1, plain["assistant_masks"])
        cases = [(n, m) for n, m in CASES if any(x["role"] == "assistant" for x in m)]
        ours = self.ptk_chat([m for _, m in cases], "--with-mask", name="mask")
        newline = self.tok.convert_tokens_to_ids("\u010a")  # byte-level "\n"
        im_end = self.tok.convert_tokens_to_ids("<|im_end|>")
        header_end = self.tok("<|im_start|>assistant", add_special_tokens=False)["input_ids"][-1]
        for (name, messages), line in zip(cases, ours):
            with self.subTest(case=name):
                trl_out = self.tok.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                       return_assistant_tokens_mask=True,
                                                       chat_template=training_template)
                ids, trl_mask = list(trl_out["input_ids"]), list(trl_out["assistant_masks"])
                # TRL's training variant renders the same tokens as the published template.
                self.assertEqual(ids, hf_ids(self.tok, messages, False))
                self.assertEqual(line["ids"], ids)
                # Pinned difference: TRL's block also covers the "\n" after "<|im_start|>assistant" and the
                # "\n" after "<|im_end|>"; both are written by the template (the generation prompt ends in
                # the first; generation stops before the second), so ptk trains on neither. A reply that
                # starts with "\n" merges with the header's newline into one token: that token is in both.
                expected = list(trl_mask)
                after_im_end = 0
                for i, t in enumerate(ids):
                    if trl_mask[i] and t == newline and i > 0 and ids[i - 1] in (header_end, im_end):
                        expected[i] = 0
                        after_im_end += ids[i - 1] == im_end
                turns = sum(1 for x in messages if x["role"] == "assistant")
                self.assertEqual(after_im_end, turns, "TRL's block ends after the newline that follows <|im_end|>")
                self.assertEqual(line["assistant_mask"], expected)
                # What ptk's mask keeps decodes to the replies and their <|im_end|>, nothing of the prompt.
                kept = [t for t, k in zip(ids, line["assistant_mask"]) if k]
                want = "".join(unicodedata.normalize("NFC", x["content"]) + "<|im_end|>"
                               for x in messages if x["role"] == "assistant")
                self.assertEqual(self.tok.decode(kept, skip_special_tokens=False), want)

    def test_tools_render_as_transformers_renders_them(self):
        call = {"type": "function", "function": {"name": "add", "arguments": {"a": 12, "b": 30}}}
        tool_schema = {"type": "function", "function": {
            "name": "add", "description": "Adds two integers.",
            "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                           "required": ["a", "b"]}}}
        user = {"role": "user", "content": "What is 12 + 30?"}
        with_call = [user, {"role": "assistant", "content": "", "tool_calls": [call]}]
        null_content = [user, {"role": "assistant", "content": None, "tool_calls": [call]}]
        with_result = with_call + [{"role": "tool", "content": "42"}, {"role": "assistant", "content": "It is 42."}]
        records = [({"messages": with_call}, None), ({"messages": null_content}, None),
                   ({"messages": with_result}, None), ({"messages": [user], "tools": [tool_schema]}, [tool_schema]),
                   ({"messages": with_result, "tools": json.dumps([tool_schema])}, [tool_schema])]
        src = ptkref.write_jsonl(self.tmp / "tools.jsonl", [r for r, _ in records])
        out = self.tmp / "tools_out.jsonl"
        ptkref.ptk("tokenize", "--threads", 1, "--tokenizer", self.tok_dir, "--input", src, "--output", out, "--chat")
        lines = [json.loads(l) for l in out.read_text(encoding="utf-8").splitlines()]
        self.assertEqual(len(lines), len(records))
        for i, ((record, tools), line) in enumerate(zip(records, lines)):
            with self.subTest(record=i):
                text = self.tok.apply_chat_template(record["messages"], tools=tools, tokenize=False)
                # Each form changes the text, so a test that ignored them would fail here.
                self.assertTrue("<tool_call>" in text or "# Tools" in text, text)
                self.assertEqual(line["ids"], hf_ids(self.tok, record["messages"], False, tools=tools))
        # `ptk generate` renders "messages" lines with their "tools" too.
        model = ptkref.tiny_qwen2(self.tmp / "model", self.tok_dir)
        src = ptkref.write_jsonl(self.tmp / "gen.jsonl", [{"messages": [user], "tools": [tool_schema]}])
        ptkref.ptk("generate", "--threads", 1, "--model", model, "--input", src, "--output", self.tmp / "gen_out.jsonl",
                   "--temperature", 0, "--max-new-tokens", 2)
        # Training data: an SFT record with tools and tool calls is prepared (no bad record).
        src = ptkref.write_jsonl(self.tmp / "sft.jsonl", [{"messages": with_result, "tools": [tool_schema]}])
        p = ptkref.ptk("prepare", "--threads", 1, "--tokenizer", self.tok_dir, "--input", src, "--output",
                       self.tmp / "prepared", "--format", "sft")
        manifest = json.loads((self.tmp / "prepared" / "manifest.json").read_text())
        self.assertEqual(manifest["counts"]["skipped"], 0, p.stdout)
        self.assertEqual(manifest["tokens"]["written"], len(hf_ids(self.tok, with_result, False, tools=[tool_schema])))


if __name__ == "__main__":
    ptkref.main()
