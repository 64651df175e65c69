// The reward server (see reward_server.h): routes, request validation, the batcher thread that owns
// the model, verifier scoring, /health and /metrics. HTTP itself (framing, limits, deadlines) is
// reward/http_server.h; nothing here reads raw HTTP. Not the client (reward_client.cpp).
#include "reward/reward_server.h"

#include <rapidjson/stringbuffer.h>
#include <rapidjson/writer.h>
#include <torch/torch.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cerrno>
#include <cstring>
#include <deque>
#include <future>
#include <mutex>
#include <optional>
#include <thread>

#include "core/model/qwen2.h"
#include "core/runtime/log.h"
#include "core/tokenizer/tokenizer.h"
#include "core/util/error.h"
#include "core/util/fs.h"
#include "core/util/json.h"
#include "reward/http_server.h"
#include "reward/rm_stage.h"
#include "reward/verifiers.h"

namespace ptk::reward {

void RewardSection::visit(config::Visitor& v) {
  v.opt(model, "model", "", "reward-model folder (HF Qwen2ForSequenceClassification, e.g. runs/rm/final); \"\" = none");
  v.opt(model_weight, "model_weight", 1.0, "weight of the reward model's score in `rewards`");
  v.opt(verifiers, "verifiers", std::vector<std::string>{},
        "rule verifiers by name (math, exact, format_think, format_answer); each needs `labels` in requests");
  v.opt(verifier_weights, "verifier_weights", std::vector<double>{}, "one weight per verifier; [] = all 1");
  v.opt(append_eos, "append_eos", false,
        "append the tokenizer's EOS to each query before scoring (match how the RM was trained: TRL appends it "
        "to plain-text pairs, not to chat pairs)");
  v.opt(host, "host", "127.0.0.1", "address to bind; 0.0.0.0 exposes the server to the network");
  v.opt(port, "port", 5000, "TCP port; 0 = any free port (the `listening on` line says which)");
  v.opt(api_key, "api_key", "", "when set, requests must send `Authorization: Bearer <api_key>` (else 401)");
  v.opt(http_threads, "http_threads", 16,
        "worker threads that score requests (connections themselves are served by one event loop)");
  v.opt(max_connections, "max_connections", 512,
        "most open connections; when full the longest-idle one is closed for a newcomer, else it gets 503");
  v.opt(header_timeout_s, "header_timeout_s", 10.0, "a request's headers must arrive within this (else 408)");
  v.opt(request_timeout_s, "request_timeout_s", 60.0,
        "a whole request must arrive, and its answer be taken, within this (else 408 / closed)");
  v.opt(idle_timeout_s, "idle_timeout_s", 30.0, "an idle keep-alive connection is closed after this");
  v.opt(max_body_bytes, "max_body_bytes", 16 << 20,
        "largest request body accepted, Content-Length or chunked (else 413, before the rest is read)");
  v.opt(max_buffered_bytes, "max_buffered_bytes", 256 << 20,
        "most request-body bytes held for all connections together (else 503); bounds the server's memory");
  v.opt(max_items, "max_items", 4096, "most queries in one request (else 413)");
  v.opt(max_tokens_per_item, "max_tokens_per_item", 8192, "longest query in tokens (else 413)");
  v.opt(max_batch_items, "max_batch_items", 64, "most queries in one model forward (across requests)");
  v.opt(max_batch_tokens, "max_batch_tokens", 32768,
        "most padded tokens (items x longest) in one model forward; bounds memory");
  v.opt(max_wait_ms, "max_wait_ms", 5,
        "how long the batcher waits after the first queued query for more to join its batch");
}

void RewardSection::validate(config::Errors& e) const {
  if (model.empty() && verifiers.empty())
    e.add("reward: no reward source; set reward.model (a reward-model folder) and/or reward.verifiers");
  if (!verifier_weights.empty() && verifier_weights.size() != verifiers.size())
    e.add("reward.verifier_weights has " + std::to_string(verifier_weights.size()) + " weights for " +
          std::to_string(verifiers.size()) + " verifiers; give one each or []");
  if (port < 0 || port > 65535) e.add("reward.port must be in [0, 65535] (got " + std::to_string(port) + ")");
  if (http_threads < 1) e.add("reward.http_threads must be >= 1");
  if (http_threads > 1024) e.add("reward.http_threads must be <= 1024 (got " + std::to_string(http_threads) + ")");
  if (max_connections < 1) e.add("reward.max_connections must be >= 1");
  if (!(header_timeout_s > 0) || !(request_timeout_s > 0) || !(idle_timeout_s > 0))
    e.add("reward.header_timeout_s, request_timeout_s and idle_timeout_s must be > 0 seconds");
  if (max_body_bytes < 1 || max_items < 1 || max_tokens_per_item < 1)
    e.add("reward.max_body_bytes, max_items and max_tokens_per_item must be >= 1");
  if (max_buffered_bytes < max_body_bytes)
    e.add("reward.max_buffered_bytes (" + std::to_string(max_buffered_bytes) + ") must be >= reward.max_body_bytes (" +
          std::to_string(max_body_bytes) + ")");
  if (max_batch_items < 1 || max_batch_tokens < 1 || max_wait_ms < 0)
    e.add("reward.max_batch_items and max_batch_tokens must be >= 1, max_wait_ms >= 0");
}

namespace {

// OpenRLHF's query is prompt + response as the policy saw it, so a response usually ends with the
// end-of-turn token's text (Qwen: <|im_end|>, <|endoftext|>). Verifiers judge the reply itself:
// trailing end-of-turn markers and whitespace are cut off first (the RM still sees the whole query).
std::string_view strip_end_of_turn(std::string_view r) {
  static const std::string_view kMarkers[] = {"<|im_end|>", "<|endoftext|>", "</s>", "<|eot_id|>"};
  for (bool cut = true; cut;) {
    cut = false;
    while (!r.empty() && (r.back() == ' ' || r.back() == '\n' || r.back() == '\t' || r.back() == '\r')) {
      r.remove_suffix(1);
      cut = true;
    }
    for (auto m : kMarkers)
      if (r.size() >= m.size() && r.compare(r.size() - m.size(), m.size(), m) == 0) {
        r.remove_suffix(m.size());
        cut = true;
      }
  }
  return r;
}

// How many leading bytes of `query` are its prompt: the prompt itself, or its NFC form. OpenRLHF
// builds the query as tokenizer.decode(prompt ids + response ids) but sends the prompt as the raw
// text; a tokenizer that normalizes (Qwen2's: NFC) decodes a decomposed prompt ("e" + U+0301)
// composed ("\u00e9"). npos when the query starts with neither.
size_t prompt_length(std::string_view query, const std::string& prompt) {
  if (query.compare(0, prompt.size(), prompt) == 0) return prompt.size();
  if (!tokenizer::is_valid_utf8(prompt)) return std::string::npos;
  std::string composed = tokenizer::nfc(prompt);
  if (composed != prompt && query.compare(0, composed.size(), composed) == 0) return composed.size();
  return std::string::npos;
}

using Clock = std::chrono::steady_clock;

// A 4xx/5xx answer with its message.
struct HttpError {
  int status;
  std::string message;
};

// The model-scoring part of one request: its items, filled in by the batcher.
struct Job {
  std::vector<std::vector<int64_t>> items;
  std::vector<double> scores;
  size_t remaining = 0;
  std::promise<void> done;
};

struct Entry {
  std::shared_ptr<Job> job;
  size_t index;
  Clock::time_point queued;
};

double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  size_t i = static_cast<size_t>(std::ceil(p * static_cast<double>(v.size()))) ;
  return v[std::min(v.size() - 1, i == 0 ? 0 : i - 1)];
}

// Strings of field `name` (array of strings; numbers are accepted for labels and turned into text).
std::vector<std::string> string_array(const rapidjson::Value& d, const char* name, bool numbers_ok) {
  const auto& a = d[name];
  if (!a.IsArray())
    throw HttpError{400, std::string("field `") + name + "` must be an array of strings, got " + json::type_name(a)};
  std::vector<std::string> out;
  out.reserve(a.Size());
  for (rapidjson::SizeType i = 0; i < a.Size(); ++i) {
    if (a[i].IsString()) {
      out.emplace_back(a[i].GetString(), a[i].GetStringLength());
    } else if (numbers_ok && a[i].IsNumber()) {
      out.push_back(json::to_string(a[i]));
    } else {
      throw HttpError{400, std::string("field `") + name + "[" + std::to_string(i) + "]` must be a string, got " +
                               json::type_name(a[i])};
    }
  }
  return out;
}

}  // namespace

