// Chat templates rendered by the Jinja interpreter, on make-data's byte-level tokenizer (every byte
// its own id, <|im_start|>/<|im_end|> added tokens), so a mask reads as the text it covers: where the
// template comes from (auto: tokenizer_config.json, its list form, chat_template.jinja; qwen2.5 /
// chatml built in; a file; inline), what the context holds (special tokens, kwargs, tools, null
// members dropped), and the assistant masks: prefix-preserving templates, Qwen3's (history turns
// lose <think>), {% generation %} blocks, tool calls, and the conversations refused with the turn named.
#include <gtest/gtest.h>

#include <functional>

#include "core/tokenizer/messages_json.h"
#include "core/tokenizer/tokenizer.h"
#include "core/util/error.h"
#include "core/util/fs.h"
#include "core/util/json.h"
#include "tests/support/test_util.h"
#include "tests/tokenizer/golden.h"

namespace ptk::tokenizer {
namespace {

using test::data_dir;

std::string byte_json() { return read_file(data_dir() + "/bytelevel_chatml.json"); }

// A tokenizer_config.json with `tmpl` as its chat_template and Qwen's special tokens.
std::string config_with(const std::string& tmpl) {
  rapidjson::Document d(rapidjson::kObjectType);
  auto& a = d.GetAllocator();
  d.AddMember("eos_token", "<|im_end|>", a);
  d.AddMember("pad_token", "<|endoftext|>", a);
  d.AddMember("bos_token", rapidjson::Value(), a);
  d.AddMember("chat_template", rapidjson::Value(tmpl.c_str(), a), a);
  return json::to_string(d);
}

Tokenizer with_template(const std::string& tmpl, LoadOptions o = {}) {
  return Tokenizer::from_json(byte_json(), config_with(tmpl), "tok/tokenizer.json", o);
}

Tokenizer qwen3() { return with_template(read_file(data_dir() + "/qwen3_chat_template.jinja")); }

// The rendering with each masked run in [ ]: what is trained, read off the text.
std::string marked(const Tokenizer& t, const ChatEncoding& e) {
  std::string out;
  bool in = false;
  for (size_t i = 0; i < e.ids.size(); ++i) {
    if (e.assistant_mask[i] != in) out += in ? "]" : "[";
    in = e.assistant_mask[i];
    out += t.decode({e.ids[i]});
  }
  if (in) out += "]";
  return out;
}

std::vector<Message> parse(const char* json_text) { return parse_messages(json::parse(json_text, "test"), "test"); }

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(ChatTemplate, PrefixPreservingTemplateMasksContentAndImEnd) {
  Tokenizer t = Tokenizer::from_json(byte_json(), "", "tok/tokenizer.json", {ChatTemplate::kQwen25});
  auto e = t.render_chat({{"system", "S"}, {"user", "Q1"}, {"assistant", "A1"}, {"user", "Q2"}, {"assistant", "A2"}});
  EXPECT_EQ(marked(t, e),
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\n[A1<|im_end|>]\n"
            "<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n[A2<|im_end|>]\n");
  EXPECT_EQ(t.chat_template(), ChatTemplate::kQwen25);
  EXPECT_TRUE(t.chat_template_overridden());
  // chatml: no default system prompt; the generation prompt is not trained.
  Tokenizer c = Tokenizer::from_json(byte_json(), "", "tok/tokenizer.json", {ChatTemplate::kChatML});
  EXPECT_EQ(marked(c, c.render_chat({{"user", "1+2="}, {"assistant", "3"}}, true)),
            "<|im_start|>user\n1+2=<|im_end|>\n<|im_start|>assistant\n[3<|im_end|>]\n<|im_start|>assistant\n");
}

TEST(ChatTemplate, Qwen3HistoryTurnsKeepWhatTheHistoryRenders) {
  Tokenizer t = qwen3();
  EXPECT_EQ(t.chat_template(), ChatTemplate::kJinja);
  EXPECT_FALSE(t.chat_template_overridden());
  auto e = t.render_chat({{"user", "Q1"},
                          {"assistant", "<think>r1</think>A1"},
                          {"user", "Q2"},
                          {"assistant", "<think>r2</think>A2"}});
  // The first turn's <think> block is dropped from the history: its span is what the history keeps.
  EXPECT_EQ(marked(t, e),
            "<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\n[A1<|im_end|>]\n<|im_start|>user\nQ2<|im_end|>\n"
            "<|im_start|>assistant\n[<think>\nr2\n</think>\n\nA2<|im_end|>]\n");
  // A plain answer gets the empty think block the template writes for the last turn, trained.
  EXPECT_EQ(marked(t, t.render_chat({{"user", "Q"}, {"assistant", "A"}})),
            "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n[<think>\n\n</think>\n\nA<|im_end|>]\n");
  // reasoning_content instead of <think> in the content.
  auto r = parse(R"([{"role":"user","content":"Q"},{"role":"assistant","content":"A","reasoning_content":"R"}])");
  EXPECT_EQ(marked(t, t.render_chat(r)),
            "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n[<think>\nR\n</think>\n\nA<|im_end|>]\n");
  // enable_thinking=false through the tokenizer's kwargs, and a conversation's kwargs overriding them.
  LoadOptions o;
  o.chat_template_kwargs = R"({"enable_thinking": false})";
  Tokenizer nt = with_template(read_file(data_dir() + "/qwen3_chat_template.jinja"), o);
  EXPECT_EQ(nt.render_chat_text({{"user", "Q"}}, true),
            "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n");
  ChatExtras think;
  think.kwargs = R"({"enable_thinking": true})";
  EXPECT_EQ(nt.render_chat_text({{"user", "Q"}}, true, think), "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n");
  // Kwargs cannot replace what the rendering sets itself (a record's {"messages": 1} once replaced
  // the list being filled); transformers raises a TypeError for these.
  for (const char* key : {"messages", "tools", "documents", "add_generation_prompt"}) {
    ChatExtras bad;
    bad.kwargs = std::string("{\"") + key + "\": 1}";
    try {
      nt.render_chat({{"user", "Q"}, {"assistant", "A"}}, false, SIZE_MAX, bad);
      ADD_FAILURE() << key;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(std::string("\"") + key + "\" is set by the chat rendering"), std::string::npos)
          << e.what();
    }
    LoadOptions lo;
    lo.chat_template_kwargs = std::string("{\"") + key + "\": []}";
    EXPECT_THROW(with_template(read_file(data_dir() + "/qwen3_chat_template.jinja"), lo), Error) << key;
  }
}

TEST(ChatTemplate, GenerationBlocksGiveTheMaskExactly) {
  const std::string tmpl =
      "{% for m in messages %}{% if m.role == 'assistant' %}<|im_start|>assistant\n{% generation %}"
      "{{ m.content }}<|im_end|>\n{% endgeneration %}{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
      "{% endif %}{% endfor %}";
  Tokenizer t = with_template(tmpl);
  // The span holds the "\n" after <|im_end|>: with generation blocks the template decides, as in transformers.
  EXPECT_EQ(marked(t, t.render_chat({{"user", "Q"}, {"assistant", "A"}, {"user", "Q2"}, {"assistant", "B"}})),
            "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n[A<|im_end|>\n]<|im_start|>user\nQ2<|im_end|>\n"
            "<|im_start|>assistant\n[B<|im_end|>\n]");
}

TEST(ChatTemplate, ToolCallsRenderAsTheTemplateRendersThem) {
  Tokenizer t = Tokenizer::from_json(byte_json(), "", "tok/tokenizer.json", {ChatTemplate::kQwen25});
  auto m = parse(R"([{"role":"user","content":"1+2?"},
    {"role":"assistant","content":null,"tool_calls":[{"type":"function","function":{"name":"add","arguments":{"a":1,"b":2}}}]},
    {"role":"tool","content":"3","tool_call_id":"c1"},
    {"role":"assistant","content":"It is 3."}])");
  ASSERT_EQ(m.size(), 4u);
  EXPECT_EQ(m[1].content, "");
  EXPECT_NE(m[1].json.find("tool_calls"), std::string::npos);
  EXPECT_EQ(m[1].json.find("\"content\""), std::string::npos);  // null members are dropped
  EXPECT_TRUE(m[0].json.empty());
  ChatExtras tools;
  tools.tools = R"([{"type":"function","function":{"name":"add","parameters":{}}}])";
  auto e = t.render_chat(m, false, SIZE_MAX, tools);
  const std::string sys_head = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\n# Tools";
  EXPECT_EQ(e.text.compare(0, sys_head.size(), sys_head), 0) << e.text;
  std::string want_tail =
      "<|im_start|>user\n1+2?<|im_end|>\n<|im_start|>assistant\n[<tool_call>\n{\"name\": \"add\", \"arguments\": "
      "{\"a\": 1, \"b\": 2}}\n</tool_call><|im_end|>]\n<|im_start|>user\n<tool_response>\n3\n</tool_response><|im_end|>\n"
      "<|im_start|>assistant\n[It is 3.<|im_end|>]\n";
  std::string got = marked(t, e);
  ASSERT_GE(got.size(), want_tail.size());
  EXPECT_EQ(got.substr(got.size() - want_tail.size()), want_tail);
  // Without tools the system turn has no "# Tools" block.
  EXPECT_EQ(t.render_chat_text(m).find("# Tools"), std::string::npos);
}

