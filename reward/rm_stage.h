// The reward-model stage (`ptk rm`): Bradley–Terry training of Qwen2 + a scalar score head on
// preference pairs, TRL's RewardTrainer definitions (docs/FORMULAS.md section 3). Algorithm: put the B
// chosen rows then the B rejected rows (prompt + reply, right-padded) through the model in one batch,
// read the score at each row's rightmost non-pad token, loss −logσ(r⁺ − r⁻ − margin) (+ centering).
// Starts from an SFT folder (a score head is added, normal(0, initializer_range)) or a config; writes
// final/ in HF Qwen2ForSequenceClassification layout. Not the loss itself (rm_loss.h), not serving.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "core/config/sections.h"  // TrainingRecipe
#include "core/model/qwen2.h"       // Qwen2Model
#include "core/parallel/comm.h"     // Comm
#include "core/train/trainer.h"     // Stage

namespace ptk::model {
class Qwen2Model;
}

namespace ptk::reward {

// The `rm` recipe section.
struct RmSection : config::Section {
  double center_rewards_coefficient;
  std::string margin_column;
  int64_t eval_micro_batch_size;
  const char* name() const override { return "rm"; }
  const char* help() const override { return "reward-model (Bradley–Terry) training"; }
  void visit(config::Visitor& v) override;
  void validate(config::Errors& e) const override;
};

struct RmRecipe : config::TrainingRecipe {
  RmSection rm;
  std::vector<config::Section*> all_sections() {
    auto s = sections();
    s.push_back(&rm);
    return s;
  }
};

// Scores of token rows as TRL/transformers pool them: the model's score head at each row's
// rightmost token whose id is not `pad_id`. ids (R, T) int64 right-padded with pad_id, lengths (R)
// real tokens per row (attention). Returns (R) float, differentiable. Thread-safe as model.forward.
// `checkpointed`: recompute each decoder layer in backward (model.activation_checkpointing).
// Works on any device (ids and lengths on the model's); `row_spans` (host-side {0, length} per row,
// train::right_padded_spans) spares the forward a read of the mask back to the host.
// One function for every reader of a reward model: the RM stage (training and eval), the reward
// server, `ptk eval --reward-model` and GRPO's held-out eval. pad_id unset: the last real token.
at::Tensor score_rows(const model::Qwen2Model& model, const at::Tensor& ids, const at::Tensor& lengths,
                      std::optional<int64_t> pad_id, bool checkpointed = false,
                      const std::vector<std::pair<int64_t, int64_t>>& row_spans = {});

// Right-pads token lists into (R, T) ids (pad_id) and (R) lengths.
std::pair<at::Tensor, at::Tensor> pad_rows(const std::vector<std::vector<int64_t>>& rows, int64_t pad_id);

// The stage `ptk rm` trains (run_rm builds it the same way), for tests that drive its steps.
std::unique_ptr<train::Stage> make_rm_stage(RmRecipe& recipe, const std::string& run_dir, parallel::Comm comm);

// Runs the whole stage: prepare (or reuse) pairs, build/load the model and add the score head,
// train with core/train's loop (checkpoints, resume), write run_dir/final. Returns the run folder.
// Under `ptk launch -n W` each rank trains on its share of every global micro-batch (W ranks × B
// pairs see what 1 rank × W·B sees); min_reward/max_reward are taken over every rank's scores.
std::string run_rm(RmRecipe& recipe, const std::string& recipe_file, const std::string& resolved_recipe);

}  // namespace ptk::reward
