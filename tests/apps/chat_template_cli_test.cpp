// The chat template on the command line, end to end on make-data's byte tokenizer and a tiny random
// model: --chat-template (a .jinja file, inline text, a built-in name) reaches every command that
// renders chats (tokenize, prepare, sft, dpo, rm, grpo, generate, eval); the template a stage used is
// written into its checkpoints and final/ (tokenizer_config.json, and chat_template.jinja when the
// tokenizer folder has that form); a tokenizer folder without a usable template fails prepare once,
// naming the file, instead of once per record.
#include <gtest/gtest.h>

#include <filesystem>

#include "core/util/fs.h"
#include "core/util/json.h"
#include "tests/support/test_util.h"
#include "tests/support/tiny_model_json.h"

namespace ptk {
namespace {

// Every content rendered with an "X" in front: visible in the ids ('X' is byte id 88).
const char* kMark =
    "{% for m in messages %}<|im_start|>{{ m.role }}\nX{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

size_t count(const std::string& s, const std::string& what) {
  size_t n = 0;
  for (size_t p = s.find(what); p != std::string::npos; p = s.find(what, p + 1)) ++n;
  return n;
}

std::string chat_template_of(const std::string& config_path) {
  auto d = json::parse_file(config_path);
  return d.HasMember("chat_template") && d["chat_template"].IsString() ? d["chat_template"].GetString() : "";
}

class ChatTemplateCli : public ::testing::Test {
 protected:
  void SetUp() override {
    auto r = test::run(ptk() + " make-data arithmetic --out " + d_.file("data") + " --train 8 --eval 4 --tokenizer bytes");
    ASSERT_EQ(r.exit_code, 0) << r.out;
    mark_ = d_.write("mark.jinja", kMark);
    d_.write("model.json", test::kTinyByteModelJson);
    // transformers 5's form: no chat_template in tokenizer_config.json, chat_template.jinja beside it.
    std::filesystem::create_directories(d_.file("tok5"));
    std::filesystem::copy_file(d_.file("data/tokenizer.json"), d_.file("tok5/tokenizer.json"));
    auto cfg = json::parse_file(d_.file("data/tokenizer_config.json"));
    d_.write("tok5/chat_template.jinja", cfg["chat_template"].GetString());
    cfg.RemoveMember("chat_template");
    d_.write("tok5/tokenizer_config.json", json::to_string(cfg));
    // No template at all.
    std::filesystem::create_directories(d_.file("bare"));
    std::filesystem::copy_file(d_.file("data/tokenizer.json"), d_.file("bare/tokenizer.json"));
    d_.write("bare/tokenizer_config.json", json::to_string(cfg));
  }
  static std::string ptk() { return test::ptk_binary() + " "; }
  std::string stage_recipe(const std::string& name, const std::string& model, const std::string& tok,
                           const std::string& data, const std::string& extra = "") const {
    return d_.write(name + ".json", "{\"model\": {" + model + "},\n \"tokenizer\": {\"path\": \"" + tok + "\"},\n" +
                                        " \"run\": {\"dir\": \"" + d_.file(name) + "\"},\n" +
                                        " \"data\": {\"train\": [\"" + data + "\"], \"max_seq_len\": 128},\n" +
                                        " \"train\": {\"max_steps\": 1, \"micro_batch_size\": 2},\n" +
                                        " \"checkpoint\": {\"every\": 1}" + extra + "}\n");
  }
  test::TempDir d_;
  std::string mark_;
};

TEST_F(ChatTemplateCli, OverrideReachesEveryCommandAndIsWrittenIntoFinal) {
  // tokenize: the file's template, not the folder's ChatML.
  d_.write("one.jsonl", "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"b\"}]}\n");
  auto t = test::run(ptk() + "tokenize --tokenizer " + d_.file("data") + " --input " + d_.file("one.jsonl") + " --output " +
                     d_.file("one_out.jsonl") + " --chat --with-mask --chat-template " + mark_);
  ASSERT_EQ(t.exit_code, 0) << t.out;
  std::string ids = read_file(d_.file("one_out.jsonl"));
  EXPECT_EQ(count(ids, ",88,"), 2u) << ids;  // "X" before each content
  // prepare: the rows change with the template, and the manifest names it (and its text's hash).
  auto p = test::run(ptk() + "prepare --quiet --tokenizer " + d_.file("data") + " --input " + d_.file("data/sft_train.jsonl") +
                     " --output " + d_.file("prep_mark") + " --chat-template " + mark_);
  ASSERT_EQ(p.exit_code, 0) << p.out;
  auto plain = test::run(ptk() + "prepare --quiet --tokenizer " + d_.file("data") + " --input " +
                         d_.file("data/sft_train.jsonl") + " --output " + d_.file("prep_plain"));
  ASSERT_EQ(plain.exit_code, 0) << plain.out;
  auto m1 = json::parse_file(d_.file("prep_mark/manifest.json")), m0 = json::parse_file(d_.file("prep_plain/manifest.json"));
  EXPECT_EQ(std::string(m1["key"]["chat_template"].GetString()), mark_);
  EXPECT_TRUE(m1["key"].HasMember("chat_template_sha256"));
  EXPECT_EQ(m1["tokens"]["written"].GetInt64(), m0["tokens"]["written"].GetInt64() + 16);  // 8 records x 2 messages

  // sft from the transformers-5-form folder: final/ and the checkpoint carry the template in both places.
  std::string sft = stage_recipe("sft", "\"config\": \"" + d_.file("model.json") + "\"", d_.file("tok5"),
                                 d_.file("data/sft_train.jsonl"));
  auto s = test::run(ptk() + "sft --threads 1 --recipe " + sft + " --chat-template " + mark_);
  ASSERT_EQ(s.exit_code, 0) << s.out;
  for (const char* dir : {"sft/final", "sft/checkpoints/step-1"}) {
    SCOPED_TRACE(dir);
    EXPECT_EQ(chat_template_of(d_.file(dir) + "/tokenizer_config.json"), kMark);
    EXPECT_EQ(read_file(d_.file(dir) + "/chat_template.jinja"), kMark);
  }
  auto saved = json::parse_file(d_.file("sft/config.json"));
  EXPECT_NE(json::to_string(saved).find(mark_), std::string::npos) << "the run's recipe records the override";
  // Without an override the folder's files are copied as they are.
  std::string sft2 = stage_recipe("sft2", "\"config\": \"" + d_.file("model.json") + "\"", d_.file("tok5"),
                                  d_.file("data/sft_train.jsonl"));
  ASSERT_EQ(test::run(ptk() + "sft --threads 1 --recipe " + sft2).exit_code, 0);
  EXPECT_EQ(read_file(d_.file("sft2/final/chat_template.jinja")), read_file(d_.file("tok5/chat_template.jinja")));
  EXPECT_EQ(chat_template_of(d_.file("sft2/final/tokenizer_config.json")), "");

  // dpo, rm, grpo: the same flag, the same written template. (The sft model folder renders with kMark.)
  const std::string from_sft = "\"path\": \"" + d_.file("sft/final") + "\"";
  struct Stage {
    const char* name;
    std::string data, extra;
  };
  for (const Stage& st : {Stage{"dpo", d_.file("data/preference_train.jsonl"), ""},
                          Stage{"rm", d_.file("data/preference_train.jsonl"), ""},
                          Stage{"grpo", d_.file("data/rl_train.jsonl"),
                                ",\n \"grpo\": {\"num_generations\": 2, \"max_completion_length\": 4, "
                                "\"reward_funcs\": [\"math\"]}"}}) {
    SCOPED_TRACE(st.name);
    std::string recipe = stage_recipe(st.name, from_sft, d_.file("data"), st.data, st.extra);
    auto r = test::run(ptk() + st.name + " --threads 1 --recipe " + recipe + " --chat-template chatml");
    ASSERT_EQ(r.exit_code, 0) << r.out;
    std::string written = chat_template_of(d_.file(st.name) + "/final/tokenizer_config.json");
    EXPECT_NE(written.find("<|im_start|>"), std::string::npos) << written;
    EXPECT_EQ(written.find("X{{"), std::string::npos) << "chatml, not the model folder's template: " << written;
  }

  // generate and eval render chat prompts with the flag's template: an inline one that refuses proves it.
  d_.write("msgs.jsonl", "{\"messages\": [{\"role\": \"user\", \"content\": \"What is 1 + 2?\"}]}\n");
  const std::string refuse = " --chat-template \"{{ raise_exception('refused by the override') }}\"";
  auto g = test::run(ptk() + "generate --threads 1 --model " + d_.file("sft/final") + " --input " + d_.file("msgs.jsonl") +
                     " --output " + d_.file("gen.jsonl") + " --max-new-tokens 2 --temperature 0" + refuse);
  EXPECT_NE(g.exit_code, 0);
  EXPECT_NE(g.out.find("refused by the override"), std::string::npos) << g.out;
  auto g_ok = test::run(ptk() + "generate --threads 1 --model " + d_.file("sft/final") + " --input " + d_.file("msgs.jsonl") +
                        " --output " + d_.file("gen.jsonl") + " --max-new-tokens 2 --temperature 0 --chat-template chatml");
  EXPECT_EQ(g_ok.exit_code, 0) << g_ok.out;
  auto e = test::run(ptk() + "eval --threads 1 --model " + d_.file("sft/final") + " --data " + d_.file("data/rl_eval.jsonl") +
                     " --output " + d_.file("eval.json") + " --max-new-tokens 2" + refuse);
  EXPECT_NE(e.exit_code, 0);
  EXPECT_NE(e.out.find("refused by the override"), std::string::npos) << e.out;
}

TEST_F(ChatTemplateCli, AFolderWithoutATemplateFailsOnceNamingIt) {
  auto r = test::run(ptk() + "prepare --quiet --tokenizer " + d_.file("bare") + " --input " + d_.file("data/sft_train.jsonl") +
                     " --output " + d_.file("prep"));
  EXPECT_NE(r.exit_code, 0) << r.out;
  EXPECT_EQ(count(r.out, "has no chat template"), 1u) << r.out;
  EXPECT_NE(r.out.find(d_.file("bare/tokenizer_config.json")), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("--chat-template"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("on_error"), std::string::npos) << r.out;
  EXPECT_FALSE(path_exists(d_.file("prep/manifest.json")));
  // A template that does not parse, named on the command line: refused at once, naming the file.
  std::string bad = d_.write("bad.jinja", "{% for %}");
  auto b = test::run(ptk() + "prepare --quiet --tokenizer " + d_.file("bare") + " --input " + d_.file("data/sft_train.jsonl") +
                     " --output " + d_.file("prep") + " --chat-template " + bad);
  EXPECT_NE(b.exit_code, 0);
  EXPECT_NE(b.out.find(bad), std::string::npos) << b.out;
  EXPECT_EQ(b.out.find("on_error"), std::string::npos) << b.out;
  // The override makes it work.
  auto ok = test::run(ptk() + "prepare --quiet --tokenizer " + d_.file("bare") + " --input " + d_.file("data/sft_train.jsonl") +
                      " --output " + d_.file("prep") + " --chat-template chatml");
  EXPECT_EQ(ok.exit_code, 0) << ok.out;
}

}  // namespace
}  // namespace ptk