struct RewardServer::Impl {
  RewardSection opt;
  bool has_model = false;
  model::Qwen2Model model;
  std::optional<tokenizer::Tokenizer> tok;
  int64_t pad_id = 0, eos_id = -1;
  std::vector<const Verifier*> verifiers;
  std::vector<double> verifier_weights;

  std::unique_ptr<http::Server> http;
  int bound_port = -1;

  // Batcher: one thread, the only one that runs the model.
  std::mutex mu;
  std::condition_variable cv;
  std::deque<Entry> queue;
  bool stopping = false;
  std::thread batcher;
  std::once_flag stop_once;

  // Metrics (guarded by metrics_mu).
  std::mutex metrics_mu;
  int64_t requests = 0, errors = 0, items = 0, batches = 0, batch_items_sum = 0, batch_items_max = 0,
          batch_tokens_sum = 0, batch_tokens_max = 0;
  std::vector<double> latencies_ms;  // the last kLatencyWindow requests
  size_t latency_next = 0;
  static constexpr size_t kLatencyWindow = 10000;
  Clock::time_point started = Clock::now();

  void record(int status, double ms) {
    std::lock_guard<std::mutex> g(metrics_mu);
    ++requests;
    if (status >= 400) ++errors;
    if (latencies_ms.size() < kLatencyWindow) {
      latencies_ms.push_back(ms);
    } else {
      latencies_ms[latency_next] = ms;
      latency_next = (latency_next + 1) % kLatencyWindow;
    }
  }

