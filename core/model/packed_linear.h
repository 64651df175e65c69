// A Qwen2 model's weights packed for decode steps: one implementation of the layer's linears
// (core/model/linear.h) on kernels::cpu::PackedLinear (core/kernels/cpu/packed_linear.h).
#pragma once
#include <cstdint>
#include <optional>
#include <vector>

#include "core/kernels/cpu/packed_linear.h"

namespace ptk::model {

using kernels::cpu::PackedLinear;

// Qwen2Model::pack_for_decode's result; forward_cached uses it for calls of one token per row
// (prefills keep at::linear, whose many rows amortise OpenBLAS's repack). At Qwen2.5-0.5B's shape
// the 24 layers' linears cost 219 ms per one-row step through at::mm and 103 ms packed
// (rollout_bench --lm-head, BENCHMARKS.md).
struct PackedDecodeWeights {
  struct Layer {
    PackedLinear q, k, v, o, gate, up, down;
  };
  std::vector<Layer> layers;            // empty: the trunk runs through at::linear
  std::optional<PackedLinear> lm_head;  // empty: the logits go through at::mm
  int64_t bytes() const;
};

}  // namespace ptk::model
