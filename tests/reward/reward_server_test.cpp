// The reward server and client over loopback (127.0.0.1), in-process: the /get_reward round trip
// (reward model + weighted verifiers), 16 concurrent clients batched together with every answer
// equal to the score head's output for that text alone, a burst of 32 connections queued while
// nothing accepts, each bad input's 4xx, /health, /metrics, the bearer token; the client's retries
// against a failing-then-recovering server, a server restarted mid-run, spreading over 2 URLs, and a
// clear error when every attempt fails.
// Not the `ptk reward-server` process and its signals (reward_server_cli_test.cpp).
#include <gtest/gtest.h>
#include <httplib.h>
#include <torch/torch.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>
#include <chrono>
#include <thread>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include "core/checkpoint/hf_config.h"
#include "core/config/recipe.h"
#include "core/model/qwen2.h"
#include "core/tokenizer/tokenizer.h"
#include "core/util/error.h"
#include "core/util/json.h"
#include "datasets/byte_tokenizer.h"
#include "reward/reward_client.h"
#include "reward/reward_server.h"
#include "reward/rm_stage.h"
#include "tests/support/reward_server_thread.h"
#include "tests/support/test_util.h"

namespace ptk {
namespace {

const char* kConfig = R"({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 259,
  "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
  "num_key_value_heads": 2, "max_position_embeddings": 256, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
  "hidden_act": "silu", "initializer_range": 0.1, "tie_word_embeddings": true, "eos_token_id": 258,
  "pad_token_id": 256, "torch_dtype": "float32"})";

// A tiny random reward model folder (byte tokenizer), written once for the whole suite.
class RewardServerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    at::set_num_threads(1);
    dir_ = new test::TempDir();
    std::string rm = dir_->file("rm");
    tasks::write_byte_tokenizer(rm);
    auto m = model::Qwen2Model::from_config(checkpoint::parse_config(kConfig, "config"), 3);
    m.add_score_head(4, 256);
    checkpoint::SaveOptions so;
    so.source_dir = rm;
    m.save_pretrained(rm, so);
  }
  static void TearDownTestSuite() { delete dir_; }
  static std::string rm_dir() { return dir_->file("rm"); }

  // The score of `text` alone (no batching, no padding), as the server should answer it.
  static double expected_score(const std::string& text) {
    static std::mutex mu;
    std::lock_guard<std::mutex> g(mu);
    static model::Qwen2Model m = model::Qwen2Model::from_pretrained(rm_dir());
    static tokenizer::Tokenizer tok = tokenizer::Tokenizer::load(rm_dir());
    torch::NoGradGuard ng;
    auto ids = tok.encode(text);
    std::vector<int64_t> v(ids.begin(), ids.end());
    model::ForwardOptions fo;
    fo.logits = false;
    auto h = m.forward({torch::tensor(v, torch::kInt64).unsqueeze(0), {}, {}, {}}, fo).hidden;
    return m.score(h, torch::tensor({static_cast<int64_t>(v.size()) - 1}, torch::kInt64)).item<double>();
  }

  static test::TempDir* dir_;
};
test::TempDir* RewardServerTest::dir_ = nullptr;

using test::reward_section;
using test::RewardServerThread;

std::string json_array(const std::vector<std::string>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", \"" : "\"") + v[i] + "\"";
  return s + "]";
}

rapidjson::Document parse(const std::string& body) { return json::parse(body, "answer"); }

