// The training memory estimate (core/train/memory_estimate.h): parameter count, the terms against
// the 0.5B shape's measured peaks, the refusal naming the key responsible and the largest value that
// fits, the machine-memory parsers, and check_memory_estimate's train.memory_check switch. Not the
// stages' wiring (their CLI tests run a refused recipe through `ptk`).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <fstream>
#include <sstream>

#include "core/config/sections.h"
#include "core/parallel/comm.h"
#include "core/train/from_recipe.h"
#include "core/train/memory_estimate.h"
#include "core/util/error.h"
#include "tests/shapes/qwen25_05b.h"

namespace ptk::train {
namespace {

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

MemoryPlan plan_05b(StageKind stage) {
  MemoryPlan p;
  p.stage = stage;
  p.model = test::qwen25_05b_config();
  p.model_key = "model.config=qwen2.5-0.5b.json";
  p.flash_attention = true;  // as on this AVX-512 host, where the peaks below were measured
  p.decode_packing = true;
  return p;
}

double term(const std::vector<MemoryTerm>& terms, const std::string& what) {
  for (const auto& t : terms)
    if (t.what == what) return t.bytes;
  ADD_FAILURE() << "no term " << what;
  return 0;
}

TEST(MemoryEstimate, CountsQwen25HalfBParameters) {
  // Qwen2.5-0.5B: 494,032,768 parameters (tied embedding, q/k/v biases).
  EXPECT_EQ(estimate_memory(plan_05b(StageKind::kSft)).parameters, 494032768.0);
  // The RM stage replaces the (tied) lm_head by a (1, H) score head.
  EXPECT_EQ(estimate_memory(plan_05b(StageKind::kRm)).parameters, 494032768.0 + 896);
  // Untied: a second V x H matrix.
  MemoryPlan untied = plan_05b(StageKind::kSft);
  untied.model.tie_word_embeddings = false;
  EXPECT_EQ(estimate_memory(untied).parameters, 494032768.0 + 151936.0 * 896);
}

// The measured peaks the estimate was checked against (BENCHMARKS.md, "The figures behind the README"; 2 cores,
// 24 GiB, fp32, AVX-512 flash attention, peak RSS = VmHWM including the process itself): it must not
// fall below them, stay within 25% above them, and let these runs through on a 24 GiB machine with
// a few GiB taken by others (under 16 GiB).
TEST(MemoryEstimate, AgreesWithMeasuredPeaksOfTheHalfBShape) {
  struct Case {
    const char* what;
    MemoryPlan plan;
    double measured;
  };
  MemoryPlan sft4096 = plan_05b(StageKind::kSft);  // tests/shapes: one packed row of 4096, checkpointed
  sft4096.max_seq_len = 4096;
  sft4096.activation_checkpointing = true;
  MemoryPlan sft1024 = plan_05b(StageKind::kSft);  // bench/sft_vs_python.sh 0.5b: `ptk sft`, 1 x 1024 packed
  sft1024.max_seq_len = 1024;
  MemoryPlan dpo = plan_05b(StageKind::kDpo);  // tests/shapes: one pair of 1024, live reference, checkpointed
  dpo.max_seq_len = 1024;
  dpo.live_reference = true;
  dpo.activation_checkpointing = true;
  for (const Case& c : {Case{"SFT step at 4096 (9.70 GB)", sft4096, 9.70e9},
                        Case{"ptk sft at 1024 (10.12-10.86 GiB; the higher)", sft1024, 10.86 * kGiB},
                        Case{"ptk sft at 1024 (the lower)", sft1024, 10.12 * kGiB},
                        Case{"DPO step at 1024 (11.44 GB)", dpo, 11.44e9}}) {
    const double est = estimate_memory(c.plan).total_bytes;
    EXPECT_GE(est, c.measured) << c.what << ": estimate " << est / kGiB << " GiB";
    EXPECT_LE(est, 1.25 * c.measured) << c.what << ": estimate " << est / kGiB << " GiB";
    EXPECT_LT(est, 16 * kGiB) << c.what;
  }
}

TEST(MemoryEstimate, TermsFollowTheRecipe) {
  MemoryPlan sft = plan_05b(StageKind::kSft);
  sft.micro_batch_size = 8;
  const auto base = estimate_memory(sft);
  EXPECT_EQ(base.phase, "training step");
  const double P = base.parameters;
  EXPECT_DOUBLE_EQ(term(base.resident, "weights"), 4 * P);
  EXPECT_DOUBLE_EQ(term(base.resident, "gradients"), 4 * P);
  EXPECT_DOUBLE_EQ(term(base.resident, "AdamW moments"), 8 * P);
  // DPO's chosen + rejected rows: 4 pairs make the activations of 8 SFT rows.
  MemoryPlan dpo = plan_05b(StageKind::kDpo);
  dpo.micro_batch_size = 4;
  EXPECT_DOUBLE_EQ(term(estimate_memory(dpo).peak, "activations"), term(base.peak, "activations"));
  // Activations grow with rows; checkpointing keeps one H-wide input per layer plus one layer.
  MemoryPlan twice = sft;
  twice.micro_batch_size = 16;
  EXPECT_NEAR(term(estimate_memory(twice).peak, "activations"), 2 * term(base.peak, "activations"), 1.0);
  MemoryPlan ckpt = sft;
  ckpt.activation_checkpointing = true;
  EXPECT_LT(term(estimate_memory(ckpt).peak, "activations"), term(base.peak, "activations") / 5);
  // Without the flash kernel the block path keeps the causal half of the probabilities per layer.
  MemoryPlan block = sft;
  block.flash_attention = false;
  const double probs = 8.0 * 14 * 2048 * 2048 / 2 * 4 * 24;
  EXPECT_NEAR(term(estimate_memory(block).peak, "activations") - term(base.peak, "activations"), probs, 1.0);
  // bf16: 2-byte weights and gradients, fp32 master weights beside the moments.
  MemoryPlan bf16 = sft;
  bf16.bf16 = true;
  const auto b = estimate_memory(bf16);
  EXPECT_DOUBLE_EQ(term(b.resident, "weights"), 2 * P);
  EXPECT_DOUBLE_EQ(term(b.resident, "AdamW moments + fp32 master weights"), 12 * P);
  // ZeRO-1 over 4 ranks keeps a quarter of the optimizer state.
  MemoryPlan z = sft;
  z.zero1 = true;
  z.world_size = 4;
  EXPECT_DOUBLE_EQ(term(estimate_memory(z).resident, "AdamW moments"), 2 * P);
  EXPECT_DOUBLE_EQ(term(estimate_memory(z).resident, "gradients"), 4 * P) << "ZeRO-1 keeps whole gradients";
  // ZeRO-2 over 4 ranks: a quarter of the gradients as well.
  MemoryPlan z2 = sft;
  z2.zero2 = true;
  z2.world_size = 4;
  const auto e2 = estimate_memory(z2);
  EXPECT_DOUBLE_EQ(term(e2.resident, "AdamW moments"), 2 * P);
  EXPECT_DOUBLE_EQ(term(e2.resident, "gradients"), P);
  EXPECT_NEAR(estimate_memory(z).total_bytes - e2.total_bytes, 3 * P, 1.0);
  // GRPO's generation phase: a KV cache of slots x (prompt + completion) x layers x K and V.
  MemoryPlan grpo = plan_05b(StageKind::kGrpo);
  grpo.micro_batch_size = 1;
  grpo.max_seq_len = 512;
  grpo.completion_len = 512;
  grpo.slots = 4096;
  const auto g = estimate_memory(grpo);
  EXPECT_EQ(g.phase, "generation");
  EXPECT_DOUBLE_EQ(term(g.peak, "KV cache"), 4096.0 * 1024 * 24 * 2 * 128 * 4);
}

// grpo.reference_device=host on a GPU: the reference copy leaves the device's resident terms and
// becomes a phase of its own (the copy uploaded for the pass + its forward without gradients); the
// run then peaks at the largest of the training step, the generation and that pass, so the estimate
// drops by the reference's P·b exactly when the pass is not the peak. On the CPU host memory is the
// device's: nothing changes.
TEST(MemoryEstimate, GrpoReferenceOnHostLeavesTheDevice) {
  MemoryPlan same = plan_05b(StageKind::kGrpo);
  same.bf16 = true;
  same.cuda = true;
  same.live_reference = true;
  same.micro_batch_size = 8;
  same.max_seq_len = 256;
  same.completion_len = 512;
  same.slots = 64;
  MemoryPlan host = same;
  host.reference_on_host = true;
  const auto a = estimate_memory(same), b = estimate_memory(host);
  const double P = a.parameters;
  EXPECT_DOUBLE_EQ(term(a.resident, "frozen reference model"), 2 * P);
  for (const auto& t : b.resident) EXPECT_NE(t.what, "frozen reference model");
  // Here the training step (8 x 768 tokens of activations) is larger than the reference pass.
  EXPECT_EQ(b.phase, "training step");
  EXPECT_DOUBLE_EQ(a.total_bytes - b.total_bytes, 2 * P);
  // One row of 64 tokens: the pass (the uploaded copy) is the peak, and the estimate says so.
  MemoryPlan small = host;
  small.micro_batch_size = 1;
  small.max_seq_len = 32;
  small.completion_len = 32;
  small.slots = 1;
  const auto c = estimate_memory(small);
  EXPECT_EQ(c.phase, "reference log-prob pass");
  EXPECT_DOUBLE_EQ(term(c.peak, "frozen reference model (uploaded from host memory)"), 2 * P);
  // The CPU: the same estimate either way.
  same.cuda = host.cuda = false;
  EXPECT_DOUBLE_EQ(estimate_memory(same).total_bytes, estimate_memory(host).total_bytes);
}

// LoRA (issue 28): r·(in + out) per adapted linear and layer, as PEFT counts them (its
// print_trainable_parameters for Qwen2.5-0.5B, r=16, all-linear: 8,798,208), modules_to_save beside.
TEST(MemoryEstimate, CountsLoraParametersAsPeft) {
  const auto c = test::qwen25_05b_config();
  EXPECT_EQ(lora_parameter_count(c, 16, {"all-linear"}, {}, StageKind::kSft), 8798208.0);
  // PEFT's default targets for Qwen2 (q_proj, v_proj): 24 x 16 x ((896 + 896) + (896 + 128)).
  EXPECT_EQ(lora_parameter_count(c, 16, {"q_proj", "v_proj"}, {}, StageKind::kSft), 24.0 * 16 * (1792 + 1024));
  EXPECT_EQ(lora_parameter_count(c, 8, {"down_proj"}, {}, StageKind::kSft), 24.0 * 8 * (4864 + 896));
  // The rm stage always trains the (1, H) score head; embed_tokens is a V x H copy.
  EXPECT_EQ(lora_parameter_count(c, 16, {"all-linear"}, {}, StageKind::kRm), 8798208.0 + 896);
  EXPECT_EQ(lora_parameter_count(c, 16, {"all-linear"}, {"embed_tokens"}, StageKind::kSft), 8798208.0 + 151936.0 * 896);
  // Qwen2.5-32B's published count (32,763,876,352) from bench/shapes' config values.
  checkpoint::Qwen2Config q32 = c;
  q32.vocab_size = 152064;
  q32.hidden_size = 5120;
  q32.intermediate_size = 27648;
  q32.num_hidden_layers = 64;
  q32.num_attention_heads = 40;
  q32.num_key_value_heads = 8;
  q32.head_dim = 128;
  q32.tie_word_embeddings = false;
  MemoryPlan p = plan_05b(StageKind::kSft);
  p.model = q32;
  EXPECT_EQ(estimate_memory(p).parameters, 32763876352.0);
}

// Under LoRA the base is resident once, frozen (no gradients, moments or masters); the adapters
// carry the optimizer state; DPO's and GRPO's reference is the base with adapters off (no copy).
TEST(MemoryEstimate, LoraKeepsOnlyTheAdaptersOptimizerState) {
  MemoryPlan full = plan_05b(StageKind::kDpo);
  full.bf16 = true;
  full.cuda = true;
  full.live_reference = true;
  full.max_seq_len = 1024;
  MemoryPlan lora = full;
  lora.lora = true;
  lora.lora_rank = 16;
  lora.live_reference = false;  // what the stages set under LoRA without dpo.ref_path (adapters off)
  const auto f = estimate_memory(full), l = estimate_memory(lora);
  const double P = f.parameters, Pl = 8798208.0;
  EXPECT_EQ(l.parameters, P);
  EXPECT_EQ(l.trainable_parameters, Pl);
  EXPECT_EQ(f.trainable_parameters, P);
  EXPECT_DOUBLE_EQ(term(l.resident, "frozen base weights"), 2 * P);
  EXPECT_DOUBLE_EQ(term(l.resident, "LoRA weights"), 2 * Pl);
  EXPECT_DOUBLE_EQ(term(l.resident, "LoRA gradients"), 2 * Pl);
  EXPECT_DOUBLE_EQ(term(l.resident, "LoRA AdamW moments + fp32 master weights"), 12 * Pl);
  for (const auto& t : l.resident) {
    EXPECT_NE(t.what, "frozen reference model") << "a live reference under LoRA is the base with adapters off";
    EXPECT_NE(t.what, "gradients");
  }
  EXPECT_DOUBLE_EQ(term(f.resident, "frozen reference model"), 2 * P);
  {
    // dpo.ref_path under LoRA loads a real second model: counted.
    MemoryPlan with_ref = lora;
    with_ref.live_reference = true;
    EXPECT_DOUBLE_EQ(term(estimate_memory(with_ref).resident, "frozen reference model"), 2 * P);
  }
  // Activations as without LoRA; the difference is exactly the state and the frozen output layer's
  // (V, H) fp32 gradient, which the fused lm_head op makes only for a trained weight.
  EXPECT_DOUBLE_EQ(term(l.peak, "activations"), term(f.peak, "activations"));
  const double VH4 = static_cast<double>(full.model.vocab_size) * static_cast<double>(full.model.hidden_size) * 4;
  EXPECT_DOUBLE_EQ(term(f.peak, "lm_head log-probs (fused op)") - term(l.peak, "lm_head log-probs (fused op)"), VH4);
  EXPECT_DOUBLE_EQ(f.total_bytes - l.total_bytes, (2 * P + 2 * P + 12 * P) - (2 * Pl + 2 * Pl + 12 * Pl) + VH4);
  // ZeRO-1 shards the adapters' optimizer state as it does the full model's.
  lora.zero1 = true;
  lora.world_size = 4;
  EXPECT_DOUBLE_EQ(term(estimate_memory(lora).resident, "LoRA AdamW moments + fp32 master weights"), 3 * Pl);
}

// The plans the README quotes: Qwen2.5-7B on one 80 GB GPU, bf16, 1 x 4096 checkpointed. Full
// fine-tuning's state (2 + 2 + 12 bytes a parameter: ~114 GiB) cannot fit; LoRA r16 on all linears
// leaves the frozen 14.2 GiB base and ~0.6 GiB of adapter state, with room for activations.
TEST(MemoryEstimate, LoraFitsSevenBOnOneEightyGigabyteGpu) {
  MemoryPlan p = plan_05b(StageKind::kSft);
  p.model.vocab_size = 152064;
  p.model.hidden_size = 3584;
  p.model.intermediate_size = 18944;
  p.model.num_hidden_layers = 28;
  p.model.num_attention_heads = 28;
  p.model.num_key_value_heads = 4;
  p.model.head_dim = 128;
  p.model.tie_word_embeddings = false;
  p.bf16 = true;
  p.cuda = true;
  p.max_seq_len = 4096;
  p.activation_checkpointing = true;
  const AvailableMemory gpu{80e9, "--gpu-memory 80 GB"};
  EXPECT_NEAR(estimate_memory(p).parameters, 7.6156e9, 0.001e9);  // Qwen2.5-7B: 7.62B
  const std::string full = memory_refusal(p, gpu);
  EXPECT_NE(full.find("no batch or length key makes this fit"), std::string::npos) << full;
  EXPECT_NE(full.find("model.lora.enabled=true"), std::string::npos) << full;
  p.lora = true;
  EXPECT_EQ(memory_refusal(p, gpu), "");
  const auto e = estimate_memory(p);
  EXPECT_NEAR(e.trainable_parameters, 40370176.0, 0.5);  // PEFT: 40,370,176 for r=16 all-linear
  EXPECT_LT(e.total_bytes, 30 * kGiB);
}

// issue 24: train.micro_batch_size=1e9 met the OOM killer. The refusal names the key and value,
// the model, the estimate and what is available with units, and the largest value that fits.
TEST(MemoryEstimate, RefusesAHugeMicroBatchNamingTheKey) {
  MemoryPlan p = plan_05b(StageKind::kSft);
  p.micro_batch_size = 1000000000;
  AvailableMemory avail{20 * kGiB, "MemAvailable"};
  const std::string msg = memory_refusal(p, avail);
  for (const char* want : {"train.micro_batch_size=1000000000 x data.max_seq_len=2048 needs ~",
                           "for activations (model.activation_checkpointing=false)",
                           "(hidden 896, 24 layers, vocab 151936)", "has 20.00 GiB available (MemAvailable)",
                           "TiB", "weights: 1.84 GiB (model.config=qwen2.5-0.5b.json; 494M parameters, float32)",
                           "training step, activations: ",
                           "lower train.micro_batch_size to ", "train.memory_check=false"})
    EXPECT_NE(msg.find(want), std::string::npos) << want << "\n" << msg;
  // The value offered is the largest that fits.
  const auto at = msg.find("lower train.micro_batch_size to ");
  ASSERT_NE(at, std::string::npos);
  const int64_t fits = std::stoll(msg.substr(at + 32));
  ASSERT_GE(fits, 1);
  p.micro_batch_size = fits;
  EXPECT_EQ(memory_refusal(p, avail), "") << "the offered value does not fit";
  p.micro_batch_size = fits + 1;
  EXPECT_NE(memory_refusal(p, avail), "") << "a larger value fits too";
}

// issue 24: data.max_seq_len=1e9 died in std::bad_alloc. Even one row does not fit, so only
// data.max_seq_len is offered.
TEST(MemoryEstimate, RefusesAHugeSequenceNamingTheKey) {
  MemoryPlan p = plan_05b(StageKind::kSft);
  p.max_seq_len = 1000000000;
  const std::string msg = memory_refusal(p, {20 * kGiB, "MemAvailable"});
  EXPECT_NE(msg.find("train.micro_batch_size=1 x data.max_seq_len=1000000000 needs ~"), std::string::npos) << msg;
  EXPECT_NE(msg.find("lower data.max_seq_len to "), std::string::npos) << msg;
  EXPECT_EQ(msg.find("lower train.micro_batch_size"), std::string::npos) << msg;
}

TEST(MemoryEstimate, NamesGrpoAndDpoKeys) {
  MemoryPlan g = plan_05b(StageKind::kGrpo);
  g.micro_batch_size = 2;
  g.max_seq_len = 256;
  g.completion_len = 256;
  g.slots = 100000;
  std::string msg = memory_refusal(g, {20 * kGiB, "MemAvailable"});
  EXPECT_NE(msg.find("rollout.slots=100000 x (data.max_seq_len=256 + grpo.max_completion_length=256) needs ~"),
            std::string::npos)
      << msg;
  EXPECT_NE(msg.find("for KV cache"), std::string::npos) << msg;
  EXPECT_NE(msg.find("lower rollout.slots to "), std::string::npos) << msg;
  MemoryPlan d = plan_05b(StageKind::kDpo);
  d.micro_batch_size = 100000;
  msg = memory_refusal(d, {20 * kGiB, "MemAvailable"});
  EXPECT_NE(msg.find("train.micro_batch_size=100000 pairs (200000 rows) x data.max_seq_len=2048"), std::string::npos)
      << msg;
  EXPECT_NE(msg.find("Rows are padded to the longest record"), std::string::npos) << msg;
}

TEST(MemoryEstimate, FitsOrUnknownIsNoRefusal) {
  MemoryPlan p = plan_05b(StageKind::kSft);
  p.max_seq_len = 1024;
  EXPECT_EQ(memory_refusal(p, {20 * kGiB, "MemAvailable"}), "");
  EXPECT_NE(memory_refusal(p, {8 * kGiB, "MemAvailable"}), "");  // 4P alone is 7.4 GiB
  EXPECT_EQ(memory_refusal(p, {-1, ""}), "");                      // nothing known: nothing refused
  // Weights and AdamW alone too large: no batch key helps, and the message says so.
  std::string msg = memory_refusal(p, {4 * kGiB, "MemAvailable"});
  EXPECT_NE(msg.find("no batch or length key makes this fit: what stays resident (weights, gradients, AdamW state) "
                     "needs ~7.86 GiB of the 4.00 GiB"),
            std::string::npos)
      << msg;
  // When no key alone is enough, the keys are lowered together, in order.
  p.micro_batch_size = 1000000000;
  p.max_seq_len = 1000000000;
  msg = memory_refusal(p, {11 * kGiB, "MemAvailable"});
  EXPECT_NE(msg.find("lower train.micro_batch_size to 1 and data.max_seq_len to "), std::string::npos) << msg;
}

TEST(MachineMemory, ParsesProcAndCgroupFiles) {
  EXPECT_DOUBLE_EQ(meminfo_available_bytes("MemTotal:       24683772 kB\nMemFree:  1 kB\nMemAvailable:   20224468 kB\n"),
                   20224468.0 * 1024);
  EXPECT_EQ(meminfo_available_bytes("MemTotal: 5 kB\n"), -1);
  EXPECT_EQ(cgroup_limit_bytes("max\n"), -1);
  EXPECT_EQ(cgroup_limit_bytes("9223372036854771712\n"), -1);  // cgroup v1's "no limit"
  EXPECT_DOUBLE_EQ(cgroup_limit_bytes("17179869184\n"), 17179869184.0);
  EXPECT_EQ(cgroup_limit_bytes(""), -1);
  const std::string stat = "anon 100\nfile 4096\ntotal_cache 8192\n";
  EXPECT_DOUBLE_EQ(memory_stat_bytes(stat, "file"), 4096);
  EXPECT_DOUBLE_EQ(memory_stat_bytes(stat, "total_cache"), 8192);
  EXPECT_EQ(memory_stat_bytes(stat, "shmem"), -1);
}

// On Linux the CPU figure exists and is at most the machine's memory.
TEST(MachineMemory, AvailableIsAtMostPhysicalMemory) {
  const AvailableMemory a = available_memory(false);
  ASSERT_GT(a.bytes, 0) << a.source;
  std::ifstream in("/proc/meminfo");
  std::string name;
  double kb = 0;
  in >> name >> kb;
  ASSERT_EQ(name, "MemTotal:");
  EXPECT_LE(a.bytes, kb * 1024);
  EXPECT_FALSE(a.source.empty());
}

// The CUDA figure: a device's free memory where one is usable; unknown (nothing refused) otherwise,
// as on CPU-only machines and builds.
TEST(MachineMemory, CudaDeviceFreeMemoryOrUnknown) {
  const AvailableMemory a = available_memory(true, 0);
  if (!torch::cuda::is_available()) {
    EXPECT_LT(a.bytes, 0) << a.source;
    return;
  }
  EXPECT_GT(a.bytes, 0);
  EXPECT_NE(a.source.find("CUDA device 0 free"), std::string::npos) << a.source;
  EXPECT_LT(available_memory(true, 1000).bytes, 0);  // no such device
}

// The stages' entry point: refused with the key, unless train.memory_check=false.
TEST(MemoryEstimate, MemoryCheckFalseSkipsTheRefusal) {
  MemoryPlan p = plan_05b(StageKind::kSft);
  p.micro_batch_size = 1000000000;  // ~10^5 TiB: more than any machine
  config::TrainingRecipe r;
  r.train.memory_check = true;
  parallel::Comm one;
  try {
    check_memory_estimate(r, p, one);
    ADD_FAILURE() << "not refused";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("train.micro_batch_size=1000000000"), std::string::npos) << e.what();
  }
  r.train.memory_check = false;
  EXPECT_NO_THROW(check_memory_estimate(r, p, one));
}

}  // namespace
}  // namespace ptk::train