TEST(ChatTemplate, RefusesConversationsWithoutASpanNamingTheTurn) {
  // Assistant turns replaced in the history: the first one keeps nothing.
  Tokenizer hide = with_template(
      "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' and not loop.last %}[hidden]\n"
      "{% else %}{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
      "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}");
  std::string e = error_of([&] { hide.render_chat({{"user", "Q"}, {"assistant", "A"}, {"user", "Q2"}, {"assistant", "B"}}); });
  EXPECT_NE(e.find("messages[1] (assistant)"), std::string::npos) << e;
  EXPECT_NE(e.find("keeps nothing"), std::string::npos) << e;
  // Assistant turns left out of the history: the whole rendering does not continue the generation prompt.
  Tokenizer drop = with_template(
      "{% for m in messages %}{% if m.role != 'assistant' or loop.last %}<|im_start|>{{ m.role }}\n{{ m.content }}"
      "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}");
  e = error_of([&] { drop.render_chat({{"user", "Q"}, {"assistant", "A"}, {"user", "Q2"}, {"assistant", "B"}}); });
  EXPECT_NE(e.find("messages[1] (assistant)"), std::string::npos) << e;
  EXPECT_NE(e.find("whole conversation"), std::string::npos) << e;
  // A generation prompt the turn does not continue.
  Tokenizer other = with_template(
      "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
      "{% if add_generation_prompt %}<|im_start|>model\n{% endif %}");
  e = error_of([&] { other.render_chat({{"user", "Q"}, {"assistant", "A"}}); });
  EXPECT_NE(e.find("messages[1] (assistant)"), std::string::npos) << e;
  // The text alone is still rendered (prompts, generation).
  EXPECT_EQ(other.render_chat_text({{"user", "Q"}}, true), "<|im_start|>user\nQ<|im_end|>\n<|im_start|>model\n");
  // raise_exception in the template: the template's message.
  Tokenizer strict = with_template("{{ raise_exception('roles must alternate') }}");
  e = error_of([&] { strict.render_chat_text({{"user", "Q"}}); });
  EXPECT_NE(e.find("roles must alternate"), std::string::npos) << e;
  Tokenizer q = qwen3();
  EXPECT_NE(error_of([&] { q.render_chat({}); }).find("at least one message"), std::string::npos);
  EXPECT_NE(error_of([&] { q.render_chat({{"narrator", "x"}}); }).find("narrator"), std::string::npos);
}