TEST_F(RewardServerTest, GetRewardRoundTripWithModelAndWeightedVerifiers) {
  RewardServerThread srv(reward_section({"reward.model=" + rm_dir(), "reward.verifiers=[\"math\", \"format_answer\"]",
                       "reward.verifier_weights=[1.0, 0.5]", "reward.model_weight=2.0"}));
  httplib::Client cli("127.0.0.1", srv.port);
  std::vector<std::string> prompts = {"What is 2 + 3? ", "What is 7 + 1? "};
  // As the GRPO client sends it: the response with its end-of-turn token's text.
  std::vector<std::string> query = {prompts[0] + "The answer is 5. <|im_end|>", prompts[1] + "I think 9"};
  auto res = cli.Post("/get_reward",
                      "{\"query\": " + json_array(query) + ", \"prompts\": " + json_array(prompts) +
                          ", \"labels\": [\"5\", \"8\"]}",
                      "application/json");
  ASSERT_TRUE(res);
  ASSERT_EQ(res->status, 200) << res->body;
  auto d = parse(res->body);
  ASSERT_EQ(d["rewards"].Size(), 2u);
  double rm0 = expected_score(query[0]), rm1 = expected_score(query[1]);
  EXPECT_NEAR(d["extra_logs"]["rm"][0].GetDouble(), rm0, 1e-5);
  EXPECT_NEAR(d["extra_logs"]["rm"][1].GetDouble(), rm1, 1e-5);
  EXPECT_EQ(d["extra_logs"]["math"][0].GetDouble(), 1.0);
  EXPECT_EQ(d["extra_logs"]["math"][1].GetDouble(), 0.0);
  EXPECT_EQ(d["extra_logs"]["format_answer"][0].GetDouble(), 1.0);
  EXPECT_EQ(d["extra_logs"]["format_answer"][1].GetDouble(), 0.0);
  EXPECT_NEAR(d["rewards"][0].GetDouble(), 2 * rm0 + 1.0 + 0.5, 1e-5);
  EXPECT_NEAR(d["rewards"][1].GetDouble(), 2 * rm1, 1e-5);
  EXPECT_EQ(d["scores"][0].GetDouble(), d["rewards"][0].GetDouble());
  // OpenRLHF sends only `query` to a model-only server: that works too.
  RewardServerThread model_only(reward_section({"reward.model=" + rm_dir()}));
  httplib::Client c2("127.0.0.1", model_only.port);
  res = c2.Post("/get_reward", "{\"query\": [\"hello\"]}", "application/json");
  ASSERT_TRUE(res);
  ASSERT_EQ(res->status, 200) << res->body;
  EXPECT_NEAR(parse(res->body)["rewards"][0].GetDouble(), expected_score("hello"), 1e-5);
}

TEST_F(RewardServerTest, SixteenConcurrentClientsAreBatchedAndEachGetsItsOwnScores) {
  RewardServerThread srv(reward_section({"reward.model=" + rm_dir(), "reward.max_wait_ms=100", "reward.max_batch_items=64"}));
  constexpr int kClients = 16, kPer = 3;
  std::atomic<int> wrong{0}, failed{0};
  std::vector<std::thread> ts;
  for (int c = 0; c < kClients; ++c) {
    ts.emplace_back([&, c] {
      httplib::Client cli("127.0.0.1", srv.port);
      std::vector<std::string> q;
      for (int i = 0; i < kPer; ++i) q.push_back("client " + std::to_string(c) + std::string(c % 5 + i, '!') + " item " + std::to_string(i));
      auto res = cli.Post("/get_reward", "{\"query\": " + json_array(q) + "}", "application/json");
      if (!res || res->status != 200) {
        std::fprintf(stderr, "client %d: %s\n", c, res ? res->body.c_str() : httplib::to_string(res.error()).c_str());
        ++failed;
        return;
      }
      auto d = parse(res->body);
      for (int i = 0; i < kPer; ++i)
        if (std::abs(d["rewards"][i].GetDouble() - expected_score(q[i])) > 1e-4) ++wrong;
    });
  }
  for (auto& t : ts) t.join();
  EXPECT_EQ(failed, 0);
  EXPECT_EQ(wrong, 0);
  httplib::Client cli("127.0.0.1", srv.port);
  auto m = parse(cli.Get("/metrics")->body);
  std::printf("  %d requests x %d items -> %lld batches, largest %lld items\n", kClients, kPer,
              static_cast<long long>(m["batches"].GetInt64()), static_cast<long long>(m["batch_items_max"].GetInt64()));
  EXPECT_EQ(m["requests"].GetInt64(), kClients);
  EXPECT_EQ(m["items"].GetInt64(), kClients * kPer);
  EXPECT_EQ(m["errors"].GetInt64(), 0);
  EXPECT_GT(m["batch_items_max"].GetInt64(), kPer) << "concurrent requests were never batched together";
  EXPECT_LT(m["batches"].GetInt64(), kClients);
  EXPECT_GE(m["latency_ms_p99"].GetDouble(), m["latency_ms_p50"].GetDouble());
}

