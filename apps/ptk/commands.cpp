#include "apps/ptk/commands.h"

namespace ptk::app {

// Each command is defined in cmd_<name>.cpp (every one is built: a missing file is a link error).
int cmd_sft(int argc, char** argv);
int cmd_dpo(int argc, char** argv);
int cmd_grpo(int argc, char** argv);
int cmd_rm(int argc, char** argv);
int cmd_reward_server(int argc, char** argv);
int cmd_generate(int argc, char** argv);
int cmd_prepare(int argc, char** argv);
int cmd_tokenize(int argc, char** argv);
int cmd_inspect_data(int argc, char** argv);
int cmd_forward(int argc, char** argv);
int cmd_eval(int argc, char** argv);
int cmd_make_data(int argc, char** argv);
int cmd_launch(int argc, char** argv);
int cmd_pipeline(int argc, char** argv);
int cmd_sweep(int argc, char** argv);
int cmd_plot(int argc, char** argv);
int cmd_info(int argc, char** argv);
int cmd_merge_lora(int argc, char** argv);
int cmd_plan(int argc, char** argv);

// Keep docs/DESIGN.md's order.
const std::vector<Command>& commands() {
  static const std::vector<Command> kCommands = {
      {"sft", "supervised fine-tuning from an HF folder to a fine-tuned one", cmd_sft},
      {"dpo", "offline RL: DPO/IPO/SimPO on preference pairs against a frozen reference", cmd_dpo},
      {"grpo", "online RL: rollouts, rewards, group-relative advantages, clipped update", cmd_grpo},
      {"rm", "train a Bradley-Terry reward model (Qwen2 + score head)", cmd_rm},
      {"reward-server", "serve rewards over HTTP (OpenRLHF's /get_reward protocol)", cmd_reward_server},
      {"generate", "batched sampling from a model folder (KV cache, continuous batching)", cmd_generate},
      {"prepare", "tokenize JSONL data into packed, memory-mapped shards", cmd_prepare},
      {"tokenize", "encode JSONL text (or chat messages) to token ids", cmd_tokenize},
      {"inspect-data", "print prepared rows as text with the trained tokens marked (what a stage trains on)",
       cmd_inspect_data},
      {"forward", "run a model on input ids and write logits (and scores) as safetensors", cmd_forward},
      {"eval", "held-out accuracy of a model through a verifier", cmd_eval},
      {"make-data", "generate the arithmetic demo task (SFT, preference and RL splits)", cmd_make_data},
      {"launch", "start N local ranks with torchrun's environment", cmd_launch},
      {"pipeline", "run SFT -> DPO -> RM -> GRPO stages from one recipe", cmd_pipeline},
      {"sweep", "run a grid of recipe overrides and compare them", cmd_sweep},
      {"plot", "plot metrics of one or more runs as SVG", cmd_plot},
      {"merge-lora", "merge a PEFT LoRA adapter folder into its base: a plain HF model folder", cmd_merge_lora},
      {"plan", "print a training recipe's memory plan (full or LoRA) and whether it fits, without training", cmd_plan},
      {"info", "print the runtime (LibTorch, threads, BLAS) and measure matmul GFLOP/s", cmd_info},
  };
  return kCommands;
}

}  // namespace ptk::app