  void batcher_loop() {
    torch::NoGradGuard ng;
    for (;;) {
      std::vector<Entry> take;
      {
        std::unique_lock<std::mutex> lk(mu);
        cv.wait(lk, [&] { return stopping || !queue.empty(); });
        if (queue.empty()) return;  // stopping
        auto deadline = queue.front().queued + std::chrono::milliseconds(opt.max_wait_ms);
        cv.wait_until(lk, deadline, [&] {
          return stopping || static_cast<int64_t>(queue.size()) >= opt.max_batch_items;
        });
        size_t longest = 0;
        while (!queue.empty() && static_cast<int64_t>(take.size()) < opt.max_batch_items) {
          size_t len = queue.front().job->items[queue.front().index].size();
          size_t l = std::max(longest, len);
          if (!take.empty() && static_cast<int64_t>(l * (take.size() + 1)) > opt.max_batch_tokens) break;
          longest = l;
          take.push_back(std::move(queue.front()));
          queue.pop_front();
        }
      }
      run_batch(take);
    }
  }

  void run_batch(const std::vector<Entry>& take) {
    std::vector<std::vector<int64_t>> rows;
    size_t longest = 0;
    for (const auto& e : take) {
      rows.push_back(e.job->items[e.index]);
      longest = std::max(longest, rows.back().size());
    }
    std::vector<double> s;
    std::exception_ptr failure;
    try {
      auto [ids, lens] = pad_rows(rows, pad_id);
      std::vector<std::pair<int64_t, int64_t>> spans;  // right padding, host-side
      for (const auto& r : rows) spans.emplace_back(0, static_cast<int64_t>(r.size()));
      const at::Device device = model.embed_tokens_.device();
      // On the model's device; the (R) scores come back to the host once per batch.
      at::Tensor out = score_rows(model, ids.to(device), lens.to(device), pad_id, false, spans)
                           .to(torch::kCPU, torch::kDouble)
                           .contiguous();  // (R)
      s.assign(out.data_ptr<double>(), out.data_ptr<double>() + out.numel());
    } catch (...) {
      failure = std::current_exception();
    }
    {
      std::lock_guard<std::mutex> g(metrics_mu);
      ++batches;
      batch_items_sum += static_cast<int64_t>(take.size());
      batch_items_max = std::max<int64_t>(batch_items_max, static_cast<int64_t>(take.size()));
      int64_t tokens = static_cast<int64_t>(longest * take.size());
      batch_tokens_sum += tokens;
      batch_tokens_max = std::max(batch_tokens_max, tokens);
    }
    for (size_t i = 0; i < take.size(); ++i) {
      auto& job = *take[i].job;
      // Only this thread touches job.scores / remaining until the promise is set.
      if (failure) {
        if (job.remaining != 0) {
          job.remaining = 0;
          job.done.set_exception(failure);
        }
        continue;
      }
      if (job.remaining == 0) continue;  // already failed
      job.scores[take[i].index] = s[i];
      if (--job.remaining == 0) job.done.set_value();
    }
  }