TEST(ChatTemplate, ContextHoldsSpecialTokensToolsAndNoNulls) {
  Tokenizer t = with_template(
      "{{ eos_token }}|{{ pad_token }}|{{ bos_token is defined }}|{{ tools is none }}|"
      "{% for m in messages %}{{ m.name is defined }}{{ m.content is defined }}{% endfor %}");
  auto m = parse(R"([{"role":"user","content":"x","name":null},{"role":"assistant","tool_calls":[]}])");
  EXPECT_EQ(t.render_chat_text(m), "<|im_end|>|<|endoftext|>|False|True|FalseTrueFalseFalse");
  ChatExtras x;
  x.tools = "[]";
  EXPECT_EQ(t.render_chat_text(m, false, x), "<|im_end|>|<|endoftext|>|False|False|FalseTrueFalseFalse");
}

TEST(ChatTemplate, WhereTheTemplateComesFrom) {
  ptk::test::TempDir dir;
  dir.write("tokenizer.json", byte_json());
  // No template at all: auto refuses once, naming the file and the override.
  Tokenizer none = Tokenizer::load(dir.path());
  std::string e = error_of([&] { none.chat_template(); });
  EXPECT_NE(e.find(dir.file("tokenizer_config.json")), std::string::npos) << e;
  EXPECT_NE(e.find("tokenizer.chat_template"), std::string::npos) << e;
  EXPECT_THROW(none.render_chat_text({{"user", "x"}}), ChatTemplateError);
  EXPECT_EQ(none.encode("ab").size(), 2u);  // plain text still works
  // tokenizer_config.json's list form: "default", and "tool_use" when tools are given.
  dir.write("tokenizer_config.json",
            R"({"chat_template": [{"name": "default", "template": "D{{ messages|length }}"},
                                  {"name": "tool_use", "template": "T{{ tools|length }}"}]})");
  Tokenizer list = Tokenizer::load(dir.path());
  EXPECT_EQ(list.render_chat_text({{"user", "x"}}), "D1");
  ChatExtras tools;
  tools.tools = R"([{"name": "f"}])";
  EXPECT_EQ(list.render_chat_text({{"user", "x"}}, false, tools), "T1");
  // chat_template.jinja beside it wins (transformers 5 saves the template there).
  dir.write("chat_template.jinja", "J{{ messages[0].content }}");
  Tokenizer file = Tokenizer::load(dir.path());
  EXPECT_EQ(file.render_chat_text({{"user", "x"}}), "Jx");
  EXPECT_EQ(file.chat_template_origin(), dir.file("chat_template.jinja"));
  EXPECT_EQ(file.chat_template_source(), "J{{ messages[0].content }}");
  // Overrides: a file, inline text, the built-in names.
  std::string other = dir.write("other.jinja", "O{{ messages[0].role }}");
  EXPECT_EQ(Tokenizer::load(dir.path(), chat_load_options(other)).render_chat_text({{"user", "x"}}), "Ouser");
  EXPECT_EQ(Tokenizer::load(dir.path(), chat_load_options("I{{ 1 + 1 }}")).render_chat_text({{"user", "x"}}), "I2");
  EXPECT_EQ(Tokenizer::load(dir.path(), chat_load_options("chatml")).chat_template(), ChatTemplate::kChatML);
  EXPECT_EQ(chat_load_options("auto").chat_template, ChatTemplate::kAuto);
  e = error_of([&] { chat_load_options(dir.file("missing.jinja")); });
  EXPECT_NE(e.find("missing.jinja"), std::string::npos) << e;
  EXPECT_THROW(chat_load_options("auto", "[1]"), Error);
  // A template that does not parse: named override fails at load, naming the file; the folder's own
  // fails when a chat is rendered (ChatTemplateError, once per tokenizer, not per conversation).
  std::string bad = dir.write("bad.jinja", "{% for %}");
  e = error_of([&] { Tokenizer::load(dir.path(), chat_load_options(bad)); });
  EXPECT_NE(e.find("bad.jinja"), std::string::npos) << e;
  dir.write("chat_template.jinja", "{% if %}");
  Tokenizer broken = Tokenizer::load(dir.path());
  EXPECT_THROW(broken.chat_template(), ChatTemplateError);
  e = error_of([&] { broken.chat_template(); });
  EXPECT_NE(e.find("chat_template.jinja"), std::string::npos) << e;
}

