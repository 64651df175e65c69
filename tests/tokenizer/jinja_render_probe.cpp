// Renders a chat template with ptk's Jinja interpreter, for tests/reference/jinja_reference_test.py:
//   jinja_render_probe TEMPLATE_FILE CONTEXT_FILE
// CONTEXT_FILE holds one JSON context object, or an array of them (one template parse, many
// renderings). Prints, per context, {"text": ..., "generation": [[begin, end], ...]} (byte offsets
// into text) or {"error": message}; an array of those for an array input. Exit 0 unless the files
// cannot be read or the template does not parse ({"parse_error": message}, exit 0 as well).
#include <cstdio>
#include <exception>
#include <string>

#include <rapidjson/stringbuffer.h>
#include <rapidjson/writer.h>

#include "core/tokenizer/jinja.h"
#include "core/util/error.h"
#include "core/util/fs.h"
#include "core/util/json.h"

namespace {

void render_one(const ptk::jinja::Template& t, const rapidjson::Value& ctx, rapidjson::Writer<rapidjson::StringBuffer>& w) {
  w.StartObject();
  try {
    ptk::jinja::Rendering r = t.render(ctx);
    w.Key("text");
    w.String(r.text.data(), static_cast<rapidjson::SizeType>(r.text.size()));
    w.Key("generation");
    w.StartArray();
    for (const auto& g : r.generation) {
      w.StartArray();
      w.Uint64(g.first);
      w.Uint64(g.second);
      w.EndArray();
    }
    w.EndArray();
  } catch (const ptk::Error& e) {
    w.Key("error");
    w.String(e.what());
  }
  w.EndObject();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: jinja_render_probe TEMPLATE_FILE CONTEXT_FILE\n");
    return 2;
  }
  try {
    std::string source = ptk::read_file(argv[1]);
    rapidjson::Document ctx = ptk::json::parse_file(argv[2]);
    rapidjson::StringBuffer sb;
    rapidjson::Writer<rapidjson::StringBuffer> w(sb);
    ptk::jinja::Template t = [&] {
      try {
        return ptk::jinja::Template::parse(source, argv[1]);
      } catch (const ptk::Error& e) {
        w.StartObject();
        w.Key("parse_error");
        w.String(e.what());
        w.EndObject();
        std::printf("%s\n", sb.GetString());
        std::exit(0);
      }
    }();
    if (ctx.IsArray()) {
      w.StartArray();
      for (const auto& c : ctx.GetArray()) render_one(t, c, w);
      w.EndArray();
    } else {
      render_one(t, ctx, w);
    }
    std::fwrite(sb.GetString(), 1, sb.GetSize(), stdout);
    std::fputc('\n', stdout);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "jinja_render_probe: %s\n", e.what());
    return 1;
  }
  return 0;
}
