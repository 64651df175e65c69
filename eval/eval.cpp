#include "eval/eval.h"

#include <rapidjson/document.h>
#include <rapidjson/prettywriter.h>
#include <rapidjson/stringbuffer.h>
#include <torch/torch.h>

#include <chrono>

#include "core/config/options.h"
#include "core/parallel/comm.h"
#include "core/model/qwen2.h"
#include "core/runtime/log.h"
#include "core/train/metrics.h"
#include "core/util/fs.h"
#include "core/tokenizer/tokenizer.h"
#include "core/util/error.h"
#include "datasets/records.h"
#include "reward/rm_stage.h"
#include "reward/verifiers.h"
#include "rollout/engine.h"

namespace ptk::eval {

std::vector<EvalPrompt> read_eval_prompts(const std::string& path, const tokenizer::Tokenizer& tok, int64_t limit) {
  check_regular_file(path);  // before LineReader's fopen, which would block on a FIFO
  data::LineReader reader(path);
  std::vector<EvalPrompt> out;
  std::string_view line;
  int64_t no = 0;
  while (reader.next(&line, &no)) {
    if (data::is_blank_line(line)) continue;
    data::Record rec;
    std::string reason;
    if (!data::parse_record(line, data::Format::kRl, &rec, &reason))
      throw Error(path + ":" + std::to_string(no) + ": " + reason +
                  "\n---> HINT: eval prompts are RL-format lines {\"prompt\": ..., \"answer\": \"...\"}");
    EvalPrompt p;
    p.where = path + ":" + std::to_string(no);
    p.answer = rec.rl.answer;
    std::vector<tokenizer::TokenId> ids;
    if (rec.rl.prompt.is_messages) {
      p.text = tok.render_chat_text(rec.rl.prompt.messages, /*add_generation_prompt=*/true, rec.rl.chat);
      ids = tok.encode(p.text);
    } else {
      p.text = rec.rl.prompt.text;
      ids = tok.encode(p.text);
    }
    p.ids.assign(ids.begin(), ids.end());
    if (p.ids.empty()) throw Error(p.where + ": the prompt encodes to no tokens");
    out.push_back(std::move(p));
    if (limit > 0 && static_cast<int64_t>(out.size()) >= limit) break;
  }
  if (out.empty()) throw Error(path + ": no prompts");
  return out;
}

EvalResult evaluate(const model::Qwen2Model& model, const tokenizer::Tokenizer& tok,
                    const std::vector<EvalPrompt>& prompts, const EvalOptions& o) {
  const auto& verifier = reward::find_verifier(o.verifier);
  if (!o.prompt_seeds.empty() && o.prompt_seeds.size() != prompts.size())
    throw Error("eval: " + std::to_string(o.prompt_seeds.size()) + " prompt_seeds for " +
                std::to_string(prompts.size()) + " prompts; give one each or none");
  auto t0 = std::chrono::steady_clock::now();
  rollout::EngineOptions eo = o.engine;
  eo.slots = o.slots;
  eo.vocab_limit = std::min<int64_t>(static_cast<int64_t>(tok.vocab_size()), model.config().vocab_size);
  rollout::Engine engine(model, eo);
  std::vector<rollout::Request> reqs;
  std::vector<int64_t> stops;
  for (auto id : {tok.eos_id(), tok.im_end_id()})
    if (id >= 0 && std::find(stops.begin(), stops.end(), id) == stops.end()) stops.push_back(id);
  for (size_t i = 0; i < prompts.size(); ++i) {
    rollout::Request r;
    r.prompt = prompts[i].ids;
    r.samples = o.samples;
    r.sampling = o.sampling;
    r.seed = o.prompt_seeds.empty() ? o.seed + i : o.prompt_seeds[i];
    r.max_new_tokens = o.max_new_tokens;
    r.stop_ids = stops;
    reqs.push_back(std::move(r));
  }
  auto results = engine.generate(reqs);
  EvalResult res;
  res.prompts = static_cast<int64_t>(prompts.size());
  int64_t tokens = 0;
  std::vector<std::vector<int64_t>> full;  // prompt + completion, for the reward model
  for (size_t i = 0; i < prompts.size(); ++i) {
    for (const auto& s : results[i]) {
      EvalItem it;
      it.prompt = prompts[i].text;
      std::vector<tokenizer::TokenId> ids(s.ids.begin(), s.ids.end());
      it.completion = tok.decode(ids, /*skip_special=*/true);
      it.answer = prompts[i].answer;
      it.finish_reason = rollout::finish_reason_name(s.finish_reason);
      it.length = static_cast<int64_t>(s.ids.size());
      it.correct = verifier.fn(it.completion, it.answer);
      tokens += it.length;
      res.items.push_back(std::move(it));
      if (o.reward_model) {
        full.push_back(prompts[i].ids);
        full.back().insert(full.back().end(), s.ids.begin(), s.ids.end());
      }
    }
  }
  if (o.reward_model) {
    torch::NoGradGuard ng;
    const auto pad_id = o.reward_model->config().pad_token_id;
    const at::Device device = o.reward_model->embed_tokens_.device();
    for (size_t start = 0; start < full.size(); start += 16) {
      size_t end = std::min(full.size(), start + 16);
      std::vector<std::vector<int64_t>> rows(full.begin() + start, full.begin() + end);
      auto [ids, lens] = reward::pad_rows(rows, pad_id.value_or(0));
      std::vector<std::pair<int64_t, int64_t>> spans;  // right padding, host-side (no mask read back)
      for (const auto& r : rows) spans.emplace_back(0, static_cast<int64_t>(r.size()));
      // Read where training and the reward server read (reward::score_rows); one copy back per batch.
      at::Tensor scores = reward::score_rows(*o.reward_model, ids.to(device), lens.to(device), pad_id, false, spans)
                              .to(torch::kCPU, torch::kDouble);
      for (size_t k = start; k < end; ++k) res.items[k].reward = scores[k - start].item<double>();
    }
    res.has_reward = true;
  }
  res.samples = static_cast<int64_t>(res.items.size());
  for (const auto& it : res.items) {
    res.accuracy += it.correct;
    res.mean_length += static_cast<double>(it.length);
    res.mean_reward += it.reward;
  }
  if (res.samples > 0) {
    res.accuracy /= res.samples;
    res.mean_length /= res.samples;
    res.mean_reward /= res.samples;
  }
  res.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  res.tokens_per_s = res.seconds > 0 ? tokens / res.seconds : 0;
  return res;
}

std::string result_json(const EvalResult& r, const std::string& model_dir, const std::string& data_path,
                        const EvalOptions& o) {
  rapidjson::StringBuffer buf;
  rapidjson::PrettyWriter<rapidjson::StringBuffer> w(buf);
  w.SetIndent(' ', 2);
  w.StartObject();
  w.Key("model");
  w.String(model_dir.c_str());
  w.Key("data");
  w.String(data_path.c_str());
  w.Key("verifier");
  w.String(o.verifier.c_str());
  w.Key("temperature");
  w.Double(o.sampling.temperature);
  w.Key("prompts");
  w.Int64(r.prompts);
  w.Key("samples");
  w.Int64(r.samples);
  w.Key("accuracy");
  w.Double(r.accuracy);
  w.Key("mean_length");
  w.Double(r.mean_length);
  if (r.has_reward) {
    w.Key("mean_reward");
    w.Double(r.mean_reward);
  }
  w.Key("seconds");
  w.Double(r.seconds);
  w.Key("items");
  w.StartArray();
  for (const auto& it : r.items) {
    w.StartObject();
    w.Key("prompt");
    w.String(it.prompt.c_str());
    w.Key("completion");
    w.String(it.completion.c_str());
    w.Key("answer");
    w.String(it.answer.c_str());
    w.Key("correct");
    w.Double(it.correct);
    w.Key("length");
    w.Int64(it.length);
    w.Key("finish_reason");
    w.String(it.finish_reason.c_str());
    if (r.has_reward) {
      w.Key("reward");
      w.Double(it.reward);
    }
    w.EndObject();
  }
  w.EndArray();
  w.EndObject();
  return std::string(buf.GetString(), buf.GetSize()) + "\n";
}

void HeldoutOptions::visit(config::Visitor& v) {
  v.opt(prompts, "eval_prompts", "",
        "RL-format JSONL ({\"prompt\", \"answer\"}) for held-out accuracy at every eval (greedy, through "
        "ptk eval's code); empty = none");
  v.opt(verifier, "eval_verifier", "math", "verifier whose mean on eval_prompts is eval/accuracy");
  v.opt(max_new_tokens, "eval_max_new_tokens", 128, "generation budget per held-out prompt");
  v.opt(max_prompts, "eval_max_prompts", 0, "first N held-out prompts; 0 = all");
  v.opt(at_start, "eval_at_start", true, "with eval_prompts: also measure before the first step (fresh runs)");
}

void HeldoutOptions::validate(config::Errors& e, const std::string& section) const {
  if (max_new_tokens < 1) e.add(section + ".eval_max_new_tokens must be >= 1");
  if (max_prompts < 0) e.add(section + ".eval_max_prompts must be >= 0");
  try {
    reward::find_verifier(verifier);
  } catch (const Error& ex) {
    e.add(section + ".eval_verifier: " + ex.what());
  }
}

Heldout::Heldout(const HeldoutOptions& options, std::shared_ptr<const tokenizer::Tokenizer> tok)
    : options_(options), tok_(std::move(tok)) {
  if (options_.prompts.empty()) return;
  prompts_ = read_eval_prompts(options_.prompts, *tok_, options_.max_prompts);
}

GlobalEval evaluate_across_ranks(const model::Qwen2Model& model, const tokenizer::Tokenizer& tok,
                                 const std::vector<EvalPrompt>& mine, const EvalOptions& options, parallel::Comm* comm) {
  double sums[3] = {0, 0, 0};  // correct, generated tokens, samples
  if (!mine.empty()) {
    auto r = evaluate(model, tok, mine, options);
    sums[0] = r.accuracy * static_cast<double>(r.samples);
    sums[1] = r.mean_length * static_cast<double>(r.samples);
    sums[2] = static_cast<double>(r.samples);
  }
  if (comm && comm->world_size() > 1)
    for (double& x : sums) x = comm->all_reduce(x, parallel::ReduceOp::kSum);
  GlobalEval g;
  g.samples = static_cast<int64_t>(sums[2]);
  if (g.samples > 0) {
    g.accuracy = sums[0] / sums[2];
    g.mean_length = sums[1] / sums[2];
  }
  return g;
}

void Heldout::run(const model::Qwen2Model& model, Metrics* out, parallel::Comm* comm) const {
  if (!enabled()) return;
  const int rank = comm ? comm->rank() : 0, world = comm ? comm->world_size() : 1;
  std::vector<EvalPrompt> mine;
  for (size_t i = static_cast<size_t>(rank); i < prompts_.size(); i += static_cast<size_t>(world))
    mine.push_back(prompts_[i]);
  EvalOptions eo;
  eo.verifier = options_.verifier;
  eo.max_new_tokens = options_.max_new_tokens;
  auto g = evaluate_across_ranks(model, *tok_, mine, eo, comm);
  if (g.samples == 0) return;
  out->add("accuracy", g.accuracy).add("completions/mean_length", g.mean_length);
}

void Heldout::run_at_start(const model::Qwen2Model& model, parallel::Comm* comm, bool fresh, const std::string& run_dir,
                           const std::string& stage) const {
  if (!enabled() || !options_.at_start || !fresh) return;
  auto t0 = std::chrono::steady_clock::now();
  Metrics m;
  run(model, &m, comm);
  if (comm && comm->rank() != 0) return;
  char line[256];
  double acc = m.values().empty() ? 0 : m.values()[0].second;
  std::snprintf(line, sizeof line, "%s: before training, held-out accuracy %.4f (%s on %zu prompts of %s, %.1f s)",
                stage.c_str(), acc, options_.verifier.c_str(), prompts_.size(), options_.prompts.c_str(),
                std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  log::info(line);
  write_eval_start(run_dir, m);
}

void write_eval_start(const std::string& run_dir, const Metrics& figures) {
  Metrics e;
  for (auto& [k, v] : figures.values()) e.add("eval/" + k, v);
  write_file_atomic(run_dir + "/eval_start.json", e.to_json(0) + "\n");
}

}  // namespace ptk::eval
