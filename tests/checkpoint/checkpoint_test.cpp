// Safetensors read/write and HF checkpoint folders: byte-identical writes against files made by
// the `safetensors` library, sharded round trips, config.json fields, atomic folder saves, and
// hostile files refused with clear errors. Not model numerics (tests/model).
#include <gtest/gtest.h>
#include <sys/resource.h>
#include <torch/torch.h>

#include <csignal>
#include <cstring>
#include <filesystem>
#include <functional>

#include "core/checkpoint/checkpoint.h"
#include "core/checkpoint/hf_config.h"
#include "core/checkpoint/safetensors_header.h"
#include "core/model/qwen2.h"
#include "core/util/error.h"
#include "core/util/fs.h"
#include "core/util/json.h"
#include "tests/model/hf_fixture.h"
#include "tests/support/test_util.h"

namespace ptk {
namespace {

using namespace ptk::checkpoint;
using test::fixture_dir;

NamedTensors as_list(const TensorMap& m) { return NamedTensors(m.begin(), m.end()); }

TEST(Safetensors, WriteIsByteIdenticalToTheSafetensorsLibrary) {
  for (std::string f : {"tiny-tied/checkpoint/model.safetensors", "tiny-tied/checkpoint-bf16/model.safetensors",
                        "tiny-untied/checkpoint/model.safetensors", "tiny-tied/seqcls-checkpoint/model.safetensors",
                        "tiny-untied/checkpoint-sharded/model-00001-of-00002.safetensors",
                        "tiny-tied/expected.safetensors"}) {
    test::TempDir tmp;
    auto tensors = read_safetensors(fixture_dir() + "/" + f);
    write_safetensors(tmp.file("out.safetensors"), as_list(tensors));
    EXPECT_EQ(read_file(tmp.file("out.safetensors")), read_file(fixture_dir() + "/" + f)) << f;
  }
}

TEST(Safetensors, ReadsAreZeroCopyAndCopyOnWrite) {
  const auto path = fixture_dir("tiny-tied") + "/checkpoint/model.safetensors";
  auto f = MappedSafetensors::open(path);
  EXPECT_EQ(f->header().metadata.at("format"), "pt");
  auto a = f->get("model.norm.weight"), b = f->get("model.norm.weight");
  EXPECT_EQ(a.data_ptr(), b.data_ptr());  // both views of the mapping
  auto before = read_file(path);
  a.mul_(2);                              // private page: the file is untouched
  EXPECT_EQ(read_file(path), before);
  f.reset();
  EXPECT_TRUE(torch::isfinite(b).all().item<bool>());  // tensors keep the mapping alive
  EXPECT_THROW(MappedSafetensors::open(path)->get("nope"), Error);
}

TEST(Safetensors, ShardedReadEqualsSingleFile) {
  auto one = read_checkpoint_tensors(fixture_dir("tiny-untied") + "/checkpoint");
  auto sharded = read_checkpoint_tensors(fixture_dir("tiny-untied") + "/checkpoint-sharded");
  ASSERT_EQ(one.size(), sharded.size());
  for (const auto& [n, t] : one) EXPECT_TRUE(torch::equal(t, sharded.at(n))) << n;
}

TEST(Safetensors, ShardedWriteRoundTripIsByteStable) {
  auto tensors = read_checkpoint_tensors(fixture_dir("tiny-untied") + "/checkpoint");
  test::TempDir a, b;
  auto files = write_sharded_safetensors(a.path(), as_list(tensors), 300'000);
  ASSERT_GE(files.size(), 3u);
  EXPECT_EQ(files.back(), "model.safetensors.index.json");
  auto back = read_checkpoint_tensors(a.path());
  ASSERT_EQ(back.size(), tensors.size());
  for (const auto& [n, t] : tensors) EXPECT_TRUE(torch::equal(t, back.at(n))) << n;
  auto again = write_sharded_safetensors(b.path(), as_list(back), 300'000);
  EXPECT_EQ(files, again);
  for (const auto& f : files) EXPECT_EQ(read_file(a.file(f)), read_file(b.file(f))) << f;
  auto index = json::parse_file(a.file("model.safetensors.index.json"));
  uint64_t total = 0;
  for (const auto& [n, t] : tensors) total += t.numel() * t.element_size();
  EXPECT_EQ(index["metadata"]["total_size"].GetUint64(), total);
}

TEST(Checkpoint, SavedFolderMatchesTheFixtureFolder) {
  for (std::string src : {"tiny-tied/checkpoint", "tiny-untied/checkpoint", "tiny-tied/seqcls-checkpoint",
                          "tiny-tied/checkpoint-bf16"}) {
    test::TempDir tmp;
    const auto from = fixture_dir() + "/" + src;
    model::LoadOptions keep;
    keep.dtype = src.find("bf16") != std::string::npos ? at::kBFloat16 : at::kFloat;
    auto m = model::Qwen2Model::from_pretrained(from, keep);
    SaveOptions o;
    o.source_dir = from;
    const auto out = tmp.file("saved");
    m.save_pretrained(out, o);
    // Same tensor names, dtypes, shapes and values; the same files (bytes) as transformers wrote.
    auto want = read_checkpoint_tensors(from), got = read_checkpoint_tensors(out);
    ASSERT_EQ(want.size(), got.size()) << src;
    for (const auto& [n, t] : want) {
      ASSERT_TRUE(got.count(n)) << src << ": " << n;
      EXPECT_EQ(got.at(n).scalar_type(), t.scalar_type()) << n;
      EXPECT_TRUE(torch::equal(got.at(n), t)) << n;
    }
    EXPECT_EQ(read_file(out + "/model.safetensors"), read_file(from + "/model.safetensors")) << src;
    EXPECT_EQ(json::parse_file(out + "/config.json"), json::parse_file(from + "/config.json")) << src;
    if (path_exists(from + "/generation_config.json")) {
      EXPECT_EQ(read_file(out + "/generation_config.json"), read_file(from + "/generation_config.json"));
    }
    EXPECT_FALSE(path_exists(out + ".tmp-" + std::to_string(getpid())));
  }
}

TEST(Checkpoint, SaveReplacesAnExistingFolderAndCopiesTokenizerFiles) {
  test::TempDir tmp;
  auto m = model::Qwen2Model::from_pretrained(fixture_dir("tiny-untied") + "/checkpoint");
  const auto src = tmp.file("src"), out = tmp.file("out");
  make_dirs(src);
  write_file_atomic(src + "/tokenizer.json", "{\"model\": {}}");
  write_file_atomic(src + "/tokenizer_config.json", "{}");
  SaveOptions o;
  o.source_dir = src;
  o.max_shard_bytes = 400'000;
  m.save_pretrained(out, o);
  EXPECT_TRUE(path_exists(out + "/model.safetensors.index.json"));
  EXPECT_EQ(read_file(out + "/tokenizer.json"), "{\"model\": {}}");
  EXPECT_TRUE(path_exists(out + "/generation_config.json"));  // derived: the source has none
  // Saving again (one shard now) replaces the folder whole: no stale shards or index remain.
  m.save_pretrained(out, {});
  EXPECT_FALSE(path_exists(out + "/model.safetensors.index.json"));
  EXPECT_FALSE(path_exists(out + "/tokenizer.json"));
  auto back = model::Qwen2Model::from_pretrained(out);
  EXPECT_TRUE(torch::equal(back.lm_head_, m.lm_head_));
  size_t entries = 0;
  for (auto& e : std::filesystem::directory_iterator(tmp.path())) entries += e.path().filename() != "src";
  EXPECT_EQ(entries, 1u);  // no temp folders left beside it
}

// A write that fails part way (a full disk, here RLIMIT_FSIZE: writes past 64 KiB fail with EFBIG)
// removes its temporary folder and leaves an existing folder as it was.
TEST(Checkpoint, FailedSaveRemovesItsPartialFolder) {
  test::TempDir tmp;
  auto m = model::Qwen2Model::from_pretrained(fixture_dir("tiny-untied") + "/checkpoint");
  const auto out = tmp.file("out");
  m.save_pretrained(out, {});
  const std::string before = read_file(out + "/model.safetensors");
  ASSERT_GT(before.size(), 64u << 10);  // the write below passes the limit
  struct rlimit old {};
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &old), 0);
  auto old_handler = std::signal(SIGXFSZ, SIG_IGN);  // EFBIG instead of the signal
  struct rlimit small = old;
  small.rlim_cur = 64 << 10;
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &small), 0);
  std::string error;
  try {
    m.save_pretrained(out, {});
  } catch (const Error& e) {
    error = e.what();
  }
  ::setrlimit(RLIMIT_FSIZE, &old);
  std::signal(SIGXFSZ, old_handler);
  EXPECT_NE(error.find("File too large"), std::string::npos) << error;
  EXPECT_FALSE(path_exists(out + ".tmp-" + std::to_string(getpid())));
  EXPECT_EQ(read_file(out + "/model.safetensors"), before);
  EXPECT_EQ(std::distance(std::filesystem::directory_iterator(tmp.path()), std::filesystem::directory_iterator()), 1)
      << "a temporary folder was left beside " << out;
}

