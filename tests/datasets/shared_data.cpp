// Field mappings from ../shared/data's sets to docs/DESIGN.md's formats (see shared_data.h and
// ../shared/data/README.md for each set's own fields). Not part of ptk.
#include "tests/datasets/shared_data.h"

#include <rapidjson/document.h>

#include <fstream>
#include <functional>
#include <map>
#include <sstream>

#include "core/util/fs.h"
#include "core/util/json.h"

namespace ptk::test {

namespace {

using Value = rapidjson::Value;
using Msgs = std::vector<std::pair<std::string, std::string>>;  // role, content

std::string jstr(const std::string& s) {
  rapidjson::Value v(s.data(), static_cast<rapidjson::SizeType>(s.size()));
  return json::to_string(v);
}
std::string str(const Value& v) {
  if (v.IsString()) return std::string(v.GetString(), v.GetStringLength());
  return json::to_string(v);
}
std::string msgs_json(const Msgs& m) {
  std::string out = "[";
  for (size_t i = 0; i < m.size(); ++i)
    out += (i ? "," : "") + std::string("{\"role\":") + jstr(m[i].first) + ",\"content\":" + jstr(m[i].second) + "}";
  return out + "]";
}

// Calls fn for each record of a JSON array file or a JSONL file (whatever the extension says).
void for_each_record(const std::string& path, const std::function<void(const Value&)>& fn) {
  std::string text = read_file(path);
  size_t first = text.find_first_not_of(" \t\r\n");
  if (first != std::string::npos && text[first] == '[') {
    rapidjson::Document d = json::parse(text, path);
    for (const auto& v : d.GetArray()) fn(v);
    return;
  }
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    rapidjson::Document d = json::parse(line, path);
    fn(d);
  }
}

// Alpaca layout: history [[user, assistant], ...], then instruction (+ "\n\n" + input) -> output.
Msgs alpaca_messages(const Value& r) {
  Msgs m;
  if (r.HasMember("history") && r["history"].IsArray())
    for (const auto& h : r["history"].GetArray()) {
      m.emplace_back("user", str(h[0]));
      m.emplace_back("assistant", str(h[1]));
    }
  std::string user = str(r["instruction"]);
  if (r.HasMember("input") && r["input"].IsString() && r["input"].GetStringLength() > 0) user += "\n\n" + str(r["input"]);
  m.emplace_back("user", user);
  return m;
}

// ShareGPT layout: [{from: system|human|gpt, value}] -> messages.
Msgs sharegpt_messages(const Value& conv) {
  Msgs m;
  for (const auto& t : conv.GetArray()) {
    std::string from = str(t["from"]);
    m.emplace_back(from == "human" ? "user" : from == "gpt" ? "assistant" : from, str(t["value"]));
  }
  return m;
}

// The last \boxed{...} of a solution (braces matched), or "".
std::string last_boxed(const std::string& s) {
  size_t at = s.rfind("\\boxed{");
  if (at == std::string::npos) return "";
  size_t i = at + 7;
  int depth = 1;
  std::string out;
  for (; i < s.size(); ++i) {
    if (s[i] == '{') ++depth;
    if (s[i] == '}' && --depth == 0) return out;
    out += s[i];
  }
  return "";
}

// The common prefix of two HH-RLHF transcripts up to the last "\n\nAssistant:" they share.
size_t hh_prompt_end(const std::string& a, const std::string& b) {
  size_t n = 0;
  while (n < a.size() && n < b.size() && a[n] == b[n]) ++n;
  size_t at = a.rfind("\n\nAssistant:", n >= 12 ? n - 12 : 0);
  return at == std::string::npos ? std::string::npos : at + 12;
}

}  // namespace

