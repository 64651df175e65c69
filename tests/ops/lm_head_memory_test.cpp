// Real shape (label slow): sequence 8192, vocab 151,936, hidden 896 — 5 GB of fp32 logits if they
// were materialised. Loss forward + backward through the fused op must raise peak RSS by < 1.5 GB
// (that includes the 0.5 GB gradient of the lm_head weight itself).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "core/model/lm_head_logprobs.h"
#include "core/runtime/runtime.h"
#include "core/util/strings.h"

namespace ptk::model {
namespace {

TEST(LmHeadMemory, Seq8192Vocab151936UnderOnePointFiveGB) {
  runtime::init(0);
  const int64_t n = 8192, hdim = 896, v = 151936;
  torch::manual_seed(0);
  auto hidden = (torch::randn({n, hdim}) * 0.1).requires_grad_(true);
  auto weight = (torch::randn({v, hdim}) * 0.02).requires_grad_(true);
  auto targets = torch::randint(0, v, {n}, torch::kInt64);
  runtime::reset_peak_rss();  // freed memory handed back first: "before" is live data only
  size_t before = runtime::current_rss_bytes();
  auto out = lm_head_logprobs(hidden, weight, targets);
  at::Tensor loss = -out.logprobs.mean();
  loss.backward();
  size_t peak = runtime::peak_rss_bytes();
  double raised = static_cast<double>(peak) - static_cast<double>(before);
  std::printf("loss %.4f; peak RSS raised by %s (fp32 logits alone would be %s)\n", loss.item<double>(),
              format_bytes(raised).c_str(), format_bytes(4.0 * n * v).c_str());
  EXPECT_LT(raised, 1.5 * (1ull << 30)) << format_bytes(raised);
  EXPECT_TRUE(hidden.grad().defined());
  EXPECT_TRUE(weight.grad().defined());
  EXPECT_TRUE(std::isfinite(loss.item<double>()));
}

}  // namespace
}  // namespace ptk::model