  // Scores of `items` by the model, through the batcher.
  std::vector<double> model_scores(std::vector<std::vector<int64_t>> items) {
    auto job = std::make_shared<Job>();
    job->items = std::move(items);
    job->scores.assign(job->items.size(), 0.0);
    job->remaining = job->items.size();
    auto fut = job->done.get_future();
    if (job->items.empty()) return {};
    {
      std::lock_guard<std::mutex> g(mu);
      if (stopping) throw HttpError{503, "the server is shutting down; retry on another server"};
      auto now = Clock::now();
      for (size_t i = 0; i < job->items.size(); ++i) queue.push_back({job, i, now});
    }
    cv.notify_all();
    try {
      fut.get();
    } catch (const std::exception& e) {
      throw HttpError{500, std::string("the reward model failed on this batch: ") + e.what()};
    }
    return job->scores;
  }

  // The answer to one /get_reward body; *n_items = how many queries it scored.
  std::string get_reward(const std::string& body, size_t* n_items) {
    rapidjson::Document d;
    try {
      d = json::parse(body, "request body");
    } catch (const Error& e) {
      throw HttpError{400, e.what()};  // "request body:1:2: invalid JSON: ..."
    }
    if (!d.IsObject()) throw HttpError{400, std::string("the body must be a JSON object, got ") + json::type_name(d)};
    if (!d.HasMember("query"))
      throw HttpError{400, "missing field `query` (an array of prompt+response texts)"};
    auto queries = string_array(d, "query", false);
    const size_t n = queries.size();
    if (static_cast<int64_t>(n) > opt.max_items)
      throw HttpError{413, "`query` has " + std::to_string(n) + " items; this server takes at most " +
                               std::to_string(opt.max_items) + " per request (reward.max_items): split the request"};
    std::vector<std::string> prompts, labels;
    if (d.HasMember("prompts") && !d["prompts"].IsNull()) {
      prompts = string_array(d, "prompts", false);
      if (prompts.size() != n)
        throw HttpError{400, "`prompts` has " + std::to_string(prompts.size()) + " items but `query` has " +
                                 std::to_string(n) + "; send one prompt per query"};
    }
    if (d.HasMember("labels") && !d["labels"].IsNull()) {
      labels = string_array(d, "labels", true);
      if (labels.size() != n)
        throw HttpError{400, "`labels` has " + std::to_string(labels.size()) + " items but `query` has " +
                                 std::to_string(n) + "; send one label per query"};
    }
    if (!verifiers.empty() && labels.empty() && n > 0)
      throw HttpError{400, "missing field `labels`: this server's verifiers (" + verifier_list() +
                               ") compare each response with a reference answer; send one label per query"};
    // An empty label makes math and exact score 0 whatever the response: a client that sends no answers
    // (OpenRLHF without --data.label_key sends "" for every item) would train on silent zeros.
    for (const auto& v : verifiers) {
      if (std::string_view(v->name) != "math" && std::string_view(v->name) != "exact") continue;
      for (size_t i = 0; i < n; ++i)
        if (labels[i].empty())
          throw HttpError{400, "labels[" + std::to_string(i) + "] is empty: verifier `" + std::string(v->name) +
                                   "` compares the response with this reference answer and would score 0 whatever "
                                   "it is (OpenRLHF: set --data.label_key to the dataset's answer field)"};
    }
    // The response each verifier sees: the query after its prompt (the whole query without prompts).
    // Only verifiers need it: a model-only server scores whole queries and ignores `prompts`, as
    // OpenRLHF's own server (serve_rm.py) does.
    std::vector<std::string_view> responses(n);
    for (size_t i = 0; i < n && !verifiers.empty(); ++i) {
      std::string_view q = queries[i];
      if (!prompts.empty()) {
        size_t cut = prompt_length(q, prompts[i]);
        if (cut == std::string::npos)
          throw HttpError{400, "query[" + std::to_string(i) + "] does not start with prompts[" + std::to_string(i) +
                                   "] (nor with its NFC form); `query` must be prompt + response for the verifiers "
                                   "to find the response (a prompt the client truncated cannot be cut off)"};
        q.remove_prefix(cut);
      }
      responses[i] = strip_end_of_turn(q);
    }
    std::vector<std::vector<int64_t>> ids;
    if (has_model) {
      for (size_t i = 0; i < n; ++i) {
        auto t = tok->encode(queries[i]);
        std::vector<int64_t> row(t.begin(), t.end());
        if (opt.append_eos) row.push_back(eos_id);
        if (row.empty()) throw HttpError{400, "query[" + std::to_string(i) + "] is empty"};
        if (static_cast<int64_t>(row.size()) > opt.max_tokens_per_item)
          throw HttpError{413, "query[" + std::to_string(i) + "] has " + std::to_string(row.size()) +
                                   " tokens; this server takes at most " + std::to_string(opt.max_tokens_per_item) +
                                   " (reward.max_tokens_per_item)"};
        ids.push_back(std::move(row));
      }
    }
    std::vector<double> rm = has_model ? model_scores(std::move(ids)) : std::vector<double>{};
    std::vector<std::vector<double>> vs(verifiers.size(), std::vector<double>(n));
    for (size_t k = 0; k < verifiers.size(); ++k)
      for (size_t i = 0; i < n; ++i) vs[k][i] = verifiers[k]->fn(responses[i], labels[i]);
    std::vector<double> rewards(n, 0.0);
    for (size_t i = 0; i < n; ++i) {
      if (has_model) {
        if (!std::isfinite(rm[i]))
          throw HttpError{500, "the reward model gave a non-finite score for query[" + std::to_string(i) + "]"};
        rewards[i] += opt.model_weight * rm[i];
      }
      for (size_t k = 0; k < verifiers.size(); ++k) rewards[i] += verifier_weights[k] * vs[k][i];
    }
    rapidjson::StringBuffer sb;
    rapidjson::Writer<rapidjson::StringBuffer> w(sb);
    auto array = [&](const std::vector<double>& v) {
      w.StartArray();
      for (double x : v) w.Double(x);
      w.EndArray();
    };
    w.StartObject();
    w.Key("rewards");
    array(rewards);
    w.Key("scores");
    array(rewards);
    w.Key("extra_logs");
    w.StartObject();
    if (has_model) {
      w.Key("rm");
      array(rm);
    }
    for (size_t k = 0; k < verifiers.size(); ++k) {
      w.Key(verifiers[k]->name);
      array(vs[k]);
    }
    w.EndObject();
    w.EndObject();
    *n_items = n;
    return sb.GetString();
  }