std::vector<MappedSet> map_shared_data(const std::string& d) {
  using data::Format;
  std::vector<MappedSet> out;
  auto add = [&](std::string name, Format f, std::string source, std::string mapping) -> MappedSet& {
    out.push_back({std::move(name), f, std::move(source), std::move(mapping), {}});
    return out.back();
  };

  // --- SFT: messages --------------------------------------------------------------------------
  for (auto [name, file] : std::vector<std::pair<std::string, std::string>>{
           {"sft/lima", "sft/lima/lima.json"},
           {"sft/oasst1_zh", "sft/oasst1_zh/oaast_sft_zh.json"},
           {"sft/alpaca_en_demo", "sft/llamafactory_demo/alpaca_en_demo.json"},
           {"sft/alpaca_zh_demo", "sft/llamafactory_demo/alpaca_zh_demo.json"}}) {
    auto& s = add(name, Format::kSft, file,
                  "messages: history pairs as user/assistant turns, then instruction (+\"\\n\\n\"+input) as user, output as assistant");
    for_each_record(d + "/" + file, [&](const Value& r) {
      Msgs m = alpaca_messages(r);
      m.emplace_back("assistant", str(r["output"]));
      s.lines.push_back("{\"messages\":" + msgs_json(m) + "}");
    });
  }
  {
    auto& s = add("sft/sharegpt_zh", Format::kSft, "sft/sharegpt_zh/sharegpt_zh_1K_format.jsonl",
                  "messages: conversations[].from human->user, gpt->assistant, value->content");
    for_each_record(d + "/" + s.source, [&](const Value& r) {
      s.lines.push_back("{\"messages\":" + msgs_json(sharegpt_messages(r["conversations"])) + "}");
    });
  }
  {
    auto& s = add("sft/mt_bench", Format::kSft, "sft/mt_bench/question.jsonl + reference_answer/gpt-4.jsonl",
                  "messages: the 2 question turns and GPT-4's 2 reference turns, joined on question_id (30 with answers)");
    std::map<int64_t, std::vector<std::string>> answers;
    for_each_record(d + "/sft/mt_bench/reference_answer/gpt-4.jsonl", [&](const Value& r) {
      std::vector<std::string> t;
      for (const auto& x : r["choices"][0]["turns"].GetArray()) t.push_back(str(x));
      answers[r["question_id"].GetInt64()] = t;
    });
    for_each_record(d + "/sft/mt_bench/question.jsonl", [&](const Value& r) {
      auto it = answers.find(r["question_id"].GetInt64());
      if (it == answers.end()) return;
      Msgs m;
      for (size_t i = 0; i < r["turns"].Size() && i < it->second.size(); ++i) {
        m.emplace_back("user", str(r["turns"][i]));
        m.emplace_back("assistant", it->second[i]);
      }
      s.lines.push_back("{\"messages\":" + msgs_json(m) + "}");
    });
  }
  // --- SFT: prompt/completion and text ----------------------------------------------------------
  for (auto [name, file] : std::vector<std::pair<std::string, std::string>>{
           {"sft/self_instruct_seed", "sft/self_instruct/seed_tasks.jsonl"},
           {"sft/self_instruct_user", "sft/self_instruct/user_oriented_instructions.jsonl"},
           {"sft/belle_zh_seed", "sft/belle/zh_seed_tasks.json"}}) {
    auto& s = add(name, Format::kSft, file,
                  "prompt/completion: prompt = instruction (+\"\\n\\n\"+instances[0].input), completion = instances[0].output");
    for_each_record(d + "/" + file, [&](const Value& r) {
      const Value& inst = r["instances"][0];
      std::string prompt = str(r["instruction"]);
      if (inst.HasMember("input") && inst["input"].GetStringLength() > 0) prompt += "\n\n" + str(inst["input"]);
      s.lines.push_back("{\"prompt\":" + jstr(prompt) + ",\"completion\":" + jstr(str(inst["output"])) + "}");
    });
  }
  {
    auto& s = add("sft/belle_eval", Format::kSft, "sft/belle/eval_set.json",
                  "prompt/completion: prompt = question, completion = std_answer (JSONL despite .json)");
    for_each_record(d + "/" + s.source, [&](const Value& r) {
      s.lines.push_back("{\"prompt\":" + jstr(str(r["question"])) + ",\"completion\":" + jstr(str(r["std_answer"])) + "}");
    });
  }
  {
    auto& s = add("sft/mt_bench_text", Format::kSft, "sft/mt_bench/question.jsonl",
                  "text: the question turns joined by a blank line (plain language-modeling text)");
    for_each_record(d + "/" + s.source, [&](const Value& r) {
      std::string t;
      for (const auto& x : r["turns"].GetArray()) t += (t.empty() ? "" : "\n\n") + str(x);
      s.lines.push_back("{\"text\":" + jstr(t) + "}");
    });
  }

  // --- preference --------------------------------------------------------------------------------
  {
    auto& s = add("preference/hh_rlhf", Format::kPreference, "preference/hh_rlhf/harmless-base/test.jsonl",
                  "strings: prompt = the shared transcript through the last shared \"\\n\\nAssistant:\", chosen/rejected = the rest "
                  "(rows whose transcripts share no such prefix are left out)");
    for_each_record(d + "/" + s.source, [&](const Value& r) {
      std::string c = str(r["chosen"]), rj = str(r["rejected"]);
      size_t end = hh_prompt_end(c, rj);
      if (end == std::string::npos || end >= c.size() || end >= rj.size()) return;
      s.lines.push_back("{\"prompt\":" + jstr(c.substr(0, end)) + ",\"chosen\":" + jstr(c.substr(end)) +
                        ",\"rejected\":" + jstr(rj.substr(end)) + "}");
    });
  }
  {
    auto& s = add("preference/oasst1_zh", Format::kPreference, "preference/oasst1_zh/oaast_rm_zh.json",
                  "message lists: prompt = history + instruction, chosen = output[0], rejected = output[1] (the source's pairwise rule)");
    for_each_record(d + "/" + s.source, [&](const Value& r) {
      Msgs p = alpaca_messages(r);
      s.lines.push_back("{\"prompt\":" + msgs_json(p) + ",\"chosen\":" + msgs_json({{"assistant", str(r["output"][0])}}) +
                        ",\"rejected\":" + msgs_json({{"assistant", str(r["output"][1])}}) + "}");
    });
  }
  for (auto [name, file] : std::vector<std::pair<std::string, std::string>>{
           {"preference/dpo_en_demo", "preference/llamafactory_demo/dpo_en_demo.json"},
           {"preference/dpo_zh_demo", "preference/llamafactory_demo/dpo_zh_demo.json"},
           {"preference/medicalgpt_dpo_zh", "preference/medicalgpt/dpo_zh_500.jsonl"}}) {
    auto& s = add(name, Format::kPreference, file,
                  "message lists: prompt = conversations (system/human/gpt), chosen/rejected = one assistant message "
                  "(an object's value, or the string itself)");
    for_each_record(d + "/" + file, [&](const Value& r) {
      auto reply = [&](const Value& v) { return msgs_json({{"assistant", v.IsObject() ? str(v["value"]) : str(v)}}); };
      s.lines.push_back("{\"prompt\":" + msgs_json(sharegpt_messages(r["conversations"])) + ",\"chosen\":" + reply(r["chosen"]) +
                        ",\"rejected\":" + reply(r["rejected"]) + "}");
    });
  }
  {
    auto& s = add("preference/alpaca_eval", Format::kPreference,
                  "preference/alpaca_eval/gpt-3.5-turbo-0301/alpaca_eval_gpt4/annotations.json",
                  "message lists: prompt = instruction; preference 1.0 -> chosen output_1, 2.0 -> chosen output_2; "
                  "ties (1.5) and the null row left out");
    for_each_record(d + "/" + s.source, [&](const Value& r) {
      if (!r["preference"].IsNumber()) return;
      double p = r["preference"].GetDouble();
      if (p != 1.0 && p != 2.0) return;
      std::string a = str(r["output_1"]), b = str(r["output_2"]);
      if (p == 2.0) std::swap(a, b);
      s.lines.push_back("{\"prompt\":" + msgs_json({{"user", str(r["instruction"])}}) + ",\"chosen\":" +
                        msgs_json({{"assistant", a}}) + ",\"rejected\":" + msgs_json({{"assistant", b}}) + "}");
    });
  }

  // --- RL prompts ----------------------------------------------------------------------------------
  for (auto file : {"math/gsm8k/train.jsonl", "math/gsm8k/test.jsonl"}) {
    auto& s = add(std::string("rl/") + file, Format::kRl, file,
                  "prompt = question (as a user message), answer = the text after \"#### \", solution = the full answer (extra field)");
    for_each_record(d + "/" + file, [&](const Value& r) {
      std::string sol = str(r["answer"]);
      size_t at = sol.rfind("#### ");
      s.lines.push_back("{\"prompt\":" + msgs_json({{"user", str(r["question"])}}) + ",\"answer\":" +
                        jstr(at == std::string::npos ? "" : sol.substr(at + 5)) + ",\"solution\":" + jstr(sol) + "}");
    });
  }
  {
    auto& s = add("rl/mgsm", Format::kRl, "math/mgsm/mgsm_*.tsv",
                  "prompt = the question column (string), answer = the number column, lang = the file's language (extra field)");
    for (const char* lang : {"bn", "de", "en", "es", "fr", "ja", "ru", "sw", "te", "th", "zh"}) {
      std::istringstream in(read_file(d + "/math/mgsm/mgsm_" + lang + ".tsv"));
      std::string line;
      while (std::getline(in, line)) {
        size_t tab = line.find('\t');
        if (tab == std::string::npos) continue;
        std::string ans = line.substr(tab + 1);
        if (!ans.empty() && ans.back() == '\r') ans.pop_back();
        s.lines.push_back("{\"prompt\":" + jstr(line.substr(0, tab)) + ",\"answer\":" + jstr(ans) + ",\"lang\":\"" + lang + "\"}");
      }
    }
  }
  {
    auto& s = add("rl/svamp", Format::kRl, "math/svamp/SVAMP.json",
                  "prompt = Body + \" \" + Question, answer = Answer (a JSON number), Equation and Type kept as extra fields");
    for_each_record(d + "/" + s.source, [&](const Value& r) {
      s.lines.push_back("{\"prompt\":" + jstr(str(r["Body"]) + " " + str(r["Question"])) + ",\"answer\":" +
                        json::to_string(r["Answer"]) + ",\"equation\":" + jstr(str(r["Equation"])) + ",\"type\":" +
                        jstr(str(r["Type"])) + "}");
    });
  }
  struct EvalSet {
    const char* name;
    const char* prompt;
    const char* answer;  // "" = \boxed{} of solution
  };
  for (EvalSet e : {EvalSet{"math500", "problem", "answer"}, EvalSet{"asdiv", "question", "answer"},
                    EvalSet{"mawps", "input", "target"}, EvalSet{"cmath", "question", "answer"},
                    EvalSet{"cn_middle_school", "question", "answer"}, EvalSet{"gaokao2023en", "question", "answer"},
                    EvalSet{"aime24", "problem", "answer"}, EvalSet{"amc23", "problem", "answer"},
                    EvalSet{"minerva_math", "problem", ""}}) {
    std::string file = std::string("math/eval/") + e.name + "/test.jsonl";
    std::string mapping = std::string("prompt = ") + (std::string(e.name) == "asdiv" ? "body + \" \" + question" : e.prompt) +
                          ", answer = " + (*e.answer ? e.answer : "the last \\boxed{} of solution") + ", every other field kept";
    auto& s = add(std::string("rl/") + e.name, Format::kRl, file, mapping);
    for_each_record(d + "/" + file, [&](const Value& r) {
      rapidjson::Document o;
      o.CopyFrom(r, o.GetAllocator());
      std::string prompt = str(r[e.prompt]);
      if (std::string(e.name) == "asdiv") prompt = str(r["body"]) + " " + prompt;
      std::string answer = *e.answer ? str(r[e.answer]) : last_boxed(str(r["solution"]));
      // Rename the source's own "answer" when it is not the answer we keep (none here), then set ours.
      o.RemoveMember("prompt");
      o.RemoveMember("answer");
      o.AddMember("prompt", rapidjson::Value(prompt.c_str(), o.GetAllocator()), o.GetAllocator());
      o.AddMember("answer", rapidjson::Value(answer.c_str(), o.GetAllocator()), o.GetAllocator());
      s.lines.push_back(json::to_string(o));
    });
  }
  return out;
}

std::vector<std::string> unmapped_shared_files() {
  return {
      "sft/llamafactory_demo/glaive_toolcall_{en,zh}_demo.json: tool-call conversations (function_call/observation turns); "
      "ShareGPT function_call/observation turns are refused (TRL-format tool_calls in messages are read), so these are not mapped",
      "preference/llamafactory_demo/kto_en_demo.json: KTO (single completions with a bool label), not pairs; no ptk format",
      "preference/hh_rlhf/harmless-base/test.jsonl.gz: the same rows as test.jsonl (read as .gz by readers_reference_test)",
  };
}

std::vector<std::string> shared_chat_conversations(const std::string& data_dir) {
  std::vector<std::string> out;
  for (auto& set : map_shared_data(data_dir)) {
    if (set.format != data::Format::kSft) continue;
    for (auto& line : set.lines) {
      const std::string head = "{\"messages\":";
      // Conversations without an assistant turn are bad sft records (the reader refuses them).
      if (line.compare(0, head.size(), head) == 0 && line.find("{\"role\":\"assistant\"") != std::string::npos)
        out.push_back(line.substr(head.size(), line.size() - head.size() - 1));
    }
  }
  return out;
}

}  // namespace ptk::test
