// config.json / generation_config.json parsing and writing for Qwen2 (torch-free).
// Not model construction (see core/model/qwen2.h).
#include "core/checkpoint/hf_config.h"

#include "core/checkpoint/adapter_config.h"

#include <rapidjson/document.h>
#include <rapidjson/prettywriter.h>
#include <rapidjson/stringbuffer.h>

#include <algorithm>
#include <cmath>
#include <filesystem>

#include "core/util/error.h"
#include "core/util/fs.h"
#include "core/util/json.h"

namespace ptk::checkpoint {
namespace {

using rapidjson::Value;

struct Reader {
  const Value& obj;
  const std::string& origin;

  [[noreturn]] void bad(const char* key, const std::string& want) const {
    throw Error(origin + ": field \"" + key + "\" must be " + want + "\n---> HINT: fix config.json or re-save it "
                "with transformers' save_pretrained.");
  }
  const Value* get(const char* key) const {
    auto it = obj.FindMember(key);
    if (it == obj.MemberEnd() || it->value.IsNull()) return nullptr;
    return &it->value;
  }
  void int64(const char* key, int64_t* out, int64_t min_value = 1) const {
    if (auto* v = get(key)) {
      if (!v->IsInt64()) bad(key, "an integer");
      if (v->GetInt64() < min_value) bad(key, ">= " + std::to_string(min_value));
      *out = v->GetInt64();
    }
  }
  void number(const char* key, double* out) const {
    if (auto* v = get(key)) {
      if (!v->IsNumber()) bad(key, "a number");
      *out = v->GetDouble();
    }
  }
  void boolean(const char* key, bool* out) const {
    if (auto* v = get(key)) {
      if (!v->IsBool()) bad(key, "true or false");
      *out = v->GetBool();
    }
  }
  void string(const char* key, std::string* out) const {
    if (auto* v = get(key)) {
      if (!v->IsString()) bad(key, "a string");
      *out = v->GetString();
    }
  }
  void opt_int(const char* key, std::optional<int64_t>* out) const {
    if (auto* v = get(key)) {
      if (!v->IsInt64()) bad(key, "an integer or null");
      *out = v->GetInt64();
    }
  }
};

void sort_keys(Value& v) {
  if (v.IsObject()) {
    std::sort(v.MemberBegin(), v.MemberEnd(), [](const Value::Member& a, const Value::Member& b) {
      return std::string(a.name.GetString(), a.name.GetStringLength()) <
             std::string(b.name.GetString(), b.name.GetStringLength());
    });
    for (auto m = v.MemberBegin(); m != v.MemberEnd(); ++m) sort_keys(m->value);
  } else if (v.IsArray()) {
    for (auto& e : v.GetArray()) sort_keys(e);
  }
}

std::string pretty_sorted(rapidjson::Document& doc) {
  sort_keys(doc);
  rapidjson::StringBuffer buf;
  rapidjson::PrettyWriter<rapidjson::StringBuffer> w(buf);
  w.SetIndent(' ', 2);
  doc.Accept(w);
  return std::string(buf.GetString(), buf.GetSize()) + "\n";
}

void set(rapidjson::Document& d, const char* key, Value v) {
  auto& a = d.GetAllocator();
  auto it = d.FindMember(key);
  if (it != d.MemberEnd()) {
    it->value = v;
  } else {
    d.AddMember(Value(key, a), v, a);
  }
}

}  // namespace

Qwen2Config parse_config(const std::string& json_text, const std::string& origin) {
  auto doc = json::parse(json_text, origin);
  if (!doc.IsObject()) throw Error(origin + ": config.json is not a JSON object");
  Reader r{doc, origin};
  Qwen2Config c;
  c.raw_json = json_text;

  std::string model_type = "qwen2";
  r.string("model_type", &model_type);
  if (auto* a = r.get("architectures")) {
    if (!a->IsArray() || a->Size() != 1 || !(*a)[0].IsString())
      r.bad("architectures", "a list with one architecture name");
    c.architecture = (*a)[0].GetString();
  }
  if (c.architecture != "Qwen2ForCausalLM" && c.architecture != "Qwen2ForSequenceClassification")
    throw Error(origin + ": architecture " + c.architecture + " is not supported; ptk implements Qwen2ForCausalLM "
                "and Qwen2ForSequenceClassification (model_type qwen2, the Qwen2 / Qwen2.5 family).");
  if (model_type != "qwen2")
    throw Error(origin + ": model_type \"" + model_type + "\" is not supported; ptk implements model_type \"qwen2\" "
                "(Qwen2 / Qwen2.5).");

  r.int64("vocab_size", &c.vocab_size);
  r.int64("hidden_size", &c.hidden_size);
  r.int64("intermediate_size", &c.intermediate_size);
  r.int64("num_hidden_layers", &c.num_hidden_layers);
  r.int64("num_attention_heads", &c.num_attention_heads);
  c.num_key_value_heads = c.num_attention_heads;  // transformers: None means MHA
  r.int64("num_key_value_heads", &c.num_key_value_heads);
  r.int64("max_position_embeddings", &c.max_position_embeddings);
  r.string("hidden_act", &c.hidden_act);
  r.number("initializer_range", &c.initializer_range);
  r.number("rms_norm_eps", &c.rms_norm_eps);
  r.number("rope_theta", &c.rope_theta);
  r.boolean("use_cache", &c.use_cache);
  r.boolean("tie_word_embeddings", &c.tie_word_embeddings);
  r.boolean("use_sliding_window", &c.use_sliding_window);
  r.number("attention_dropout", &c.attention_dropout);
  r.opt_int("bos_token_id", &c.bos_token_id);
  r.opt_int("pad_token_id", &c.pad_token_id);
  r.string("dtype", &c.torch_dtype);        // transformers 5.x
  r.string("torch_dtype", &c.torch_dtype);  // transformers 4.x (5.x reads it too)
  if (auto* e = r.get("eos_token_id")) {
    if (e->IsInt64()) {
      c.eos_token_ids.push_back(e->GetInt64());
    } else if (e->IsArray()) {
      for (const auto& x : e->GetArray()) {
        if (!x.IsInt64()) r.bad("eos_token_id", "an integer or a list of integers");
        c.eos_token_ids.push_back(x.GetInt64());
      }
    } else {
      r.bad("eos_token_id", "an integer or a list of integers");
    }
  }
  // Only meaningful with use_sliding_window; read for the round trip, validated only when used.
  if (auto* v = r.get("sliding_window"); v && v->IsInt64()) c.sliding_window = v->GetInt64();
  if (auto* v = r.get("max_window_layers"); v && v->IsInt64()) c.max_window_layers = v->GetInt64();
  if (c.use_sliding_window)
    throw Error(origin + ": use_sliding_window is true; ptk has no sliding-window attention (no Qwen2.5 model uses "
                "it).\n---> HINT: set \"use_sliding_window\": false if the model was trained with full attention.");
  if (c.hidden_act != "silu")
    throw Error(origin + ": hidden_act \"" + c.hidden_act + "\" is not supported; Qwen2 uses \"silu\" (SwiGLU).");
  if (c.attention_dropout != 0.0)
    throw Error(origin + ": attention_dropout " + std::to_string(c.attention_dropout) +
                " is not supported; ptk trains without dropout (Qwen2.5 uses 0.0).");
  if (c.architecture == "Qwen2ForSequenceClassification") {
    if (auto* v = r.get("num_labels")) {
      if (!v->IsInt64()) r.bad("num_labels", "an integer");
      c.num_labels = v->GetInt64();
    } else if (auto* l = r.get("id2label"); l && l->IsObject()) {
      c.num_labels = l->MemberCount();
    }
    if (c.num_labels != 1)
      throw Error(origin + ": Qwen2ForSequenceClassification with " + std::to_string(c.num_labels) +
                  " labels; ptk reward models have one scalar score (num_labels 1).");
  }

  if (c.hidden_size % c.num_attention_heads != 0 && !r.get("head_dim"))
    throw Error(origin + ": hidden_size " + std::to_string(c.hidden_size) + " is not divisible by num_attention_heads " +
                std::to_string(c.num_attention_heads));
  c.head_dim = c.hidden_size / c.num_attention_heads;
  r.int64("head_dim", &c.head_dim);
  if (c.head_dim % 2 != 0) throw Error(origin + ": head_dim " + std::to_string(c.head_dim) + " must be even (RoPE)");
  if (c.num_attention_heads % c.num_key_value_heads != 0)
    throw Error(origin + ": num_attention_heads " + std::to_string(c.num_attention_heads) +
                " is not a multiple of num_key_value_heads " + std::to_string(c.num_key_value_heads));
  if (!(c.rms_norm_eps > 0)) r.bad("rms_norm_eps", "positive");
  if (!(c.rope_theta > 0)) r.bad("rope_theta", "positive");

  // RoPE scaling: transformers 4.x writes rope_scaling {"type" | "rope_type", ...} beside a top-level
  // rope_theta; transformers 5.x writes rope_parameters {"rope_type", "rope_theta", ...} instead (and
  // reads the older keys into it). Both are read; rope_parameters wins where both are present.
  auto read_rope = [&](const rapidjson::Value& v, const std::string& key) {
    if (!v.IsObject()) r.bad(key.c_str(), "an object or null");
    Reader s{v, origin};
    if (key == "rope_parameters") {
      s.number("rope_theta", &c.rope_theta);
      if (!(c.rope_theta > 0)) r.bad("rope_parameters.rope_theta", "positive");
    }
    RopeScaling y;
    s.string("type", &y.type);
    s.string("rope_type", &y.type);  // newer transformers spell it rope_type
    if (y.type == "default") {
      // transformers >= 4.45 may write {"rope_type": "default"}: plain RoPE.
      c.rope_scaling.reset();
    } else if (y.type != "yarn") {
      throw Error(origin + ": " + key + " type \"" + y.type + "\" is not supported; ptk implements \"yarn\" "
                  "(Qwen2.5's long-context setting).\n---> HINT: remove " + key + " to run at the native context.");
    } else {
      s.number("factor", &y.factor);
      if (!(y.factor >= 1.0)) s.bad((key + ".factor").c_str(), ">= 1");
      s.int64("original_max_position_embeddings", &y.original_max_position_embeddings);
      if (auto* af = s.get("attention_factor")) {
        if (!af->IsNumber()) s.bad((key + ".attention_factor").c_str(), "a number");
        y.attention_factor = af->GetDouble();
      }
      s.number("beta_fast", &y.beta_fast);
      s.number("beta_slow", &y.beta_slow);
      c.rope_scaling = y;
    }
  };
  if (auto* rs = r.get("rope_scaling")) read_rope(*rs, "rope_scaling");
  if (auto* rp = r.get("rope_parameters")) read_rope(*rp, "rope_parameters");
  return c;
}

Qwen2Config read_config(const std::string& path) {
  // A folder means its config.json; read_file names a missing file, a folder or a FIFO as such (a
  // folder without config.json used to be read as an empty text: "The document is empty").
  // An adapter folder (PEFT) means its base model's config.json (core/checkpoint/adapter_config.h).
  std::string file = std::filesystem::is_directory(path) ? model_root_dir(path) + "/config.json" : path;
  if (!path_exists(file))
    throw Error(file + ": no such file\n---> HINT: pass a Hugging Face model folder (config.json + *.safetensors).");
  return parse_config(read_file(file), file);
}

std::string config_to_json(const Qwen2Config& c) {
  rapidjson::Document raw;
  if (!c.raw_json.empty()) {
    raw = json::parse(c.raw_json, "config.json");
  } else {
    raw.SetObject();
  }
  rapidjson::Document d;
  d.CopyFrom(raw, d.GetAllocator());
  auto& a = d.GetAllocator();
  auto str = [&](const std::string& s) { return Value(s.c_str(), static_cast<rapidjson::SizeType>(s.size()), a); };
  Value arch(rapidjson::kArrayType);
  arch.PushBack(str(c.architecture), a);
  set(d, "architectures", std::move(arch));
  set(d, "model_type", str("qwen2"));
  set(d, "vocab_size", Value(c.vocab_size));
  set(d, "hidden_size", Value(c.hidden_size));
  set(d, "intermediate_size", Value(c.intermediate_size));
  set(d, "num_hidden_layers", Value(c.num_hidden_layers));
  set(d, "num_attention_heads", Value(c.num_attention_heads));
  set(d, "num_key_value_heads", Value(c.num_key_value_heads));
  if (d.HasMember("head_dim") || c.head_dim * c.num_attention_heads != c.hidden_size)
    set(d, "head_dim", Value(c.head_dim));
  set(d, "max_position_embeddings", Value(c.max_position_embeddings));
  set(d, "hidden_act", str(c.hidden_act));
  set(d, "initializer_range", Value(c.initializer_range));
  set(d, "rms_norm_eps", Value(c.rms_norm_eps));
  set(d, "rope_theta", Value(c.rope_theta));
  if (auto rp = d.FindMember("rope_parameters"); rp != d.MemberEnd() && rp->value.IsObject()) {
    // transformers 5.x reads rope_theta from here first
    auto th = rp->value.FindMember("rope_theta");
    if (th != rp->value.MemberEnd()) th->value = Value(c.rope_theta);
    else rp->value.AddMember("rope_theta", Value(c.rope_theta), a);
  }
  set(d, "use_cache", Value(c.use_cache));
  set(d, "tie_word_embeddings", Value(c.tie_word_embeddings));
  set(d, "use_sliding_window", Value(c.use_sliding_window));
  set(d, "sliding_window", Value(c.sliding_window));
  set(d, "max_window_layers", Value(c.max_window_layers));
  set(d, "attention_dropout", Value(c.attention_dropout));
  set(d, "torch_dtype", str(c.torch_dtype));
  if (d.HasMember("dtype")) set(d, "dtype", str(c.torch_dtype));  // transformers 5.x reads dtype first
  if (c.bos_token_id) set(d, "bos_token_id", Value(*c.bos_token_id));
  if (c.pad_token_id) set(d, "pad_token_id", Value(*c.pad_token_id));
  if (c.eos_token_ids.size() == 1) {
    set(d, "eos_token_id", Value(c.eos_token_ids[0]));
  } else if (!c.eos_token_ids.empty()) {
    Value e(rapidjson::kArrayType);
    for (int64_t id : c.eos_token_ids) e.PushBack(Value(id), a);
    set(d, "eos_token_id", std::move(e));
  }
  if (c.rope_scaling) {
    Value rs(rapidjson::kObjectType);
    rs.AddMember("type", str(c.rope_scaling->type), a);
    rs.AddMember("factor", Value(c.rope_scaling->factor), a);
    if (c.rope_scaling->original_max_position_embeddings > 0)
      rs.AddMember("original_max_position_embeddings", Value(c.rope_scaling->original_max_position_embeddings), a);
    if (c.rope_scaling->attention_factor) rs.AddMember("attention_factor", Value(*c.rope_scaling->attention_factor), a);
    if (c.rope_scaling->beta_fast != 32.0) rs.AddMember("beta_fast", Value(c.rope_scaling->beta_fast), a);
    if (c.rope_scaling->beta_slow != 1.0) rs.AddMember("beta_slow", Value(c.rope_scaling->beta_slow), a);
    // Keep the source's spelling ("type" vs "rope_type", extra keys) when it describes the same scaling.
    std::optional<RopeScaling> before;
    if (!c.raw_json.empty()) before = parse_config(c.raw_json, "config.json").rope_scaling;
    const auto& y = *c.rope_scaling;
    bool same = before && before->type == y.type && before->factor == y.factor &&
                before->original_max_position_embeddings == y.original_max_position_embeddings &&
                before->attention_factor == y.attention_factor && before->beta_fast == y.beta_fast &&
                before->beta_slow == y.beta_slow;
    if (!same) set(d, "rope_scaling", std::move(rs));
  }
  if (c.has_score_head() && !d.HasMember("id2label") && !d.HasMember("num_labels")) {
    Value id2label(rapidjson::kObjectType), label2id(rapidjson::kObjectType);
    id2label.AddMember("0", "LABEL_0", a);
    label2id.AddMember("LABEL_0", 0, a);
    set(d, "id2label", std::move(id2label));
    set(d, "label2id", std::move(label2id));
  }
  if (!c.raw_json.empty() && d == raw) return c.raw_json;  // nothing changed: byte-identical
  return pretty_sorted(d);
}

std::string default_generation_config_json(const Qwen2Config& c) {
  rapidjson::Document d;
  d.SetObject();
  auto& a = d.GetAllocator();
  if (c.bos_token_id) d.AddMember("bos_token_id", Value(*c.bos_token_id), a);
  if (c.pad_token_id) d.AddMember("pad_token_id", Value(*c.pad_token_id), a);
  if (c.eos_token_ids.size() == 1) {
    d.AddMember("eos_token_id", Value(c.eos_token_ids[0]), a);
  } else if (!c.eos_token_ids.empty()) {
    Value e(rapidjson::kArrayType);
    for (int64_t id : c.eos_token_ids) e.PushBack(Value(id), a);
    d.AddMember("eos_token_id", e, a);
  }
  return pretty_sorted(d);
}

}  // namespace ptk::checkpoint
