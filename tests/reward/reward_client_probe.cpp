// reward_client_probe: ptk's RewardClient (reward/reward_client.h) as a command, for the reference
// suite (tests/reference/reward_protocol_test.py), which holds it side by side with OpenRLHF's own
// client. No `ptk` command scores a file against a URL (GRPO is the client's only user), so this
// probe is how a test reaches the very code GRPO runs.
//   reward_client_probe --url URL [--url URL2 ...] [--max-attempts N] [--backoff S] [--max-backoff S]
//                       [--timeout S] [--max-items-per-request K] [--max-concurrency C] < rows.jsonl
// Each input line: {"query": "...", "prompt": "...", "label": "..."} (prompt and label optional, but
// all lines alike). Prints one JSON line: {"rewards": [...], "scores": [...], "extra_logs": {...},
// "requests": n, "retries": n, "answered_per_url": [...]} and exits 0; or, when score() throws,
// {"error": "...", "requests": n, "retries": n} and exits 2. Bad arguments exit 64.
#include <rapidjson/stringbuffer.h>
#include <rapidjson/writer.h>

#include <cstdlib>
#include <iostream>
#include <string>
#include <vector>

#include "core/util/json.h"
#include "reward/reward_client.h"

namespace {

int usage(const std::string& why) {
  std::cerr << "reward_client_probe: " << why
            << "\nusage: reward_client_probe --url URL [--url URL2 ...] [--max-attempts N] [--backoff S] "
               "[--max-backoff S] [--timeout S] [--max-items-per-request K] [--max-concurrency C] < rows.jsonl\n";
  return 64;
}

void array(rapidjson::Writer<rapidjson::StringBuffer>& w, const std::vector<double>& v) {
  w.StartArray();
  for (double x : v) w.Double(x);
  w.EndArray();
}

}  // namespace

int main(int argc, char** argv) {
  using namespace ptk;
  reward::RewardClientOptions o;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (i + 1 >= argc) return usage(a + " needs a value");
    std::string v = argv[++i];
    if (a == "--url") o.urls.push_back(v);
    else if (a == "--max-attempts") o.max_attempts = std::atoi(v.c_str());
    else if (a == "--backoff") o.backoff_s = std::atof(v.c_str());
    else if (a == "--max-backoff") o.max_backoff_s = std::atof(v.c_str());
    else if (a == "--timeout") o.timeout_s = std::atof(v.c_str());
    else if (a == "--max-items-per-request") o.max_items_per_request = std::atoll(v.c_str());
    else if (a == "--max-concurrency") o.max_concurrency = std::atoi(v.c_str());
    else return usage("unknown option " + a);
  }
  std::vector<std::string> queries, prompts, labels;
  for (std::string line; std::getline(std::cin, line);) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    auto d = json::parse(line, "stdin line " + std::to_string(queries.size() + 1));
    queries.emplace_back(d["query"].GetString(), d["query"].GetStringLength());
    if (d.HasMember("prompt")) prompts.emplace_back(d["prompt"].GetString(), d["prompt"].GetStringLength());
    if (d.HasMember("label")) labels.emplace_back(d["label"].GetString(), d["label"].GetStringLength());
  }
  rapidjson::StringBuffer sb;
  rapidjson::Writer<rapidjson::StringBuffer> w(sb);
  int rc = 0;
  std::unique_ptr<reward::RewardClient> client;
  try {
    client = std::make_unique<reward::RewardClient>(o);
    auto r = client->score(queries, prompts, labels);
    w.StartObject();
    w.Key("rewards");
    array(w, r.rewards);
    w.Key("scores");
    array(w, r.scores);
    w.Key("extra_logs");
    w.StartObject();
    for (const auto& [k, v] : r.extra_logs) {
      w.Key(k.c_str());
      array(w, v);
    }
    w.EndObject();
    w.Key("answered_per_url");
    w.StartArray();
    for (int64_t n : client->answered_per_url()) w.Int64(n);
    w.EndArray();
  } catch (const std::exception& e) {
    w.StartObject();
    w.Key("error");
    w.String(e.what());
    rc = 2;
  }
  w.Key("requests");
  w.Int64(client ? client->requests() : 0);
  w.Key("retries");
  w.Int64(client ? client->retries() : 0);
  w.EndObject();
  std::cout << sb.GetString() << std::endl;
  return rc;
}