// The accept queue of the listening socket on `port` (Linux: /proc/net/tcp's rx_queue column of a
// LISTEN row is the number of connections waiting for accept()); -1 when not found.
long accept_queue_length(int port) {
  std::ifstream f("/proc/net/tcp");
  std::string line;
  std::getline(f, line);  // header
  while (std::getline(f, line)) {
    std::istringstream is(line);
    std::string sl, local, remote, st, queues;
    is >> sl >> local >> remote >> st >> queues;
    if (st != "0A" || std::stol(local.substr(local.find(':') + 1), nullptr, 16) != port) continue;
    return std::stol(queues.substr(queues.find(':') + 1), nullptr, 16);
  }
  return -1;
}

// Rollout workers connect in bursts. Debian's cpp-httplib listens with a backlog of 5, so before
// the server raised it a burst of more than 6 connections overflowed the accept queue and the kernel
// dropped the rest for a second or reset them (seen in CI as 3 of 16 clients failing with `Read`).
// Here 32 connections arrive while nothing accepts: all must wait in the queue, and all be served.
TEST_F(RewardServerTest, ABurstOfConnectionsWaitsInTheAcceptQueueAndIsServed) {
  if (!std::ifstream("/proc/net/tcp")) PTK_SKIP_WITHOUT("procfs") << "no /proc/net/tcp to read the accept queue from";
  reward::RewardServer srv(reward_section({"reward.verifiers=[\"exact\"]"}));
  int port = srv.bind();
  constexpr int kConns = 32;
  std::vector<int> fds;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  for (int i = 0; i < kConns; ++i) {
    int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    ASSERT_GE(fd, 0);
    timeval connect_timeout{2, 0};  // a full accept queue drops SYNs: connect() would retry for minutes
    ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &connect_timeout, sizeof connect_timeout);
    if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
      ADD_FAILURE() << "connection " << i + 1 << " of " << kConns << ": " << std::strerror(errno);
      ::close(fd);
      break;
    }
    fds.push_back(fd);
  }
  long queued = -1;  // the handshakes' last ACKs reach the listener asynchronously: wait up to 5 s
  for (int i = 0; i < 500 && (queued = accept_queue_length(port)) < kConns; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  if (queued != kConns) {  // fail now: serving the dropped ones would wait out the kernel's retries
    for (int fd : fds) ::close(fd);
    FAIL() << queued << " of " << kConns << " connections in the accept queue: the listen backlog is too small";
  }
  std::thread serving([&] { srv.serve(); });
  const std::string req = "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
  int ok = 0;
  for (int fd : fds) {
    timeval tv{30, 0};
    ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    ASSERT_EQ(::send(fd, req.data(), req.size(), MSG_NOSIGNAL), static_cast<ssize_t>(req.size()));
    std::string got;
    char buf[512];
    for (ssize_t n; (n = ::recv(fd, buf, sizeof buf, 0)) > 0;) got.append(buf, static_cast<size_t>(n));
    ok += got.rfind("HTTP/1.1 200", 0) == 0;
    ::close(fd);
  }
  EXPECT_EQ(ok, kConns);
  srv.stop();
  serving.join();
}

