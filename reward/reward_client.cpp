// The reward client (see reward_client.h): chunking, round-robin over URLs, the retry loop, and
// strict checking of every answer. HTTP is cpp-httplib's. Not the server (reward_server.cpp).
#include "reward/reward_client.h"

#include <httplib.h>
#include <rapidjson/document.h>
#include <rapidjson/stringbuffer.h>
#include <rapidjson/writer.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <mutex>
#include <thread>

#include "core/runtime/log.h"
#include "core/util/error.h"
#include "core/util/json.h"

namespace ptk::reward {

namespace {

struct Endpoint {
  std::string url;          // as given
  std::string scheme_host;  // http://host:port
  std::string path;         // /get_reward
  std::mutex mu;
  std::vector<std::unique_ptr<httplib::Client>> idle;  // kept-alive connections
  std::atomic<int64_t> answered{0};
};

std::string body_of(const std::vector<std::string>& q, const std::vector<std::string>& p,
                    const std::vector<std::string>& l, size_t begin, size_t end) {
  rapidjson::StringBuffer sb;
  rapidjson::Writer<rapidjson::StringBuffer> w(sb);
  auto array = [&](const char* key, const std::vector<std::string>& v) {
    w.Key(key);
    w.StartArray();
    for (size_t i = begin; i < end; ++i) w.String(v[i].data(), static_cast<rapidjson::SizeType>(v[i].size()));
    w.EndArray();
  };
  w.StartObject();
  array("query", q);
  if (!p.empty()) array("prompts", p);
  if (!l.empty()) array("labels", l);
  w.EndObject();
  return sb.GetString();
}

// Numbers of `key` in `d`, exactly n of them; throws a message otherwise.
std::vector<double> numbers(const rapidjson::Value& v, const std::string& what, size_t n) {
  if (!v.IsArray()) throw Error(what + " is not an array");
  if (v.Size() != n) throw Error(what + " has " + std::to_string(v.Size()) + " values for " + std::to_string(n) + " queries");
  std::vector<double> out(n);
  for (rapidjson::SizeType i = 0; i < v.Size(); ++i) {
    if (!v[i].IsNumber()) throw Error(what + "[" + std::to_string(i) + "] is not a number");
    out[i] = v[i].GetDouble();
    if (!std::isfinite(out[i])) throw Error(what + "[" + std::to_string(i) + "] is not finite");
  }
  return out;
}

struct ChunkResult {
  std::vector<double> rewards, scores;
  std::map<std::string, std::vector<double>> extra;
};

ChunkResult parse_answer(const std::string& body, size_t n) {
  rapidjson::Document d;
  // A server's answer: bounded depth like any input, and every number read exactly (RapidJSON's
  // default number parsing can be an ulp off: it read the server's 3.9536185264587402 as
  // 3.9536185264587407, where OpenRLHF's client (Python's json) reads the double the server sent).
  json::ParseStatus st = json::parse_into<rapidjson::kParseFullPrecisionFlag>(d, body);
  if (!st.ok()) throw Error("the answer is not JSON (byte " + std::to_string(st.offset) + ": " + st.message() + ")");
  if (!d.IsObject()) throw Error("the answer is not a JSON object");
  if (!d.HasMember("rewards")) throw Error("the answer has no `rewards`");
  ChunkResult r;
  r.rewards = numbers(d["rewards"], "`rewards`", n);
  r.scores = d.HasMember("scores") ? numbers(d["scores"], "`scores`", n) : r.rewards;
  if (d.HasMember("extra_logs") && d["extra_logs"].IsObject()) {
    for (auto it = d["extra_logs"].MemberBegin(); it != d["extra_logs"].MemberEnd(); ++it) {
      std::string k = it->name.GetString();
      r.extra[k] = numbers(it->value, "`extra_logs." + k + "`", n);
    }
  }
  return r;
}

}  // namespace

struct RewardClient::Impl {
  RewardClientOptions opt;
  std::vector<std::unique_ptr<Endpoint>> endpoints;
  std::atomic<uint64_t> next_url{0};
  std::atomic<int64_t> requests{0}, retries{0};

