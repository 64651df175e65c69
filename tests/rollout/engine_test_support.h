// What the rollout engine tests share (engine_test, device_loop_test): a fixture's model and one
// mixed set of requests over its generation prompts. Test code only.
#pragma once
#include <string>
#include <vector>

#include "core/model/qwen2.h"
#include "rollout/engine.h"
#include "tests/model/hf_fixture.h"

namespace ptk::rollout::test_support {

inline model::Qwen2Model load(const std::string& cfg) {
  return model::Qwen2Model::from_pretrained(test::fixture_dir(cfg) + "/checkpoint");
}

// The fixture's generation prompts, 3 samples each (seeds 100 + i): greedy, then temperature 0.7
// with top-p 0.9, then 1.3 with top-k 20, 6 + 3i new tokens; then request 1 again with the
// one-token prompt {7} (nothing to prefill) and 2 samples. 11 samples: through 4 slots they refill
// and copy prefixes late.
inline std::vector<Request> mixed_requests(const std::string& cfg) {
  auto e = test::expected_json(cfg);
  std::vector<Request> reqs;
  int i = 0;
  for (const auto& g : e["generation"].GetArray()) {
    Request r;
    r.prompt = test::ints(g["prompt_ids"]);
    r.samples = 3;
    r.seed = 100 + i;
    r.sampling.temperature = i == 0 ? 0.0 : (i == 1 ? 0.7 : 1.3);
    if (i == 2) r.sampling.top_k = 20;
    if (i == 1) r.sampling.top_p = 0.9;
    r.max_new_tokens = 6 + 3 * i;
    reqs.push_back(r);
    ++i;
  }
  reqs.push_back(reqs[1]);
  reqs.back().prompt = {7};
  reqs.back().samples = 2;
  return reqs;
}

}  // namespace ptk::rollout::test_support