// OpenRLHF builds the query as tokenizer.decode(prompt ids + response ids) but sends its raw prompt:
// a decomposed prompt comes back composed (Qwen2's tokenizer normalizes to NFC), and a prompt it
// left-truncated is not the start of the query at all. Verifiers cut the NFC form off; a
// model-only server ignores `prompts`, as OpenRLHF's own serve_rm does (found by
// tests/reference/reward_protocol_test.py, where both were 400s that OpenRLHF retried 5 times).
TEST_F(RewardServerTest, PromptsAsOpenRlhfSendsThem) {
  RewardServerThread verifier(reward_section({"reward.verifiers=[\"math\"]"}));
  httplib::Client cli("127.0.0.1", verifier.port);
  // "Cafe\u0301" (e + combining acute) in the prompt, "Caf\u00e9" in the query.
  auto res = cli.Post("/get_reward",
                      "{\"query\": [\"Caf\\u00e9 7? The answer is 12.\"], \"prompts\": [\"Cafe\\u0301 7? \"], "
                      "\"labels\": [\"12\"]}",
                      "application/json");
  ASSERT_TRUE(res);
  ASSERT_EQ(res->status, 200) << res->body;
  EXPECT_EQ(parse(res->body)["rewards"][0].GetDouble(), 1.0);
  // Neither form is the query's start: still refused, the verifiers would not know the response.
  res = cli.Post("/get_reward", "{\"query\": [\"e 7? 12\"], \"prompts\": [\"Cafe 7? \"], \"labels\": [\"12\"]}",
                 "application/json");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 400) << res->body;
  EXPECT_NE(res->body.find("does not start with prompts[0]"), std::string::npos) << res->body;
  RewardServerThread model_only(reward_section({"reward.model=" + rm_dir()}));
  httplib::Client c2("127.0.0.1", model_only.port);
  res = c2.Post("/get_reward", "{\"query\": [\"the end of a long prompt, then a reply\"], \"prompts\": [\"A long prompt\"]}",
                "application/json");
  ASSERT_TRUE(res);
  ASSERT_EQ(res->status, 200) << res->body;
  EXPECT_NEAR(parse(res->body)["rewards"][0].GetDouble(), expected_score("the end of a long prompt, then a reply"), 1e-5);
}

TEST_F(RewardServerTest, BadInputGetsA4xxWithAMessage) {
  RewardServerThread srv(reward_section({"reward.model=" + rm_dir(), "reward.verifiers=[\"math\"]", "reward.max_items=4",
                       "reward.max_body_bytes=2000", "reward.max_tokens_per_item=50"}));
  httplib::Client cli("127.0.0.1", srv.port);
  struct Case {
    std::string body;
    int status;
    std::string says;
  };
  std::vector<Case> cases = {
      {"{not json", 400, "invalid JSON"},
      {"[1, 2]", 400, "JSON object"},
      {"{\"prompts\": [\"a\"], \"labels\": [\"1\"]}", 400, "missing field `query`"},
      {"{\"query\": \"a b\", \"labels\": [\"1\"]}", 400, "`query` must be an array"},
      {"{\"query\": [\"a\", 3], \"labels\": [\"1\", \"2\"]}", 400, "`query[1]` must be a string"},
      {"{\"query\": [\"a\", \"b\"], \"labels\": [\"1\"]}", 400, "`labels` has 1 items"},
      {"{\"query\": [\"a\", \"b\"], \"prompts\": [\"a\"], \"labels\": [\"1\", \"2\"]}", 400, "`prompts` has 1 items"},
      {"{\"query\": [\"xa\"], \"prompts\": [\"a\"], \"labels\": [\"1\"]}", 400, "does not start with prompts[0]"},
      {"{\"query\": [\"a\"]}", 400, "missing field `labels`"},
      {"{\"query\": [\"a\", \"b\"], \"labels\": [\"1\", \"\"]}", 400, "labels[1] is empty: verifier `math`"},
      {"{\"query\": [\"a\",\"b\",\"c\",\"d\",\"e\"], \"labels\": [\"1\",\"1\",\"1\",\"1\",\"1\"]}", 413, "at most 4"},
      {"{\"query\": [\"" + std::string(60, 'x') + "\"], \"labels\": [\"1\"]}", 413, "max_tokens_per_item"},
      {"{\"query\": [\"" + std::string(3000, 'x') + "\"], \"labels\": [\"1\"]}", 413, "max_body_bytes"},
  };
  for (const auto& c : cases) {
    auto res = cli.Post("/get_reward", c.body, "application/json");
    ASSERT_TRUE(res) << c.body.substr(0, 80);
    EXPECT_EQ(res->status, c.status) << c.body.substr(0, 80) << " -> " << res->body;
    EXPECT_NE(res->body.find(c.says), std::string::npos) << c.body.substr(0, 80) << " -> " << res->body;
    EXPECT_NE(res->body.find("\"error\""), std::string::npos) << res->body;
  }
  auto nf = cli.Get("/nope");
  ASSERT_TRUE(nf);
  EXPECT_EQ(nf->status, 404);
  // The server still works, and counted the errors.
  auto ok = cli.Post("/get_reward", "{\"query\": [\"1+1=2\"], \"labels\": [\"2\"]}", "application/json");
  ASSERT_TRUE(ok);
  EXPECT_EQ(ok->status, 200) << ok->body;
  auto m = parse(cli.Get("/metrics")->body);
  EXPECT_EQ(m["errors"].GetInt64(), static_cast<int64_t>(cases.size()));
  EXPECT_EQ(m["requests"].GetInt64(), static_cast<int64_t>(cases.size()) + 1);
}