TEST(HfConfig, EveryFieldAndRefusals) {
  auto c = read_config(fixture_dir("tiny-tied") + "/checkpoint");
  EXPECT_EQ(c.architecture, "Qwen2ForCausalLM");
  EXPECT_EQ(c.vocab_size, 512);
  EXPECT_EQ(c.hidden_size, 64);
  EXPECT_EQ(c.intermediate_size, 176);
  EXPECT_EQ(c.num_hidden_layers, 2);
  EXPECT_EQ(c.num_attention_heads, 4);
  EXPECT_EQ(c.num_key_value_heads, 2);
  EXPECT_EQ(c.head_dim, 16);
  EXPECT_EQ(c.max_position_embeddings, 512);
  EXPECT_EQ(c.rope_theta, 1e6);
  EXPECT_EQ(c.rms_norm_eps, 1e-6);
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_FALSE(c.use_sliding_window);
  EXPECT_EQ(c.sliding_window, 4096);
  EXPECT_EQ(c.max_window_layers, 28);
  EXPECT_EQ(*c.bos_token_id, 1);
  EXPECT_EQ(c.eos_token_ids, std::vector<int64_t>{2});
  EXPECT_EQ(*c.pad_token_id, 0);
  EXPECT_EQ(c.torch_dtype, "float32");
  EXPECT_FALSE(c.rope_scaling);
  EXPECT_EQ(config_to_json(c), read_file(fixture_dir("tiny-tied") + "/checkpoint/config.json"));  // unchanged
  EXPECT_TRUE(read_config(fixture_dir("tiny-tied") + "/seqcls-checkpoint").has_score_head());

  auto expect_refused = [](const std::string& json, const std::string& needle) {
    try {
      parse_config(json, "config.json");
      ADD_FAILURE() << "accepted: " << json;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect_refused(R"({"architectures": ["LlamaForCausalLM"], "model_type": "llama"})", "LlamaForCausalLM");
  expect_refused(R"({"model_type": "mistral"})", "mistral");
  expect_refused(R"({"use_sliding_window": true})", "sliding-window");
  expect_refused(R"({"rope_scaling": {"type": "linear", "factor": 2.0}})", "linear");
  expect_refused(R"({"hidden_act": "gelu"})", "gelu");
  expect_refused(R"({"num_attention_heads": 6, "num_key_value_heads": 4, "hidden_size": 48})", "multiple");
  expect_refused(R"({"hidden_size": "big"})", "hidden_size");
  // Ignored when sliding windows are off, whatever their values (Qwen2.5 ships sliding_window null).
  EXPECT_NO_THROW(parse_config(R"({"use_sliding_window": false, "sliding_window": null, "max_window_layers": 70})",
                               "c"));
  auto y = parse_config(R"({"rope_scaling": {"type": "yarn", "factor": 4.0,
                            "original_max_position_embeddings": 32768}, "eos_token_id": [2, 7]})", "c");
  ASSERT_TRUE(y.rope_scaling);
  EXPECT_EQ(y.rope_scaling->factor, 4.0);
  EXPECT_EQ(y.rope_scaling->original_max_position_embeddings, 32768);
  EXPECT_EQ(y.eos_token_ids, (std::vector<int64_t>{2, 7}));
  y.torch_dtype = "bfloat16";
  auto round = parse_config(config_to_json(y), "c");
  EXPECT_EQ(round.torch_dtype, "bfloat16");
  EXPECT_EQ(round.rope_scaling->factor, 4.0);
}

