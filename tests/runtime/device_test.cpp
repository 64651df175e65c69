// run.device / --device: the spellings, what auto picks, and the error for a GPU that is not there.
#include "core/runtime/device.h"

#include <gtest/gtest.h>
#include <torch/cuda.h>

#include <cstdlib>

#include "core/util/error.h"

namespace ptk::runtime {
namespace {

TEST(DeviceSpec, Spellings) {
  for (const char* ok : {"auto", "cpu", "cuda", "cuda:0", "cuda:7", "meta"}) EXPECT_TRUE(valid_device_spec(ok)) << ok;
  for (const char* bad : {"", "gpu", "CUDA", "cuda:", "cuda:x", "cuda:-1", "cpu:0", "cuda:0 ", "cuda:12345"})
    EXPECT_FALSE(valid_device_spec(bad)) << bad;
}

TEST(DeviceSpec, ResolvesOrRefusesClearly) {
  EXPECT_EQ(resolve_device("cpu"), at::Device(at::kCPU));
  EXPECT_EQ(resolve_device("meta", "run.device", /*allow_meta=*/true), at::Device(at::kMeta));
  try {  // a command computes nothing on meta: only tests ask for it
    resolve_device("meta", "--device");
    FAIL() << "meta resolved without allow_meta";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--device = meta"), std::string::npos) << e.what();
  }
  try {
    resolve_device("gpu");
    FAIL() << "gpu is not a device spelling";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("run.device"), std::string::npos) << e.what();
  }
  const int n = torch::cuda::is_available() ? static_cast<int>(torch::cuda::device_count()) : 0;
  if (n == 0) {
    EXPECT_EQ(resolve_device("auto"), at::Device(at::kCPU));
    for (const char* spec : {"cuda", "cuda:0"}) {
      try {
        resolve_device(spec, "--device");
        FAIL() << spec << " resolved on a machine without a GPU";
      } catch (const Error& e) {
        const std::string m = e.what();
        EXPECT_NE(m.find("--device = " + std::string(spec)), std::string::npos) << m;
        EXPECT_NE(m.find("HINT"), std::string::npos) << m;
      }
    }
  } else {
    EXPECT_TRUE(resolve_device("auto").is_cuda());
    EXPECT_EQ(resolve_device("cuda:0"), at::Device(at::kCUDA, 0));
    EXPECT_THROW(resolve_device("cuda:" + std::to_string(n)), Error);
  }
  EXPECT_EQ(device_name(at::Device(at::kCUDA, 1)), "cuda:1");
  EXPECT_EQ(device_name(at::Device(at::kCPU)), "cpu");
}

// `ptk launch` and torchrun give each rank LOCAL_RANK (RANK when it is unset): run.device=cuda and
// auto then take cuda:LOCAL_RANK, so each rank's model shares a GPU with its process group (Comm
// reads the same variable). The choice without a GPU: resolve_device_for with a GPU count.
TEST(DeviceSpec, RanksTakeTheGpuOfTheirLocalRank) {
  const char* saved_local = std::getenv("LOCAL_RANK");
  const char* saved_rank = std::getenv("RANK");
  const std::string keep_local = saved_local ? saved_local : "", keep_rank = saved_rank ? saved_rank : "";
  setenv("LOCAL_RANK", "3", 1);
  setenv("RANK", "7", 1);
  EXPECT_EQ(resolve_device_for("cuda", 4), at::Device(at::kCUDA, 3));
  EXPECT_EQ(resolve_device_for("auto", 4), at::Device(at::kCUDA, 3));
  EXPECT_EQ(resolve_device_for("cuda:1", 4), at::Device(at::kCUDA, 1)) << "cuda:N is taken as written";
  EXPECT_EQ(resolve_device_for("auto", 0), at::Device(at::kCPU));
  EXPECT_EQ(resolve_device_for("cpu", 4), at::Device(at::kCPU));
  unsetenv("LOCAL_RANK");
  EXPECT_EQ(resolve_device_for("cuda", 8), at::Device(at::kCUDA, 7)) << "RANK when LOCAL_RANK is unset";
  unsetenv("RANK");
  EXPECT_EQ(resolve_device_for("cuda", 2), at::Device(at::kCUDA, 0));
  setenv("LOCAL_RANK", "4", 1);
  try {
    resolve_device_for("cuda", 4);
    ADD_FAILURE() << "local rank 4 got a GPU on a 4-GPU machine";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("(local rank 4) but this machine has 4 CUDA GPUs"), std::string::npos)
        << e.what();
  }
  setenv("LOCAL_RANK", "x", 1);
  EXPECT_THROW(resolve_device_for("cuda", 4), Error);
  if (saved_local) setenv("LOCAL_RANK", keep_local.c_str(), 1);
  else unsetenv("LOCAL_RANK");
  if (saved_rank) setenv("RANK", keep_rank.c_str(), 1);
  else unsetenv("RANK");
}

}  // namespace
}  // namespace ptk::runtime