// A body nested 1M levels deep (2 MB) is a 400 naming the depth limit, and the server keeps serving:
// it used to overflow the stack of the HTTP thread and kill the server (exit 139).
TEST_F(RewardServerTest, DeeplyNestedBodiesGetA400AndTheServerKeepsServing) {
  RewardServerThread srv(reward_section({"reward.verifiers=[\"exact\"]", "reward.max_body_bytes=8000000"}));
  httplib::Client cli("127.0.0.1", srv.port);
  const size_t n = 1000000;
  std::string objects;
  for (size_t i = 0; i < n; ++i) objects += "{\"a\":";
  for (const std::string& body : {std::string(n, '[') + std::string(n, ']'), "{\"query\": " + std::string(n, '['), objects}) {
    auto res = cli.Post("/get_reward", body, "application/json");
    ASSERT_TRUE(res) << "no answer to a deep body: " << body.substr(0, 40);
    EXPECT_EQ(res->status, 400) << res->body;
    EXPECT_NE(res->body.find("nested deeper than 512 levels"), std::string::npos) << res->body;
    auto ok = cli.Post("/get_reward", "{\"query\": [\"abc\"], \"labels\": [\"abc\"]}", "application/json");
    ASSERT_TRUE(ok);
    EXPECT_EQ(ok->status, 200) << ok->body;
  }
}

TEST_F(RewardServerTest, HealthAndBearerToken) {
  RewardServerThread srv(reward_section({"reward.verifiers=[\"exact\"]", "reward.api_key=s3cret"}));
  httplib::Client cli("127.0.0.1", srv.port);
  auto h = cli.Get("/health");
  ASSERT_TRUE(h);
  EXPECT_EQ(h->status, 200);
  EXPECT_NE(h->body.find("ok"), std::string::npos);
  std::string body = "{\"query\": [\"abc\"], \"labels\": [\"abc\"]}";
  auto no = cli.Post("/get_reward", body, "application/json");
  ASSERT_TRUE(no);
  EXPECT_EQ(no->status, 401) << no->body;
  cli.set_bearer_token_auth("s3cret");
  auto yes = cli.Post("/get_reward", body, "application/json");
  ASSERT_TRUE(yes);
  EXPECT_EQ(yes->status, 200) << yes->body;
  EXPECT_EQ(parse(yes->body)["rewards"][0].GetDouble(), 1.0);
}

TEST(RewardServerConfig, RefusesNoSourceAndUnknownVerifier) {
  EXPECT_THROW(reward_section({}), Error);
  try {
    reward::RewardServer s(reward_section({"reward.verifiers=[\"maht\"]"}));
    FAIL() << "an unknown verifier was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("math"), std::string::npos) << e.what();
  }
}