  std::unique_ptr<httplib::Client> acquire(Endpoint& e) {
    {
      std::lock_guard<std::mutex> g(e.mu);
      if (!e.idle.empty()) {
        auto c = std::move(e.idle.back());
        e.idle.pop_back();
        return c;
      }
    }
    auto c = std::make_unique<httplib::Client>(e.scheme_host);
    auto secs = [](double s, auto f) {
      f(static_cast<time_t>(s), static_cast<time_t>((s - std::floor(s)) * 1e6));
    };
    secs(opt.connect_timeout_s, [&](time_t a, time_t b) { c->set_connection_timeout(a, b); });
    secs(opt.timeout_s, [&](time_t a, time_t b) { c->set_read_timeout(a, b); });
    secs(opt.timeout_s, [&](time_t a, time_t b) { c->set_write_timeout(a, b); });
    c->set_keep_alive(true);
    if (!opt.api_key.empty()) c->set_bearer_token_auth(opt.api_key);
    return c;
  }
  void release(Endpoint& e, std::unique_ptr<httplib::Client> c) {
    std::lock_guard<std::mutex> g(e.mu);
    e.idle.push_back(std::move(c));
  }

  // One chunk, with retries; throws ptk::Error after the last attempt.
  ChunkResult post_chunk(const std::string& body, size_t n, const std::atomic<bool>& abort) {
    const size_t start = static_cast<size_t>(next_url.fetch_add(1) % endpoints.size());
    std::string failures;
    for (int attempt = 1; attempt <= opt.max_attempts; ++attempt) {
      if (abort) throw Error("cancelled: another chunk of this call failed");
      Endpoint& e = *endpoints[(start + static_cast<size_t>(attempt - 1)) % endpoints.size()];
      ++requests;
      if (attempt > 1) ++retries;
      auto c = acquire(e);
      auto res = c->Post(e.path.c_str(), body, "application/json");
      std::string why;
      if (!res) {
        why = httplib::to_string(res.error());
      } else if (res->status == 200) {
        try {
          auto r = parse_answer(res->body, n);
          release(e, std::move(c));
          ++e.answered;
          return r;
        } catch (const Error& err) {
          why = std::string("malformed answer: ") + err.what();
        }
      } else {
        std::string msg = res->body.substr(0, 500);
        if (res->status >= 400 && res->status < 500 && res->status != 408 && res->status != 429) {
          release(e, std::move(c));
          throw Error("reward server " + e.url + " refused the request with HTTP " + std::to_string(res->status) +
                      ": " + msg + "\n(not retried: the request itself is wrong; see the server's message)");
        }
        why = "HTTP " + std::to_string(res->status) + ": " + msg;
        release(e, std::move(c));
      }
      failures += "\n  attempt " + std::to_string(attempt) + ": " + e.url + ": " + why;
      if (attempt < opt.max_attempts) {
        double wait = std::min(opt.max_backoff_s, opt.backoff_s * std::pow(2.0, attempt - 1));
        log::warn("reward client: " + e.url + ": " + why + "; retry " + std::to_string(attempt) + "/" +
                  std::to_string(opt.max_attempts - 1) + " in " + std::to_string(wait).substr(0, 4) + " s");
        auto until = std::chrono::steady_clock::now() + std::chrono::duration<double>(wait);
        while (!abort && std::chrono::steady_clock::now() < until)
          std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
    }
    std::string urls;
    for (const auto& ep : endpoints) urls += (urls.empty() ? "" : ", ") + ep->url;
    throw Error("reward client: " + std::to_string(n) + " queries got no reward after " +
                std::to_string(opt.max_attempts) + " attempts:" + failures +
                "\n---> HINT: check that the reward servers (" + urls + ") are up (GET /health) and reachable; "
                "no reward was made up for these queries");
  }
};

RewardClient::RewardClient(RewardClientOptions options) : impl_(std::make_unique<Impl>()) {
  auto& m = *impl_;
  if (options.urls.empty()) throw Error("reward client: no server URL; give at least one (e.g. http://127.0.0.1:5000)");
  if (options.max_attempts < 1 || options.max_items_per_request < 1 || options.max_concurrency < 1 ||
      !(options.timeout_s > 0) || !(options.connect_timeout_s > 0) || options.backoff_s < 0)
    throw Error("reward client: max_attempts, max_items_per_request, max_concurrency, timeouts must be positive");
  for (const auto& u : options.urls) {
    auto e = std::make_unique<Endpoint>();
    e->url = u;
    size_t scheme = u.find("://");
    if (scheme == std::string::npos || u.compare(0, scheme, "http") != 0)
      throw Error("reward client: URL `" + u + "` must look like http://HOST:PORT (https is not supported here)");
    size_t slash = u.find('/', scheme + 3);
    e->scheme_host = u.substr(0, slash);
    std::string path = slash == std::string::npos ? "" : u.substr(slash);
    while (!path.empty() && path.back() == '/') path.pop_back();
    const std::string tail = "/get_reward";
    e->path = path.size() >= tail.size() && path.compare(path.size() - tail.size(), tail.size(), tail) == 0
                  ? path
                  : path + tail;
    m.endpoints.push_back(std::move(e));
  }
  m.opt = std::move(options);
}

RewardClient::~RewardClient() = default;

RewardResult RewardClient::score(const std::vector<std::string>& queries, const std::vector<std::string>& prompts,
                                 const std::vector<std::string>& labels) {
  auto& m = *impl_;
  const size_t n = queries.size();
  if (!prompts.empty() && prompts.size() != n)
    throw Error("reward client: " + std::to_string(prompts.size()) + " prompts for " + std::to_string(n) + " queries");
  if (!labels.empty() && labels.size() != n)
    throw Error("reward client: " + std::to_string(labels.size()) + " labels for " + std::to_string(n) + " queries");
  RewardResult out;
  if (n == 0) return out;
  const size_t per = static_cast<size_t>(m.opt.max_items_per_request);
  const size_t chunks = (n + per - 1) / per;
  std::vector<ChunkResult> results(chunks);
  std::atomic<size_t> next{0};
  std::atomic<bool> abort{false};
  std::mutex err_mu;
  std::string first_error;
  auto worker = [&] {
    for (size_t c; (c = next.fetch_add(1)) < chunks && !abort;) {
      size_t b = c * per, e = std::min(n, b + per);
      try {
        results[c] = m.post_chunk(body_of(queries, prompts, labels, b, e), e - b, abort);
      } catch (const std::exception& ex) {
        std::lock_guard<std::mutex> g(err_mu);
        if (first_error.empty()) first_error = ex.what();
        abort = true;
      }
    }
  };
  const size_t threads = std::min<size_t>(chunks, static_cast<size_t>(m.opt.max_concurrency));
  if (threads <= 1) {
    worker();
  } else {
    std::vector<std::thread> pool;
    for (size_t t = 0; t < threads; ++t) pool.emplace_back(worker);
    for (auto& t : pool) t.join();
  }
  if (!first_error.empty()) throw Error(first_error);
  for (size_t c = 0; c < chunks; ++c) {
    auto& r = results[c];
    out.rewards.insert(out.rewards.end(), r.rewards.begin(), r.rewards.end());
    out.scores.insert(out.scores.end(), r.scores.begin(), r.scores.end());
    if (c == 0) {
      for (auto& [k, v] : r.extra) out.extra_logs[k];
    }
    for (auto& [k, v] : out.extra_logs) {
      auto it = r.extra.find(k);
      if (it == r.extra.end() || r.extra.size() != out.extra_logs.size())
        throw Error("reward client: the servers' answers disagree on extra_logs keys (`" + k +
                    "` missing from one); are all URLs the same reward server configuration?");
      v.insert(v.end(), it->second.begin(), it->second.end());
    }
  }
  return out;
}

int64_t RewardClient::requests() const { return impl_->requests; }
int64_t RewardClient::retries() const { return impl_->retries; }
std::vector<int64_t> RewardClient::answered_per_url() const {
  std::vector<int64_t> out;
  for (const auto& e : impl_->endpoints) out.push_back(e->answered);
  return out;
}

}  // namespace ptk::reward
