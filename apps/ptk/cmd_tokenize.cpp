// `ptk tokenize`: JSONL {"text": ...} (or {"messages": [...]} with --chat) to JSONL {"ids": [...]},
// one output line per input line, in order, encoded on every core. Not data preparation for
// training (that is `ptk prepare`, which packs shards).
#include <cstdio>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include "apps/ptk/cli.h"
#include "core/tokenizer/messages_json.h"
#include "core/tokenizer/tokenizer.h"
#include "core/util/error.h"
#include "core/util/fs.h"
#include "core/util/json.h"

namespace ptk::app {

namespace po = boost::program_options;
using tokenizer::TokenId;

namespace {

void append_ids(std::string* out, const char* key, const std::vector<TokenId>& ids) {
  *out += '"';
  *out += key;
  *out += "\":[";
  for (size_t i = 0; i < ids.size(); ++i) {
    if (i) *out += ',';
    *out += std::to_string(ids[i]);
  }
  *out += ']';
}

}  // namespace

int cmd_tokenize(int argc, char** argv) {
  cli::CommandLine cl("tokenize",
                      "ptk tokenize --tokenizer DIR_OR_tokenizer.json --input F.jsonl --output G.jsonl [--chat]",
                      "Encodes each input line {\"text\": ...} to {\"ids\": [...]} in order, as Hugging Face "
                      "tokenizers would.\nWith --chat, lines hold {\"messages\": [{\"role\", \"content\"}, ...]} "
                      "rendered by the chat template first.");
  cl.flags().add_options()
      ("tokenizer", po::value<std::string>()->required(), "HF folder with tokenizer.json, or a tokenizer.json")
      ("input", po::value<std::string>()->required(), "JSONL input")
      ("output", po::value<std::string>()->required(), "JSONL output (written to a temporary file, then renamed)")
      ("chat", po::bool_switch(), "lines hold \"messages\"; render them with the chat template")
      ("add-generation-prompt", po::bool_switch(), "with --chat: end with \"<|im_start|>assistant\\n\"")
      ("with-mask", po::bool_switch(), "with --chat: also write \"assistant_mask\" (1 on assistant tokens)")
      ("batch-lines", po::value<int>()->default_value(8192), "lines encoded together across threads");
  cl.accept_chat_template();
  if (!cl.parse(argc, argv)) return 0;
  const bool chat = cl.get<bool>("chat");
  const bool gen = cl.get<bool>("add-generation-prompt");
  const bool with_mask = cl.get<bool>("with-mask");
  const int batch_lines = std::max(1, cl.get<int>("batch-lines"));
  const std::string in_path = cl.get<std::string>("input"), out_path = cl.get<std::string>("output");

  tokenizer::Tokenizer tok = tokenizer::Tokenizer::load(
      cl.get<std::string>("tokenizer"), tokenizer::chat_load_options(cl.chat_template(), cl.chat_template_kwargs()));
  if (chat) tok.chat_template();  // fail before reading data when there is no usable template

  std::ifstream in(in_path, std::ios::binary);
  if (!in) throw Error("ptk tokenize: cannot open --input " + in_path);
  std::string tmp = out_path + ".tmp";
  std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
  if (!out) throw Error("ptk tokenize: cannot write " + tmp + "\n---> HINT: does the output folder exist?");

  std::vector<std::string> texts;
  struct Conv {
    std::vector<tokenizer::Message> messages;
    tokenizer::ChatExtras extras;
    std::string where;
  };
  std::vector<Conv> convs;
  size_t line_no = 0, written = 0;
  auto flush = [&] {
    std::string buf;
    if (chat) {
      for (const auto& c : convs) {
        tokenizer::ChatEncoding e;
        try {
          e = tok.render_chat(c.messages, gen, SIZE_MAX, c.extras);
        } catch (const tokenizer::ChatTemplateError&) {
          throw;
        } catch (const Error& err) {
          throw Error(c.where + ": " + err.what());
        }
        buf += '{';
        append_ids(&buf, "ids", e.ids);
        if (with_mask) {
          buf += ',';
          append_ids(&buf, "assistant_mask", std::vector<TokenId>(e.assistant_mask.begin(), e.assistant_mask.end()));
        }
        buf += "}\n";
      }
      written += convs.size();
      convs.clear();
    } else {
      for (const auto& ids : tok.encode_batch(texts, cl.threads())) {
        buf += '{';
        append_ids(&buf, "ids", ids);
        buf += "}\n";
      }
      written += texts.size();
      texts.clear();
    }
    out << buf;
  };
  std::string line;
  while (std::getline(in, line)) {
    ++line_no;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    std::string where = in_path + ":" + std::to_string(line_no);
    rapidjson::Document d = json::parse(line, where);
    if (chat) {
      if (!d.IsObject() || !d.HasMember("messages"))
        throw Error(where + ": expected {\"messages\": [...]} (--chat)");
      Conv c;
      std::string reason;
      if (!tokenizer::read_chat_extras(d, &c.extras, &reason)) throw Error(where + ": " + reason);
      c.messages = tokenizer::parse_messages(d["messages"], where + ": messages");
      c.where = where;
      convs.push_back(std::move(c));
      if (!tokenizer::is_valid_utf8(line)) throw Error(where + ": invalid UTF-8");
    } else {
      if (!d.IsObject() || !d.HasMember("text") || !d["text"].IsString())
        throw Error(where + ": expected {\"text\": \"...\"}\n---> HINT: use --chat for {\"messages\": [...]} lines");
      texts.emplace_back(d["text"].GetString(), d["text"].GetStringLength());
    }
    if (static_cast<int>(texts.size() + convs.size()) >= batch_lines) flush();
  }
  flush();
  out.close();
  if (!out) throw Error("ptk tokenize: writing " + tmp + " failed (disk full?)");
  if (std::rename(tmp.c_str(), out_path.c_str()) != 0) throw Error("ptk tokenize: cannot rename " + tmp + " to " + out_path);
  std::cerr << "ptk tokenize: " << written << " lines -> " << out_path << "\n";
  return 0;
}

}  // namespace ptk::app