// --- client ---------------------------------------------------------------------------------

reward::RewardClientOptions fast(std::vector<std::string> urls) {
  reward::RewardClientOptions o;
  o.urls = std::move(urls);
  o.backoff_s = 0.02;
  o.max_backoff_s = 0.2;
  o.connect_timeout_s = 1;
  o.timeout_s = 10;
  return o;
}

TEST(RewardClient, RetriesAServerThatFailsThenRecovers) {
  httplib::Server fake;
  std::atomic<int> calls{0};
  fake.Post("/get_reward", [&](const httplib::Request&, httplib::Response& res) {
    if (++calls <= 2) {
      res.status = 503;
      res.set_content("{\"error\": \"warming up\"}", "application/json");
      return;
    }
    res.set_content("{\"rewards\": [0.25, 0.5], \"scores\": [0.25, 0.5], \"extra_logs\": {\"rm\": [1, 2]}}",
                    "application/json");
  });
  int port = fake.bind_to_any_port("127.0.0.1");
  std::thread t([&] { fake.listen_after_bind(); });
  auto client = std::make_unique<reward::RewardClient>(fast({"http://127.0.0.1:" + std::to_string(port)}));
  auto r = client->score({"a", "b"}, {}, {});
  EXPECT_EQ(client->retries(), 2);
  client.reset();  // closes its kept-alive connection, so stop() need not wait for it
  fake.stop();
  t.join();
  EXPECT_EQ(r.rewards, (std::vector<double>{0.25, 0.5}));
  EXPECT_EQ(r.extra_logs.at("rm"), (std::vector<double>{1, 2}));
  EXPECT_EQ(calls.load(), 3);
}

// A fake server that always answers `answer`: scoring `queries` must fail naming `says`.
void expect_answer_refused(const std::string& answer, const std::vector<std::string>& queries, const std::string& says) {
  httplib::Server fake;
  fake.Post("/get_reward", [&](const httplib::Request&, httplib::Response& res) {
    res.set_content(answer, "application/json");
  });
  int port = fake.bind_to_any_port("127.0.0.1");
  std::thread t([&] { fake.listen_after_bind(); });
  auto o = fast({"http://127.0.0.1:" + std::to_string(port)});
  o.max_attempts = 2;
  {
    reward::RewardClient client(o);
    try {
      client.score(queries, {}, {});
      ADD_FAILURE() << "accepted the answer " << answer.substr(0, 60);
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(says), std::string::npos) << e.what();
    }
  }
  fake.stop();
  t.join();
}

// Rewards are read as the exact doubles the server wrote: RapidJSON's default number parsing read
// 3.9536185264587402 as 3.9536185264587407 (tests/reference/reward_protocol_test.py, where
// OpenRLHF's client, Python's json, read the server's double).
TEST(RewardClient, ReadsTheServersNumbersExactly) {
  httplib::Server fake;
  fake.Post("/get_reward", [&](const httplib::Request&, httplib::Response& res) {
    res.set_content("{\"rewards\": [3.9536185264587402, 0.1], \"extra_logs\": {\"rm\": [2.9536185264587402, 1e-7]}}",
                    "application/json");
  });
  int port = fake.bind_to_any_port("127.0.0.1");
  std::thread t([&] { fake.listen_after_bind(); });
  reward::RewardResult r;
  {
    reward::RewardClient client(fast({"http://127.0.0.1:" + std::to_string(port)}));
    r = client.score({"a", "b"}, {}, {});
  }
  fake.stop();
  t.join();
  EXPECT_EQ(r.rewards, (std::vector<double>{3.9536185264587402, 0.1}));
  EXPECT_EQ(r.scores, r.rewards);
  EXPECT_EQ(r.extra_logs.at("rm"), (std::vector<double>{2.9536185264587402, 1e-7}));
}

TEST(RewardClient, MalformedAnswersAreErrorsNotZeros) {
  // One value for two queries.
  expect_answer_refused("{\"rewards\": [0.25]}", {"a", "b"}, "1 values for 2 queries");
}