TEST(ChatTemplate, MaxIdsKeepsTheHeadOfTheWholeRendering) {
  Tokenizer t = qwen3();
  std::vector<Message> m = {{"user", std::string(300, 'q')}, {"assistant", "<think>r</think>" + std::string(300, 'a')},
                            {"user", "Q2"}, {"assistant", "B"}};
  ChatEncoding whole = t.render_chat(m);
  for (size_t n : {1, 40, 330, 1000}) {
    ChatEncoding head = t.render_chat(m, false, n);
    size_t k = std::min(n, whole.ids.size());
    EXPECT_EQ(head.ids, std::vector<TokenId>(whole.ids.begin(), whole.ids.begin() + k)) << n;
    EXPECT_EQ(head.assistant_mask, std::vector<uint8_t>(whole.assistant_mask.begin(), whole.assistant_mask.begin() + k)) << n;
  }
  // head_messages keeps a message's other members.
  auto calls = parse(R"([{"role":"assistant","content":"abcdef","tool_calls":[]}])");
  auto cut = head_messages({&calls}, 3);
  ASSERT_EQ(cut.size(), 1u);
  EXPECT_EQ(cut[0].content, "abc");
  EXPECT_EQ(cut[0].json, calls[0].json);
}

TEST(ChatTemplate, MessageParsing) {
  auto err = [](const char* j) { return error_of([&] { parse_messages(json::parse(j, "t"), "f.jsonl:3: messages"); }); };
  EXPECT_NE(err(R"([{"role":"user","content":"x","tool_calls":[]}])").find("f.jsonl:3: messages[0].tool_calls on a user"),
            std::string::npos);
  EXPECT_NE(err(R"([{"role":"assistant"}])").find("messages[0].content missing"), std::string::npos);
  EXPECT_NE(err(R"([{"role":"bot","content":"x"}])").find("not one of system, user, assistant, tool"), std::string::npos);
  EXPECT_NE(err(R"([{"role":"user","content":[{"type":"text"}]}])").find("content parts"), std::string::npos);
  ChatExtras x;
  std::string reason;
  EXPECT_TRUE(read_chat_extras(json::parse(R"({"tools": "[{\"name\": \"f\"}]"})", "t"), &x, &reason));
  EXPECT_EQ(x.tools, R"([{"name":"f"}])");
  EXPECT_FALSE(read_chat_extras(json::parse(R"({"tools": {"name": "f"}})", "t"), &x, &reason));
  EXPECT_NE(reason.find("\"tools\" must be a list"), std::string::npos) << reason;
  EXPECT_TRUE(read_chat_extras(json::parse(R"({"chat_template_kwargs": {"enable_thinking": false}})", "t"), &x, &reason));
  EXPECT_EQ(x.kwargs, R"({"enable_thinking":false})");
}

}  // namespace
}  // namespace ptk::tokenizer
