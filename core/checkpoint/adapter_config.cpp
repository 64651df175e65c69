// PEFT adapter_config.json (torch-free). See adapter_config.h.
#include "core/checkpoint/adapter_config.h"

#include <rapidjson/document.h>
#include <rapidjson/prettywriter.h>
#include <rapidjson/stringbuffer.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <regex>
#include <set>
#include <cstdio>
#include <cstdlib>

#include "core/util/error.h"
#include "core/util/fs.h"
#include "core/util/json.h"

namespace ptk::checkpoint {
namespace {

using rapidjson::Value;

const Value* member(const Value& o, const char* key) {
  auto it = o.FindMember(key);
  if (it == o.MemberEnd() || it->value.IsNull()) return nullptr;
  return &it->value;
}

[[noreturn]] void refuse(const std::string& origin, const std::string& what) {
  throw Error(origin + ": " + what + "\n---> HINT: ptk loads plain LoRA adapters on Qwen2 linears (PEFT's LoraConfig "
              "with r, lora_alpha, lora_dropout, target_modules, use_rslora, modules_to_save); merge this adapter "
              "with PEFT (merge_and_unload) and pass the merged folder instead.");
}

bool empty_or_false(const Value* v) {
  if (!v) return true;
  if (v->IsBool()) return !v->GetBool();
  if (v->IsObject()) return v->MemberCount() == 0;
  if (v->IsArray()) return v->Empty();
  if (v->IsString()) return v->GetStringLength() == 0;
  return false;
}

std::vector<std::string> string_list(const Value& v, const std::string& origin, const char* key) {
  std::vector<std::string> out;
  if (v.IsString()) return {v.GetString()};
  if (!v.IsArray()) refuse(origin, std::string("\"") + key + "\" must be a list of module names");
  for (auto& e : v.GetArray()) {
    if (!e.IsString()) refuse(origin, std::string("\"") + key + "\" must be a list of module names");
    out.emplace_back(e.GetString());
  }
  return out;
}

// The shortest text that reads back as `x` (Python's repr); integral values without a fraction.
std::string format_number(double x) {
  if (std::floor(x) == x && std::fabs(x) < 1e15) return std::to_string(static_cast<int64_t>(x));
  char buf[64];
  for (int digits = 1; digits <= 17; ++digits) {
    std::snprintf(buf, sizeof buf, "%.*g", digits, x);
    if (std::strtod(buf, nullptr) == x) break;
  }
  return buf;
}

}  // namespace

double AdapterConfig::scaling() const {
  return use_rslora ? lora_alpha / std::sqrt(static_cast<double>(r)) : lora_alpha / static_cast<double>(r);
}

bool AdapterConfig::targets(const std::string& module) const {
  // "all-linear" (PEFT expands it when it creates an adapter; a hand-written config may keep it):
  // every linear of a decoder layer, which is all ptk ever asks about.
  if (target_regex && *target_regex == "all-linear") return module.rfind("model.layers.", 0) == 0;
  if (target_regex) return std::regex_match(module, std::regex(*target_regex));
  for (const auto& t : target_modules) {
    if (module == t) return true;
    if (module.size() > t.size() && module.compare(module.size() - t.size(), t.size(), t) == 0 &&
        module[module.size() - t.size() - 1] == '.')
      return true;
  }
  return false;
}

bool is_adapter_folder(const std::string& dir) {
  return std::filesystem::is_directory(dir) && path_exists(dir + "/" + kAdapterConfigFile);
}

AdapterConfig parse_adapter_config(const std::string& text, const std::string& origin) {
  auto doc = json::parse(text, origin);
  if (!doc.IsObject()) refuse(origin, "not a JSON object");
  AdapterConfig c;
  if (auto* v = member(doc, "peft_type"); v && (!v->IsString() || std::string(v->GetString()) != "LORA"))
    refuse(origin, "peft_type is " + json::to_string(*v) + ", ptk reads LORA adapters only");
  if (auto* v = member(doc, "base_model_name_or_path")) {
    if (!v->IsString()) refuse(origin, "base_model_name_or_path must be a string");
    c.base_model = v->GetString();
  }
  if (auto* v = member(doc, "task_type")) {
    if (!v->IsString()) refuse(origin, "task_type must be a string");
    c.task_type = v->GetString();
    if (c.task_type != "CAUSAL_LM" && c.task_type != "SEQ_CLS")
      refuse(origin, "task_type " + c.task_type + ": ptk has CAUSAL_LM and SEQ_CLS (reward models)");
  }
  if (auto* v = member(doc, "r")) {
    if (!v->IsInt64() || v->GetInt64() < 1) refuse(origin, "r must be an integer >= 1");
    c.r = v->GetInt64();
  }
  if (auto* v = member(doc, "lora_alpha")) {
    if (!v->IsNumber()) refuse(origin, "lora_alpha must be a number");
    c.lora_alpha = v->GetDouble();
  }
  if (auto* v = member(doc, "lora_dropout")) {
    if (!v->IsNumber() || v->GetDouble() < 0 || v->GetDouble() >= 1) refuse(origin, "lora_dropout must be in [0, 1)");
    c.lora_dropout = v->GetDouble();
  }
  if (auto* v = member(doc, "use_rslora")) {
    if (!v->IsBool()) refuse(origin, "use_rslora must be true or false");
    c.use_rslora = v->GetBool();
  }
  if (auto* v = member(doc, "init_lora_weights")) {
    if (v->IsBool()) c.init_lora_weights = v->GetBool() ? "true" : "false";
    else if (v->IsString()) c.init_lora_weights = v->GetString();
    // PiSSA, OLoRA, CorDA, LoftQ, EVA... adapters go onto a base modified at initialisation (the
    // residual, or a quantized one): merged onto the original base they would give another model.
    if (c.init_lora_weights != "true" && c.init_lora_weights != "false" && c.init_lora_weights != "gaussian")
      refuse(origin, "init_lora_weights is " + json::to_string(*v) + ": such an adapter belongs on a base PEFT "
             "changed when it made it (convert it first with PEFT's path_initial_model_for_weight_conversion)");
  }
  if (auto* v = member(doc, "target_modules")) {
    if (v->IsString()) {
      c.target_regex = v->GetString();
      if (*c.target_regex != "all-linear") try {
        std::regex check(*c.target_regex);
      } catch (const std::regex_error& e) {
        refuse(origin, "target_modules " + json::to_string(*v) + " is not a regular expression ptk can read: " + e.what());
      }
    } else {
      c.target_modules = string_list(*v, origin, "target_modules");
    }
  }
  if (!c.target_regex && c.target_modules.empty()) refuse(origin, "target_modules is empty");
  if (auto* v = member(doc, "modules_to_save")) {
    for (auto& m : string_list(*v, origin, "modules_to_save")) {
      // PEFT adds these three for SEQ_CLS; a Qwen2 model has only `score` of them.
      if (m == "classifier" || m == "pre_classifier") continue;
      if (m != "score" && m != "embed_tokens" && m != "lm_head")
        refuse(origin, "modules_to_save holds \"" + m + "\"; ptk saves score, embed_tokens and lm_head only");
      if (std::find(c.modules_to_save.begin(), c.modules_to_save.end(), m) == c.modules_to_save.end())
        c.modules_to_save.push_back(m);
    }
  }
  if (auto* v = member(doc, "bias"); v && !(v->IsString() && std::string(v->GetString()) == "none"))
    refuse(origin, "bias is " + json::to_string(*v) + "; ptk trains no biases in adapters (bias=\"none\")");
  const char* unsupported[] = {"use_dora", "lora_bias", "fan_in_fan_out", "rank_pattern", "alpha_pattern",
                               "layers_to_transform", "layer_replication", "use_qalora", "target_parameters",
                               "trainable_token_indices", "alora_invocation_tokens", "exclude_modules"};
  for (const char* k : unsupported)
    if (!empty_or_false(member(doc, k))) refuse(origin, std::string(k) + " is set (" + json::to_string(*member(doc, k)) + ")");
  return c;
}

AdapterConfig read_adapter_config(const std::string& dir) {
  const std::string file = dir + "/" + kAdapterConfigFile;
  return parse_adapter_config(read_file(file), file);
}

std::string adapter_config_json(const AdapterConfig& c) {
  // Keys in sorted order, as PEFT's to_json_string (json.dumps(sort_keys=True, indent=2)).
  auto str = [](const std::string& s) {
    rapidjson::StringBuffer b;
    rapidjson::Writer<rapidjson::StringBuffer> w(b);
    w.String(s.c_str(), static_cast<rapidjson::SizeType>(s.size()));
    return std::string(b.GetString(), b.GetSize());
  };
  auto list = [&](const std::vector<std::string>& v) {
    if (v.empty()) return std::string("null");
    std::string out = "[\n";
    for (size_t i = 0; i < v.size(); ++i) out += "    " + str(v[i]) + (i + 1 < v.size() ? ",\n" : "\n");
    return out + "  ]";
  };
  std::vector<std::pair<std::string, std::string>> kv = {
      {"alpha_pattern", "{}"},
      {"base_model_name_or_path", c.base_model.empty() ? "null" : str(c.base_model)},
      {"bias", "\"none\""},
      {"exclude_modules", "null"},
      {"fan_in_fan_out", "false"},
      {"inference_mode", "true"},
      {"init_lora_weights", c.init_lora_weights == "true" ? "true" : c.init_lora_weights == "false" ? "false" : str(c.init_lora_weights)},
      {"layers_pattern", "null"},
      {"layers_to_transform", "null"},
      {"lora_alpha", format_number(c.lora_alpha)},
      {"lora_bias", "false"},
      {"lora_dropout", format_number(c.lora_dropout) + (std::floor(c.lora_dropout) == c.lora_dropout ? ".0" : "")},
      {"modules_to_save", list(c.modules_to_save)},
      {"peft_type", "\"LORA\""},
      {"r", std::to_string(c.r)},
      {"rank_pattern", "{}"},
      {"revision", "null"},
      {"target_modules", c.target_regex ? str(*c.target_regex) : list(c.target_modules)},
      {"task_type", str(c.task_type)},
      {"use_dora", "false"},
      {"use_rslora", c.use_rslora ? "true" : "false"},
  };
  std::string out = "{\n";
  for (size_t i = 0; i < kv.size(); ++i)
    out += "  \"" + kv[i].first + "\": " + kv[i].second + (i + 1 < kv.size() ? ",\n" : "\n");
  return out + "}";
}

std::string adapter_base_dir(const std::string& adapter_dir) {
  const AdapterConfig c = read_adapter_config(adapter_dir);
  const std::string file = adapter_dir + "/" + kAdapterConfigFile;
  if (c.base_model.empty())
    throw Error(file + ": base_model_name_or_path is not set, so the model this adapter belongs to is unknown"
                "\n---> HINT: set it to the base model's folder, or merge with `ptk merge-lora --model BASE --adapter " +
                adapter_dir + " --output DIR`.");
  std::string base = c.base_model;
  if (base.front() != '/') {
    const std::string rel = resolve_path(adapter_dir, base);
    if (std::filesystem::is_directory(rel)) base = rel;
  }
  if (!std::filesystem::is_directory(base))
    throw Error(file + ": base_model_name_or_path \"" + c.base_model + "\" is not a folder on this machine (ptk reads "
                "no Hub ids)\n---> HINT: download the base model and set base_model_name_or_path to its folder, or "
                "merge with `ptk merge-lora --model BASE --adapter " + adapter_dir + " --output DIR`.");
  return base;
}

std::string model_root_dir(const std::string& dir) {
  std::string d = dir;
  for (int depth = 0; is_adapter_folder(d); ++depth) {
    if (depth == 8) throw Error(dir + ": more than 8 adapter folders chained through base_model_name_or_path");
    d = adapter_base_dir(d);
  }
  return d;
}

std::optional<int64_t> folder_pad_token_id(const std::string& dir) {
  const std::string cfg = dir + "/tokenizer_config.json", tok = dir + "/tokenizer.json";
  if (!path_exists(cfg) || !path_exists(tok)) return std::nullopt;
  auto c = json::parse_file(cfg);
  auto token_text = [&](const char* key) -> std::string {
    const Value* v = c.IsObject() ? member(c, key) : nullptr;
    if (!v) return "";
    if (v->IsString()) return v->GetString();
    if (v->IsObject())
      if (auto* s = member(*v, "content"); s && s->IsString()) return s->GetString();
    return "";
  };
  std::string want = token_text("pad_token");
  if (want.empty()) want = token_text("eos_token");
  if (want.empty()) return std::nullopt;
  auto t = json::parse_file(tok);
  if (!t.IsObject()) return std::nullopt;
  if (auto* added = member(t, "added_tokens"); added && added->IsArray())
    for (auto& a : added->GetArray())
      if (a.IsObject())
        if (auto* content = member(a, "content"); content && content->IsString() && want == content->GetString())
          if (auto* id = member(a, "id"); id && id->IsInt64()) return id->GetInt64();
  return std::nullopt;
}

}  // namespace ptk::checkpoint