// An answer nested 1M levels deep is a malformed answer (named), not a crash of the trainer.
TEST(RewardClient, ADeeplyNestedAnswerIsAnErrorNotACrash) {
  expect_answer_refused("{\"rewards\": " + std::string(1000000, '['), {"a"},
                        "the answer is not JSON (byte 523: nested deeper than 512 levels)");
}

TEST(RewardClient, SpreadsChunksOverTwoUrlsInOrder) {
  auto s = reward_section({"reward.verifiers=[\"exact\"]"});
  RewardServerThread a(s), b(s);
  auto o = fast({a.url(), b.url() + "/get_reward"});
  o.max_items_per_request = 2;
  o.max_concurrency = 3;
  reward::RewardClient client(o);
  std::vector<std::string> q, labels;
  for (int i = 0; i < 9; ++i) {
    q.push_back("answer " + std::to_string(i));
    labels.push_back(i % 3 == 0 ? q.back() : "other");  // reward 1 exactly where i % 3 == 0
  }
  auto r = client.score(q, {}, labels);
  ASSERT_EQ(r.rewards.size(), 9u);
  for (int i = 0; i < 9; ++i) EXPECT_EQ(r.rewards[i], i % 3 == 0 ? 1.0 : 0.0) << i;
  EXPECT_EQ(r.extra_logs.at("exact").size(), 9u);
  auto per = client.answered_per_url();
  EXPECT_GT(per[0], 0);
  EXPECT_GT(per[1], 0);
  EXPECT_EQ(per[0] + per[1], 5);
}

TEST(RewardClient, PicksUpAServerRestartedMidRun) {
  auto s = reward_section({"reward.verifiers=[\"exact\"]"});
  auto first = std::make_unique<RewardServerThread>(s);
  int port = first->port;
  auto o = fast({first->url()});
  o.max_attempts = 20;
  o.backoff_s = 0.05;
  reward::RewardClient client(o);
  EXPECT_EQ(client.score({"x"}, {}, {"x"}).rewards[0], 1.0);
  first.reset();  // the server goes away ...
  std::unique_ptr<RewardServerThread> second;
  std::thread restart([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(400));
    second = std::make_unique<RewardServerThread>(s, port);  // ... and comes back on the same port
  });
  auto r = client.score({"y"}, {}, {"z"});
  restart.join();
  EXPECT_EQ(r.rewards[0], 0.0);
  EXPECT_GT(client.retries(), 0);
}

TEST(RewardClient, ErrorsClearlyWhenEveryAttemptFails) {
  int dead_port;
  {
    // A port that was free a moment ago and has no listener: bound, never listened, closed.
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
    socklen_t len = sizeof a;
    getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
    dead_port = ntohs(a.sin_port);
    close(fd);
  }
  auto o = fast({"http://127.0.0.1:" + std::to_string(dead_port), "http://127.0.0.1:" + std::to_string(dead_port)});
  o.max_attempts = 3;
  reward::RewardClient client(o);
  try {
    client.score({"a"}, {}, {});
    FAIL() << "no error although no server answers";
  } catch (const Error& e) {
    std::string msg = e.what();
    EXPECT_NE(msg.find("after 3 attempts"), std::string::npos) << msg;
    EXPECT_NE(msg.find("attempt 3"), std::string::npos) << msg;
    EXPECT_NE(msg.find("no reward was made up"), std::string::npos) << msg;
  }
  EXPECT_EQ(client.requests(), 3);
  // A 4xx is the request's fault: reported at once, not retried.
  RewardServerThread srv(reward_section({"reward.verifiers=[\"exact\"]"}));
  reward::RewardClient c2(fast({srv.url()}));
  try {
    c2.score({"a"}, {}, {});  // no labels for a verifier
    FAIL() << "a 400 was not reported";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("HTTP 400"), std::string::npos) << e.what();
  }
  EXPECT_EQ(c2.retries(), 0);
}

}  // namespace
}  // namespace ptk