  std::string verifier_list() const {
    std::string s;
    for (const auto* v : verifiers) s += (s.empty() ? "" : ", ") + std::string(v->name);
    return s;
  }

  std::string metrics_json() {
    std::lock_guard<std::mutex> g(metrics_mu);
    size_t depth;
    {
      std::lock_guard<std::mutex> q(mu);
      depth = queue.size();
    }
    rapidjson::StringBuffer sb;
    rapidjson::Writer<rapidjson::StringBuffer> w(sb);
    w.StartObject();
    w.Key("requests"); w.Int64(requests);
    w.Key("errors"); w.Int64(errors);
    w.Key("items"); w.Int64(items);
    w.Key("batches"); w.Int64(batches);
    w.Key("batch_items_mean"); w.Double(batches ? static_cast<double>(batch_items_sum) / batches : 0.0);
    w.Key("batch_items_max"); w.Int64(batch_items_max);
    w.Key("batch_tokens_mean"); w.Double(batches ? static_cast<double>(batch_tokens_sum) / batches : 0.0);
    w.Key("batch_tokens_max"); w.Int64(batch_tokens_max);
    w.Key("queue_depth"); w.Uint64(depth);
    w.Key("latency_ms_p50"); w.Double(percentile(latencies_ms, 0.50));
    w.Key("latency_ms_p99"); w.Double(percentile(latencies_ms, 0.99));
    w.Key("latency_ms_max"); w.Double(latencies_ms.empty() ? 0.0 : *std::max_element(latencies_ms.begin(), latencies_ms.end()));
    w.Key("uptime_s"); w.Double(std::chrono::duration<double>(Clock::now() - started).count());
    if (http) {
      auto hs = http->stats();
      w.Key("connections_open"); w.Int64(hs.connections_open);
      w.Key("connections_total"); w.Int64(hs.connections_total);
      w.Key("connections_refused"); w.Int64(hs.connections_refused);
      w.Key("timeouts"); w.Int64(hs.timeouts);
      w.Key("buffered_bytes"); w.Int64(hs.buffered_bytes);
    }
    w.EndObject();
    return sb.GetString();
  }

