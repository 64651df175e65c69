// `ptk generate --model DIR --input prompts.jsonl --output out.jsonl`: samples completions with the
// rollout engine (KV cache, continuous batching, each prompt prefilled once for its G samples) and
// writes one line per sample, in input order. Not a server and not an evaluator (`ptk eval`).
#include <torch/torch.h>

#include <cstdio>
#include <fstream>
#include <iostream>

#include "apps/ptk/cli.h"
#include "core/checkpoint/model_folder.h"
#include "core/model/qwen2.h"
#include "core/runtime/device.h"
#include "core/runtime/runtime.h"
#include "core/tokenizer/messages_json.h"
#include "core/tokenizer/tokenizer.h"
#include "core/train/progress.h"
#include "core/util/error.h"
#include "core/util/fs.h"
#include "core/util/json.h"
#include "rollout/engine.h"
#include "rollout/token_bytes.h"

namespace ptk::app {
namespace {

// eos_token_id of generation_config.json (an integer or a list), if the folder has one.
std::vector<int64_t> generation_config_eos(const std::string& dir) {
  std::vector<int64_t> out;
  const std::string path = dir + "/generation_config.json";
  if (!path_exists(path)) return out;
  auto d = json::parse_file(path);
  if (!d.IsObject() || !d.HasMember("eos_token_id")) return out;
  const auto& v = d["eos_token_id"];
  if (v.IsInt64()) out.push_back(v.GetInt64());
  if (v.IsArray())
    for (const auto& x : v.GetArray())
      if (x.IsInt64()) out.push_back(x.GetInt64());
  return out;
}

}  // namespace

int cmd_generate(int argc, char** argv) {
  namespace po = boost::program_options;
  cli::CommandLine cl(
      "generate",
      "ptk generate --model DIR --input prompts.jsonl --output out.jsonl [--max-new-tokens N] [--temperature T] "
      "[--top-p P] [--top-k K] [--samples G] [--seed S]",
      "Samples G completions per input line with a KV cache and continuous batching.\n"
      "Input lines hold one of: \"prompt\" (text), \"messages\" (a chat, rendered with the generation\n"
      "prompt) or \"prompt_ids\" (token ids; needs no tokenizer). Output lines, in input order, G per\n"
      "input: \"ids\" (generated ids only, with the stop token), \"text\" (decoded without special tokens,\n"
      "when the folder has tokenizer.json), \"logprobs\" (per id, under softmax(logits / T) over the\n"
      "whole vocabulary; T = 1 when greedy), \"finish_reason\" (stop | length).\n"
      "Stops at the tokenizer's eos and <|im_end|> and generation_config.json's eos_token_id.");
  cl.flags().add_options()
      ("model", po::value<std::string>()->required(), "Hugging Face model folder")
      ("input", po::value<std::string>()->required(), "JSONL prompts")
      ("output", po::value<std::string>()->required(), "JSONL samples (written to a temporary file, then renamed)")
      ("max-new-tokens", po::value<int64_t>()->default_value(256), "most tokens generated per sample")
      ("temperature", po::value<double>()->default_value(1.0), "0 = greedy; higher = more diverse")
      ("top-p", po::value<double>()->default_value(1.0), "nucleus mass kept, in (0, 1]; 1 = off")
      ("top-k", po::value<int64_t>()->default_value(0), "most likely tokens kept; 0 = off")
      ("samples", po::value<int64_t>()->default_value(1), "G: samples per input line (its prompt is prefilled once)")
      ("seed", po::value<uint64_t>()->default_value(0),
       "line i draws with seed + i: the same samples whatever else is in the batch")
      ("slots", po::value<int64_t>()->default_value(32),
       "sequences decoded together (KV-cache slots); more = faster until compute-bound, more memory")
      ("dtype", po::value<std::string>()->default_value("float32"), "float32 | bfloat16 (GPU)")
      ("device", po::value<std::string>()->default_value("auto"),
       "where the model runs: auto (a GPU when there is one, else the CPU) | cpu | cuda | cuda:N");
  cl.accept_chat_template();
  if (!cl.parse(argc, argv)) return 0;
  runtime::init_and_announce(cl.threads());
  const std::string dir = cl.get<std::string>("model"), in_path = cl.get<std::string>("input"),
                    out_path = cl.get<std::string>("output"), dtype_name = cl.get<std::string>("dtype");
  if (dtype_name != "float32" && dtype_name != "bfloat16")
    throw UsageError("ptk generate: --dtype must be float32 or bfloat16, not " + dtype_name);
  const at::Device device = runtime::resolve_device(cl.get<std::string>("device"), "--device");

  rollout::SamplingParams sp{cl.get<double>("temperature"), cl.get<double>("top-p"), cl.get<int64_t>("top-k")};
  rollout::validate(sp, "ptk generate flags");
  const int64_t samples = cl.get<int64_t>("samples"), max_new = cl.get<int64_t>("max-new-tokens");
  if (samples < 1) throw UsageError("ptk generate: --samples must be >= 1");
  if (max_new < 1) throw UsageError("ptk generate: --max-new-tokens must be >= 1");

  checkpoint::require_model_folder(dir, "--model");
  // The tokenizer is optional: prompt_ids input needs none.
  std::unique_ptr<tokenizer::Tokenizer> tok;
  if (path_exists(dir + "/tokenizer.json"))
    tok = std::make_unique<tokenizer::Tokenizer>(
        tokenizer::Tokenizer::load(dir, tokenizer::chat_load_options(cl.chat_template(), cl.chat_template_kwargs())));

  // ---- read every request first, so a bad line fails before any compute ----
  std::ifstream in(in_path, std::ios::binary);
  if (!in) throw Error("ptk generate: cannot open --input " + in_path);
  std::vector<int64_t> stop_ids = generation_config_eos(dir);
  if (tok) {
    for (auto id : {tok->eos_id(), tok->im_end_id()})
      if (id != tokenizer::kNoToken) stop_ids.push_back(id);
  }
  std::vector<rollout::Request> reqs;
  std::string line;
  size_t line_no = 0;
  while (std::getline(in, line)) {
    ++line_no;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string where = in_path + ":" + std::to_string(line_no);
    auto d = json::parse(line, where);
    if (!d.IsObject()) throw Error(where + ": expected a JSON object with prompt, messages or prompt_ids");
    const int given = d.HasMember("prompt") + d.HasMember("messages") + d.HasMember("prompt_ids");
    if (given != 1)
      throw Error(where + ": give exactly one of \"prompt\" (text), \"messages\" (chat) or \"prompt_ids\" (token ids)");
    rollout::Request r;
    if (d.HasMember("prompt_ids")) {
      const auto& v = d["prompt_ids"];
      if (!v.IsArray() || v.Empty()) throw Error(where + ": prompt_ids must be a non-empty list of token ids");
      for (rapidjson::SizeType i = 0; i < v.Size(); ++i) {
        if (!v[i].IsInt64()) throw Error(where + ": prompt_ids[" + std::to_string(i) + "] is not an integer");
        r.prompt.push_back(v[i].GetInt64());
      }
    } else {
      if (!tok)
        throw Error(where + ": \"" + (d.HasMember("prompt") ? "prompt" : "messages") + "\" needs a tokenizer but " +
                    dir + " has no tokenizer.json\n---> HINT: copy tokenizer.json (and tokenizer_config.json) "
                    "into the folder, or give prompt_ids");
      std::vector<tokenizer::TokenId> ids;
      if (d.HasMember("prompt")) {
        if (!d["prompt"].IsString()) throw Error(where + ": \"prompt\" must be a string (use \"messages\" for a chat)");
        ids = tok->encode(std::string(d["prompt"].GetString(), d["prompt"].GetStringLength()));
      } else {
        tokenizer::ChatExtras extras;
        std::string reason;
        if (!tokenizer::read_chat_extras(d, &extras, &reason)) throw Error(where + ": " + reason);
        ids = tok->encode(tok->render_chat_text(tokenizer::parse_messages(d["messages"], where + ": messages"), true, extras));
      }
      r.prompt.assign(ids.begin(), ids.end());
      if (r.prompt.empty()) throw Error(where + ": the prompt encodes to no tokens");
    }
    r.samples = samples;
    r.sampling = sp;
    r.seed = cl.get<uint64_t>("seed") + reqs.size();
    r.max_new_tokens = max_new;
    r.stop_ids = stop_ids;
    reqs.push_back(std::move(r));
  }
  if (reqs.empty()) throw Error(in_path + ": no prompts (every line was empty)");

  // ---- model and engine ----
  model::LoadOptions lo;
  lo.dtype = dtype_name == "bfloat16" ? at::kBFloat16 : at::kFloat;
  lo.device = device;
  auto m = model::Qwen2Model::from_pretrained(dir, lo);
  rollout::EngineOptions eo;
  eo.slots = cl.get<int64_t>("slots");
  const int64_t V = m.config().vocab_size;
  if (tok) checkpoint::check_tokenizer_fits(static_cast<int64_t>(tok->vocab_size()), dir, V, dir);
  eo.vocab_limit = tok ? std::min<int64_t>(static_cast<int64_t>(tok->vocab_size()), V) : 0;
  rollout::Engine engine(m, eo);

  const int64_t total = static_cast<int64_t>(reqs.size()) * samples;
  Progress progress("generate", total, "samples");
  auto results = engine.generate(reqs, [&](int64_t done, int64_t, int64_t tokens) {
    progress.update(done, std::to_string(tokens) + " tokens");
  });
  const auto& st = engine.last_stats();
  progress.finish(std::to_string(st.generated_tokens) + " tokens");

  // ---- write ----
  const std::string tmp = out_path + ".tmp";
  std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
  if (!out) throw Error("ptk generate: cannot write " + tmp + "\n---> HINT: does the output folder exist?");
  for (const auto& per_input : results)
    for (const auto& s : per_input) {
      rapidjson::Document o(rapidjson::kObjectType);
      auto& a = o.GetAllocator();
      rapidjson::Value ids(rapidjson::kArrayType), lps(rapidjson::kArrayType);
      for (auto id : s.ids) ids.PushBack(id, a);
      for (auto lp : s.logprobs) lps.PushBack(static_cast<double>(lp), a);
      o.AddMember("ids", ids, a);
      if (tok) {
        std::vector<tokenizer::TokenId> t(s.ids.begin(), s.ids.end());
        std::string text = tok->decode(t, /*skip_special=*/true);
        o.AddMember("text", rapidjson::Value(text.c_str(), static_cast<rapidjson::SizeType>(text.size()), a), a);
      }
      o.AddMember("logprobs", lps, a);
      o.AddMember("finish_reason", rapidjson::StringRef(rollout::finish_reason_name(s.finish_reason)), a);
      out << json::to_string(o) << '\n';
    }
  out.close();
  if (!out) throw Error("ptk generate: writing " + tmp + " failed (disk full?)");
  if (std::rename(tmp.c_str(), out_path.c_str()) != 0) throw Error("ptk generate: cannot rename " + tmp + " to " + out_path);

  char buf[512];
  std::snprintf(buf, sizeof buf,
                "ptk generate: %lld samples, %lld tokens in %.2f s = %.1f tokens/s (prefill %.2f s for %lld prompt "
                "tokens, decode %.2f s, sampling %.2f s, bookkeeping %.2f s; slot occupancy %.0f%% of %lld) -> %s\n",
                static_cast<long long>(st.samples), static_cast<long long>(st.generated_tokens), st.total_s,
                st.tokens_per_s(), st.prefill_s, static_cast<long long>(st.prompt_tokens), st.decode_s, st.sample_s,
                st.bookkeeping_s, 100.0 * st.occupancy(), static_cast<long long>(st.slots), out_path.c_str());
  std::cerr << buf;
  if (st.device_loop) {  // EngineOptions::device_loop (the default on CUDA): its transfers per step
    std::snprintf(buf, sizeof buf,
                  "ptk generate: device decode loop: %lld steps, %lld host->device and %lld device->host copies, "
                  "%lld CUDA graphs captured, %lld replays\n",
                  static_cast<long long>(st.decode_steps), static_cast<long long>(st.h2d_copies),
                  static_cast<long long>(st.d2h_copies), static_cast<long long>(st.graph_captures),
                  static_cast<long long>(st.graph_replays));
    std::cerr << buf;
  }
  return 0;
}

}  // namespace ptk::app