// transformers 5.x writes rope_theta (and any scaling) inside rope_parameters, and dtype instead of
// torch_dtype: a folder it saved must run RoPE at its own theta, not the 1e4 default (which the
// reference suite's first test caught: logits drifting with position).
TEST(HfConfig, Transformers5RopeParametersAndDtype) {
  auto c = parse_config(R"({"rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
                            "dtype": "bfloat16"})", "c");
  EXPECT_EQ(c.rope_theta, 1e6);
  EXPECT_FALSE(c.rope_scaling);
  EXPECT_EQ(c.torch_dtype, "bfloat16");
  auto y = parse_config(R"({"rope_theta": 10000.0, "rope_parameters": {"rope_type": "yarn", "factor": 4.0,
                            "original_max_position_embeddings": 32768, "rope_theta": 500000.0}})", "c");
  EXPECT_EQ(y.rope_theta, 5e5);  // rope_parameters wins, as in transformers 5
  ASSERT_TRUE(y.rope_scaling);
  EXPECT_EQ(y.rope_scaling->factor, 4.0);
  EXPECT_EQ(y.rope_scaling->original_max_position_embeddings, 32768);
  // Writing keeps both spellings consistent for either transformers major version.
  c.rope_theta = 2e6;
  c.torch_dtype = "float32";
  auto round = parse_config(config_to_json(c), "c");
  EXPECT_EQ(round.rope_theta, 2e6);
  EXPECT_EQ(round.torch_dtype, "float32");
  EXPECT_NE(config_to_json(c).find("\"dtype\": \"float32\""), std::string::npos) << config_to_json(c);
  try {
    parse_config(R"({"rope_parameters": {"rope_type": "linear", "factor": 2.0}})", "config.json");
    ADD_FAILURE() << "linear RoPE scaling accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("rope_parameters type \"linear\""), std::string::npos) << e.what();
  }
}