  bool authorized(const http::Request& req) const {
    if (opt.api_key.empty()) return true;
    const std::string* h = req.header("authorization");
    const std::string want = "Bearer " + opt.api_key;
    if (!h || h->size() != want.size()) return false;
    unsigned char diff = 0;  // constant time in the key's content
    for (size_t i = 0; i < want.size(); ++i) diff |= static_cast<unsigned char>((*h)[i] ^ want[i]);
    return diff == 0;
  }

  // Error lines are rate-limited (a burst of 20, then 5 a second): a client sending bad requests
  // in a loop must not flood the log, or block the event loop on a slow terminal.
  std::mutex log_mu;
  double log_tokens = 20;
  Clock::time_point log_refill = Clock::now();
  int64_t log_suppressed = 0;

  void log_request(const http::Request& req, int status, size_t n_items, double ms, const std::string& body) {
    if (status != 200) {
      std::lock_guard<std::mutex> g(log_mu);
      auto now = Clock::now();
      log_tokens = std::min(20.0, log_tokens + 5.0 * std::chrono::duration<double>(now - log_refill).count());
      log_refill = now;
      if (log_tokens < 1) {
        ++log_suppressed;
        return;
      }
      log_tokens -= 1;
      if (log_suppressed > 0) {
        log::warn("reward-server: " + std::to_string(log_suppressed) + " error lines not shown (over 5 a second)");
        log_suppressed = 0;
      }
    }
    char line[256];
    std::snprintf(line, sizeof line, "%s %s %d items=%zu %.1f ms from %s",
                  req.method.empty() ? "-" : req.method.c_str(), req.path.empty() ? "-" : req.path.substr(0, 64).c_str(), status, n_items, ms, req.remote_addr.c_str());
    log::info(line + (status == 200 ? std::string() : ": " + body.substr(0, 300)));
  }

  // Routes on the head alone (the HTTP event loop): wrong routes, methods and keys are refused before
  // any body is read; /health and /metrics are answered here, so they answer even when every worker
  // is busy scoring.
  std::optional<http::Response> check_head(const http::Request& req) {
    auto not_allowed = [&](const char* allow) {
      auto r = http::Server::error(405, req.method + " " + req.path + " is not allowed; use " + allow);
      r.headers.emplace_back("Allow", allow);
      return r;
    };
    if (req.path == "/get_reward") {
      std::optional<http::Response> r;
      if (req.method != "POST") r = not_allowed("POST");
      else if (!authorized(req)) r = http::Server::error(401, "missing or wrong `Authorization: Bearer <key>` (reward.api_key)");
      if (r) {
        record(r->status, 0);
        log_request(req, r->status, 0, 0, r->body);
      }
      return r;
    }
    if (req.path == "/health") {
      if (req.method != "GET") return not_allowed("GET");
      bool down;
      {
        std::lock_guard<std::mutex> g(mu);
        down = stopping;
      }
      http::Response r;
      r.status = down ? 503 : 200;
      r.body = down ? R"({"status":"stopping"})" : R"({"status":"ok"})";
      return r;
    }
    if (req.path == "/metrics") {
      if (req.method != "GET") return not_allowed("GET");
      http::Response r;
      r.body = metrics_json();
      return r;
    }
    return http::Server::error(404, "no route " + req.method + " " + req.path.substr(0, 200) +
                                        "; routes: POST /get_reward, GET /health, GET /metrics");
  }

  // POST /get_reward with its whole body (an HTTP worker thread).
  http::Response handle(const http::Request& req) {
    auto t0 = Clock::now();
    size_t n_items = 0;
    http::Response res;
    try {
      res.body = get_reward(req.body, &n_items);
    } catch (const HttpError& e) {
      res = http::Server::error(e.status, e.message);
    } catch (const std::exception& e) {
      res = http::Server::error(500, std::string("internal error: ") + e.what());
    }
    double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
    if (res.status == 200) {
      std::lock_guard<std::mutex> g(metrics_mu);
      items += static_cast<int64_t>(n_items);
    }
    record(res.status, ms);
    log_request(req, res.status, n_items, ms, res.body);
    return res;
  }

