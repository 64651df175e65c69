// What every benchmark in bench/ needs besides its own work: wall-clock seconds, the load average to
// print beside each figure (the machine is shared), the source tree to find assets and recipes, and
// the rollout benchmarks' model shapes.
#pragma once
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <string>

namespace ptk::bench {

using Clock = std::chrono::steady_clock;

inline double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// "1-min 5-min 15-min" from /proc/loadavg.
inline std::string loadavg() {
  std::ifstream f("/proc/loadavg");
  std::string a, b, c;
  f >> a >> b >> c;
  return a + " " + b + " " + c;
}

#ifdef PTK_SOURCE_DIR_DEFAULT
// $PTK_SOURCE_DIR, else the source tree this benchmark was built from.
inline std::string source_dir() {
  const char* env = std::getenv("PTK_SOURCE_DIR");
  return env ? env : PTK_SOURCE_DIR_DEFAULT;
}
#endif

// config.json of the rollout benchmarks' shapes: "0.5b" = Qwen2.5-0.5B's; otherwise "small": the same
// vocabulary (so the LM head and sampling cost are real) on a narrow 4-layer trunk.
inline std::string rollout_shape_json(const std::string& shape) {
  const bool big = shape == "0.5b";
  return std::string(R"({"architectures":["Qwen2ForCausalLM"],"model_type":"qwen2","vocab_size":151936,)") +
         (big ? R"("hidden_size":896,"intermediate_size":4864,"num_hidden_layers":24,"num_attention_heads":14,)"
              : R"("hidden_size":256,"intermediate_size":704,"num_hidden_layers":4,"num_attention_heads":4,)") +
         R"("num_key_value_heads":2,"max_position_embeddings":32768,"rope_theta":1000000.0,"rms_norm_eps":1e-6,)"
         R"("tie_word_embeddings":true,"initializer_range":0.02,"torch_dtype":"float32"})";
}

}  // namespace ptk::bench