// ---- hostile files ------------------------------------------------------------------------------

std::string with_header(const std::string& json, size_t data_bytes, uint64_t claimed_len = UINT64_MAX) {
  uint64_t n = claimed_len == UINT64_MAX ? json.size() : claimed_len;
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>(n >> (8 * i));
  return out + json + std::string(data_bytes, '\0');
}

TEST(Safetensors, HostileFilesAreRefusedWithAClearError) {
  struct Case {
    const char* what;
    std::string bytes;
    const char* needle;
  };
  const std::string ok = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  std::vector<Case> cases = {
      {"empty file", "", "shorter than the 8-byte"},
      {"header length past the end", with_header(ok, 8, 4096), "runs past the end"},
      {"absurd header length", with_header(ok, 8, 1ull << 62), "exceeds"},
      {"not JSON", with_header("{not json}   ", 8), "invalid"},
      {"not an object", with_header("[1,2,3]", 0), "JSON object"},
      {"offsets past the end", with_header(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 4),
       "past the end"},
      {"reversed offsets", with_header(R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", 8), "reversed"},
      {"overlapping", with_header(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                  R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12), "overlaps"},
      {"hole", with_header(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8), "belong to no tensor"},
      {"trailing bytes", with_header(ok, 16), "cover"},
      {"byte count mismatch", with_header(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8), "needs 12"},
      {"dtype mismatch", with_header(R"({"a":{"dtype":"F64","shape":[2],"data_offsets":[0,8]}})", 8), "needs 16"},
      {"unknown dtype", with_header(R"({"a":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}})", 8), "Q4"},
      {"negative shape", with_header(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8), "non-negative"},
      {"overflowing shape",
       with_header(R"({"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}})", 8), "overflows"},
      {"duplicate name", with_header(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                                     R"("a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8), "twice"},
      {"missing offsets", with_header(R"({"a":{"dtype":"F32","shape":[2]}})", 8), "data_offsets"},
      {"bad metadata", with_header(R"({"__metadata__":{"x":1}})", 0), "__metadata__"},
      {"deep nesting", with_header("{\"a\":" + std::string(1000000, '['), 0),
       "header JSON is invalid at byte 516: nested deeper than 512 levels"},
  };
  test::TempDir tmp;
  for (const auto& c : cases) {
    auto path = tmp.write("bad.safetensors", c.bytes);
    try {
      MappedSafetensors::open(path);
      ADD_FAILURE() << c.what << ": accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(c.needle), std::string::npos) << c.what << ": " << e.what();
      EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << c.what << ": error must name the file";
    }
  }
  // The valid one and padding after the JSON are fine.
  EXPECT_NO_THROW(MappedSafetensors::open(tmp.write("ok.safetensors", with_header(ok + "   ", 8))));
}

TEST(Checkpoint, BrokenFoldersAreRefusedByName) {
  test::TempDir tmp;
  auto src = read_checkpoint_tensors(fixture_dir("tiny-tied") + "/checkpoint");
  const std::string cfg = read_file(fixture_dir("tiny-tied") + "/checkpoint/config.json");
  auto expect_refused = [&](const std::string& dir, const std::string& needle) {
    try {
      model::Qwen2Model::from_pretrained(dir);
      ADD_FAILURE() << dir << " accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  auto missing = as_list(src);
  missing.erase(missing.begin() + 3);
  make_dirs(tmp.file("missing"));
  write_file_atomic(tmp.file("missing/config.json"), cfg);
  write_safetensors(tmp.file("missing/model.safetensors"), missing);
  expect_refused(tmp.file("missing"), missing.size() ? "has no tensor" : "");

  auto extra = as_list(src);
  extra.emplace_back("model.extra.weight", torch::zeros({2}));
  make_dirs(tmp.file("extra"));
  write_file_atomic(tmp.file("extra/config.json"), cfg);
  write_safetensors(tmp.file("extra/model.safetensors"), extra);
  expect_refused(tmp.file("extra"), "model.extra.weight");

  auto wrong = as_list(src);
  wrong[0].second = torch::zeros({511, 64});
  make_dirs(tmp.file("shape"));
  write_file_atomic(tmp.file("shape/config.json"), cfg);
  write_safetensors(tmp.file("shape/model.safetensors"), wrong);
  expect_refused(tmp.file("shape"), "[511, 64]");

  make_dirs(tmp.file("index"));
  write_file_atomic(tmp.file("index/config.json"), cfg);
  write_file_atomic(tmp.file("index/model.safetensors.index.json"),
                    R"({"weight_map": {"model.norm.weight": "../../etc/passwd"}})");
  expect_refused(tmp.file("index"), "file name inside the folder");
  expect_refused(tmp.file("nothing-here"), "config.json");
}

// A model folder's config.json nested 1M levels deep is refused at the bracket past json::kMaxDepth,
// naming the file (it used to overflow the stack); a missing config.json is "no such file", not
// "The document is empty"; a FIFO as config.json, model.safetensors, a shard or the index is
// refused before open() (a FIFO named model.safetensors hung `ptk forward` forever).
TEST(Checkpoint, DeepConfigMissingConfigAndFifosAreRefusedByName) {
  test::TempDir tmp;
  const std::string cfg = read_file(fixture_dir("tiny-tied") + "/checkpoint/config.json");
  const std::string weights = fixture_dir("tiny-tied") + "/checkpoint/model.safetensors";
  auto error_of = [](const std::function<void()>& fn) -> std::string {
    try {
      fn();
    } catch (const Error& e) {
      return e.what();
    }
    return "";
  };

  make_dirs(tmp.file("deep"));
  write_file_atomic(tmp.file("deep/config.json"), "{\"architectures\": " + std::string(1000000, '[') + "}");
  EXPECT_EQ(error_of([&] { read_config(tmp.file("deep")); }),
            tmp.file("deep/config.json") + ":1:530: invalid JSON: nested deeper than 512 levels");

  make_dirs(tmp.file("empty"));
  std::string err = error_of([&] { model::Qwen2Model::from_pretrained(tmp.file("empty")); });
  EXPECT_EQ(err.rfind(tmp.file("empty/config.json") + ": no such file", 0), 0u) << err;

  make_dirs(tmp.file("fifo-config"));
  std::string fifo_cfg = test::make_fifo(tmp.file("fifo-config/config.json"));
  EXPECT_EQ(test::error_within([&] { model::Qwen2Model::from_pretrained(tmp.file("fifo-config")); }, fifo_cfg),
            "cannot open " + fifo_cfg + ": is a FIFO, not a regular file");

  make_dirs(tmp.file("fifo-weights"));
  write_file_atomic(tmp.file("fifo-weights/config.json"), cfg);
  std::string fifo_st = test::make_fifo(tmp.file("fifo-weights/model.safetensors"));
  EXPECT_EQ(test::error_within([&] { model::Qwen2Model::from_pretrained(tmp.file("fifo-weights")); }, fifo_st),
            "cannot open " + fifo_st + ": is a FIFO, not a regular file");

  make_dirs(tmp.file("fifo-shard"));
  write_file_atomic(tmp.file("fifo-shard/model.safetensors.index.json"), R"({"weight_map": {"w": "shard.safetensors"}})");
  std::string fifo_shard = test::make_fifo(tmp.file("fifo-shard/shard.safetensors"));
  EXPECT_EQ(test::error_within([&] { read_checkpoint_tensors(tmp.file("fifo-shard")); }, fifo_shard),
            "cannot open " + fifo_shard + ": is a FIFO, not a regular file");

  make_dirs(tmp.file("fifo-index"));
  std::string fifo_index = test::make_fifo(tmp.file("fifo-index/model.safetensors.index.json"));
  EXPECT_EQ(test::error_within([&] { read_checkpoint_tensors(tmp.file("fifo-index")); }, fifo_index),
            "cannot open " + fifo_index + ": is a FIFO, not a regular file");

  // The regular files beside them still load.
  EXPECT_NO_THROW(read_safetensors(weights));
}

}  // namespace
}  // namespace ptk