  // Answers the HTTP layer makes itself (framing, limits, deadlines): the reward server's wording.
  void on_http_error(const http::Request& req, http::Response& res) {
    if (res.status == 413 && req.path == "/get_reward")
      res = http::Server::error(413, "request body over " + std::to_string(opt.max_body_bytes) +
                                         " bytes (reward.max_body_bytes): send fewer queries per request");
    if (req.path == "/get_reward") record(res.status, 0);
    log_request(req, res.status, 0, 0, res.body);
  }

  void make_http() {
    http::ServerOptions so;
    so.host = opt.host;
    so.port = static_cast<int>(opt.port);
    so.threads = static_cast<int>(opt.http_threads);
    so.limits.max_body_bytes = static_cast<size_t>(opt.max_body_bytes);
    so.max_connections = opt.max_connections;
    so.max_buffered_bytes = opt.max_buffered_bytes;
    so.header_timeout_ms = static_cast<int64_t>(opt.header_timeout_s * 1000);
    so.request_timeout_ms = static_cast<int64_t>(opt.request_timeout_s * 1000);
    so.idle_timeout_ms = static_cast<int64_t>(opt.idle_timeout_s * 1000);
    http = std::make_unique<http::Server>(
        so, [this](const http::Request& r) { return check_head(r); },
        [this](const http::Request& r) { return handle(r); },
        [this](const http::Request& r, http::Response& res) { on_http_error(r, res); });
  }
};

RewardServer::RewardServer(const RewardSection& options, const at::Device& device) : impl_(std::make_unique<Impl>()) {
  auto& m = *impl_;
  m.opt = options;
  config::Errors errs;
  options.validate(errs);
  if (!errs.items.empty()) {
    std::string msg = "reward-server: bad recipe:";
    for (const auto& e : errs.items) msg += "\n  " + e;
    throw Error(msg);
  }
  for (size_t k = 0; k < options.verifiers.size(); ++k) {
    m.verifiers.push_back(&find_verifier(options.verifiers[k]));
    m.verifier_weights.push_back(options.verifier_weights.empty() ? 1.0 : options.verifier_weights[k]);
  }
  if (!options.model.empty()) {
    model::LoadOptions lo;
    lo.device = device;
    m.model = model::Qwen2Model::from_pretrained(options.model, lo);
    if (!m.model.has_score_head())
      throw Error("reward.model = " + options.model + " is a " + m.model.config().architecture +
                  ", not a reward model (Qwen2ForSequenceClassification)\n---> HINT: train one with `ptk rm` and "
                  "point reward.model at its final/ folder");
    m.tok.emplace(tokenizer::Tokenizer::load(options.model));
    m.pad_id = m.model.config().pad_token_id ? *m.model.config().pad_token_id
                                             : (m.tok->pad_id() >= 0 ? m.tok->pad_id() : m.tok->eos_id());
    m.eos_id = m.tok->eos_id();
    if (options.append_eos && m.eos_id < 0)
      throw Error("reward.append_eos is true but the tokenizer in " + options.model + " names no EOS token");
    m.has_model = true;
  }
  m.make_http();
}

RewardServer::~RewardServer() { stop(); }

int RewardServer::bind() {
  auto& m = *impl_;
  try {
    m.bound_port = m.http->bind();
  } catch (const Error& e) {
    std::string what = e.what();
    throw Error("reward-server: " + what +
                (what.rfind("cannot bind", 0) == 0
                     ? "\n---> HINT: pick another --port (in use?), or 0 for any free one; --host must be an address of "
                       "this machine"
                     : "\n---> HINT: lower reward.max_connections, or raise the limit with `ulimit -n`"));
  }
  if (m.has_model) m.batcher = std::thread([&m] { m.batcher_loop(); });
  return m.bound_port;
}

int RewardServer::port() const { return impl_->bound_port; }

void RewardServer::serve() { impl_->http->serve(); }

void RewardServer::stop() {
  auto& m = *impl_;
  std::call_once(m.stop_once, [&m] {
    {
      std::lock_guard<std::mutex> g(m.mu);
      m.stopping = true;
    }
    m.cv.notify_all();
    m.http->stop();  // closes every connection, waits for running handlers; the batcher finishes their items
    if (m.batcher.joinable()) m.batcher.join();
  });
}

}  // namespace ptk::reward
