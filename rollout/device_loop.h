// The rollout engine's decode loop kept on the model's device: each slot's next token, position,
// activity and sampling state live in persistent device buffers; a decode step runs over slots
// [0, n) with fixed shapes (Qwen2Model::decode_step), samples by tensor ops (sample_rows_tensor) and
// advances the state on the device. Per step at most one host->device copy (the admissions'
// changes, packed into one staging buffer) and one device->host copy (ids + log-probs, packed). On
// CUDA each (n, kv_len) shape's step is captured once as a CUDA graph and replayed.
// Not the scheduler (engine.cpp admits, checks stops and frees slots) and not prefill.
//
// Threading and ownership: one thread; a DeviceLoop lives for one Engine::generate() call and
// holds references to the model and the cache (both must outlive it). Its CUDA graphs and their
// memory pool go with it.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "rollout/sampling.h"  // SamplingParams, Drawn

namespace ptk::model {
class Qwen2Model;
class KVCache;
}  // namespace ptk::model

namespace ptk::rollout {

// sample_uniform(seed, sample, step) elementwise by int64 tensor ops, on any device: seed holds the
// uint64 seeds' bits, sample and step the indices (int64, one shape) -> float64 of that shape, equal
// to sample_uniform bit for bit (int64 arithmetic wraps as uint64's does; shifts made logical).
at::Tensor sample_uniform_tensor(const at::Tensor& seed, const at::Tensor& sample, const at::Tensor& step);

// Per-row sampling parameters on the logits' device, (R) each.
struct RowSampling {
  at::Tensor inv_temperature;  // float32: float(1 / temperature), 1 for greedy rows
  at::Tensor greedy;           // bool
  at::Tensor top_k;            // int64, 0 = off
  at::Tensor top_p;            // float64, 1 = off
  at::Tensor uniform;          // float64 in (0, 1): the row's draw
};

// sample_rows's chain by fixed-shape tensor ops (no host synchronisation, nothing shaped by the
// data): temperature, vocabulary limit, top-k (ties kept), top-p (float64 masses of the sorted row,
// as apply_top_p_sorting_), inverse-CDF draw at the row's uniform (float64 cumulative mass, as the
// host's plain rows), argmax for greedy rows; the log-prob under the full softmax of logits / T.
// filters = false leaves top-k / top-p out (no sort): only when no row uses them. logits (R, V).
Drawn sample_rows_tensor(const at::Tensor& logits, const RowSampling& rows, int64_t vocab_limit, bool filters);

// KV-cache slots for a memory budget (vLLM's gpu_memory_utilization): the most slots, up to
// `wanted`, whose bytes_per_slot each fit in fraction x total_bytes minus what is in use now
// (total_bytes - free_bytes). Throws ptk::Error saying what to change when not even one fits.
int64_t cache_slots_that_fit(int64_t wanted, int64_t bytes_per_slot, double fraction, size_t free_bytes,
                             size_t total_bytes);

class DeviceLoop {
 public:
  // Buffers for the cache's slots on the model's device. vocab_limit as EngineOptions'; filters:
  // whether any row of this call may use top-k / top-p; cuda_graphs: capture and replay each (n, kv_len)'s
  // step (CUDA only; ignored elsewhere).
  DeviceLoop(const model::Qwen2Model& model, model::KVCache& cache, int64_t vocab_limit, bool filters, bool cuda_graphs);
  ~DeviceLoop();
  DeviceLoop(const DeviceLoop&) = delete;
  DeviceLoop& operator=(const DeviceLoop&) = delete;

  // Stages a slot's new sample (sent with the next step's one host->device copy): it feeds `token`
  // at cache position `position`, draws with sample_uniform(seed, sample, step) from `step` on.
  void admit(int64_t slot, int64_t token, int64_t position, uint64_t seed, int64_t sample, int64_t step,
             const SamplingParams& p);
  // Stages a slot as idle (its rows are computed and ignored, its KV writes land at position 0).
  void release(int64_t slot);

  // One decode step over slots [0, n); active slots advance (token, position, step) on the device.
  struct Row {
    int64_t id;
    double logprob;
  };
  // Host results per slot [0, n) (those of idle slots meaningless): valid until the next step.
  // kv_len: the cache positions the step reads (0 = all max_len); above every active slot's position.
  // Each (n, kv_len) is one shape: one CUDA graph.
  const std::vector<Row>& step(int64_t n, int64_t kv_len = 0);

  int64_t h2d_copies = 0, d2h_copies = 0;  // what step() copied, in total
  int64_t graph_captures = 0, graph_replays = 0;

 private:
  void apply_staged();
  void body(int64_t n, int64_t kv_len);  // the step on the device: what a graph captures, what eager mode runs

  const model::Qwen2Model& model_;
  model::KVCache& cache_;
  int64_t vocab_limit_;
  bool filters_;
  bool graphs_on_;
  int64_t S_;
  at::Tensor inv_freq_;  // (D/2) float32 on the device
  double rope_scale_ = 1.0;
  at::Tensor state_;       // (S, kFields) int64 on the device: one row per slot
  at::Tensor stage_host_;  // (S, 1 + kFields) int64, pinned on CUDA: slot, then its new row
  at::Tensor stage_dev_;   // (S, 1 + kFields) int64 on the device
  std::vector<int64_t> staged_row_;  // per slot: its row in stage_host_, or -1
  int64_t staged_ = 0;
  at::Tensor out_dev_;   // (S, 2) int64: id, bits of the float64 log-prob
  at::Tensor out_host_;  // (S, 2) int64, pinned on CUDA
  std::vector<Row> rows_;
  struct Graphs;         // the CUDA graphs per n (CUDA builds)
  std::unique_ptr<Graphs> graphs_;
};

}  // namespace ptk::rollout
