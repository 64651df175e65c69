// The bounded HTTP/1.1 request parser (see http_request.h). Framing follows RFC 9112: a request
// line, header fields, then a body framed by Content-Length or by chunked transfer coding; anything
// that two parsers could read differently is a 400, anything over a limit a 413 or 431.
#include "reward/http_request.h"

#include <algorithm>

namespace ptk::http {
namespace {

constexpr size_t kMaxChunkLine = 1024;

bool is_tchar(unsigned char c) {
  if (c >= '0' && c <= '9') return true;
  if ((c | 0x20) >= 'a' && (c | 0x20) <= 'z') return true;
  switch (c) {
    case '!': case '#': case '$': case '%': case '&': case '\'': case '*': case '+': case '-': case '.':
    case '^': case '_': case '`': case '|': case '~':
      return true;
    default:
      return false;
  }
}

std::string lower(std::string_view s) {
  std::string out(s);
  for (char& c : out)
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  return out;
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

}  // namespace

const std::string* Request::header(std::string_view lower_name) const {
  for (const auto& h : headers)
    if (h.first == lower_name) return &h.second;
  return nullptr;
}

RequestParser::RequestParser(Limits limits) : limits_(limits) {}

void RequestParser::reset() {
  state_ = State::kHead;
  started_ = false;
  head_.clear();
  line_start_ = 0;
  line_.clear();
  trailer_bytes_ = 0;
  body_state_ = Body::kFixed;
  remaining_ = 0;
  error_status_ = 0;
  error_message_.clear();
  req_ = Request{};
}

void RequestParser::fail(int status, std::string message) {
  state_ = State::kError;
  error_status_ = status;
  error_message_ = std::move(message);
}

size_t RequestParser::feed(const char* data, size_t n) {
  if (state_ == State::kHead) return feed_head(data, n);
  if (state_ == State::kBody) return feed_body(data, n);
  return 0;
}

size_t RequestParser::feed_head(const char* data, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    char c = data[i];
    started_ = true;
    if (head_.size() >= limits_.max_head_bytes) {
      fail(431, "request line and headers over " + std::to_string(limits_.max_head_bytes) + " bytes");
      return i;
    }
    head_.push_back(c);
    if (c != '\n') continue;
    size_t end = head_.size() - 1;  // the '\n'
    if (end > line_start_ && head_[end - 1] == '\r') --end;
    if (end == line_start_) {  // an empty line
      if (line_start_ == 0) {  // blank lines before the request line are ignored (RFC 9112 2.2)
        head_.clear();
        continue;
      }
      parse_head();
      return i + 1;
    }
    line_start_ = head_.size();
  }
  return n;
}

void RequestParser::parse_head() {
  std::vector<std::string_view> lines;
  std::string_view all(head_);
  size_t pos = 0;
  while (pos < all.size()) {
    size_t nl = all.find('\n', pos);
    std::string_view line = all.substr(pos, nl - pos);
    pos = nl + 1;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (line.find('\r') != std::string_view::npos) return fail(400, "a bare CR inside a header line");
    if (!line.empty()) lines.push_back(line);
  }
  // Request line: method SP request-target SP HTTP-version.
  std::string_view rl = lines[0];
  size_t s1 = rl.find(' ');
  size_t s2 = s1 == std::string_view::npos ? s1 : rl.find(' ', s1 + 1);
  if (s1 == std::string_view::npos || s2 == std::string_view::npos || rl.find(' ', s2 + 1) != std::string_view::npos)
    return fail(400, "malformed request line (expected `METHOD /path HTTP/1.1`)");
  std::string_view method = rl.substr(0, s1), target = rl.substr(s1 + 1, s2 - s1 - 1), version = rl.substr(s2 + 1);
  if (method.empty() || method.size() > 32 || !std::all_of(method.begin(), method.end(), [](char c) {
        return is_tchar(static_cast<unsigned char>(c));
      }))
    return fail(400, "malformed request method");
  if (target.empty() || !std::all_of(target.begin(), target.end(), [](char c) {
        auto u = static_cast<unsigned char>(c);
        return u > 0x20 && u < 0x7f;
      }))
    return fail(400, "malformed request target");
  if (version == "HTTP/1.1") {
    req_.minor_version = 1;
  } else if (version == "HTTP/1.0") {
    req_.minor_version = 0;
  } else if (version.size() == 8 && version.substr(0, 5) == "HTTP/") {
    return fail(505, "HTTP version " + std::string(version.substr(5)) + " is not supported; send HTTP/1.1");
  } else {
    return fail(400, "malformed HTTP version");
  }
  req_.method = std::string(method);
  req_.target = std::string(target);
  std::string_view path = target;
  if (path.substr(0, 7) == "http://" || path.substr(0, 8) == "https://") {  // absolute-form
    size_t slash = path.find('/', path.find("//") + 2);
    path = slash == std::string_view::npos ? std::string_view("/") : path.substr(slash);
  } else if (path.front() != '/' && path != "*") {
    return fail(400, "request target must start with / (got `" + std::string(target.substr(0, 64)) + "`)");
  }
  size_t q = path.find('?');
  req_.path = std::string(path.substr(0, q));
  if (q != std::string_view::npos) req_.query = std::string(path.substr(q + 1));

  if (lines.size() - 1 > limits_.max_headers)
    return fail(431, "more than " + std::to_string(limits_.max_headers) + " header fields");
  int n_length = 0, n_te = 0;
  std::string_view te;
  for (size_t i = 1; i < lines.size(); ++i) {
    std::string_view line = lines[i];
    if (line.front() == ' ' || line.front() == '\t') return fail(400, "obsolete header line folding");
    size_t colon = line.find(':');
    if (colon == std::string_view::npos || colon == 0) return fail(400, "malformed header line (no `name:`)");
    std::string_view name = line.substr(0, colon);
    if (!std::all_of(name.begin(), name.end(), [](char c) { return is_tchar(static_cast<unsigned char>(c)); }))
      return fail(400, "malformed header name");
    std::string_view value = trim(line.substr(colon + 1));
    for (char c : value) {
      auto u = static_cast<unsigned char>(c);
      if ((u < 0x20 && u != '\t') || u == 0x7f) return fail(400, "a control character in a header value");
    }
    std::string key = lower(name);
    if (key == "content-length") {
      if (++n_length > 1) return fail(400, "more than one Content-Length header");
      if (value.empty() || value.size() > 18 ||
          !std::all_of(value.begin(), value.end(), [](char c) { return c >= '0' && c <= '9'; }))
        return fail(400, "Content-Length is not a decimal byte count");
      req_.content_length = std::stoll(std::string(value));
    } else if (key == "transfer-encoding") {
      if (++n_te > 1) return fail(400, "more than one Transfer-Encoding header");
      te = value;
    } else if (key == "connection") {
      size_t p = 0;
      std::string v = lower(value);
      while (p <= v.size()) {
        size_t comma = std::min(v.find(',', p), v.size());
        auto tok = trim(std::string_view(v).substr(p, comma - p));
        if (tok == "close") req_.keep_alive = false;
        p = comma + 1;
      }
    } else if (key == "expect") {
      if (lower(value) != "100-continue")
        return fail(417, "unsupported Expect: " + std::string(value.substr(0, 64)));
      req_.expect_continue = req_.minor_version == 1;
    }
    req_.headers.emplace_back(std::move(key), std::string(value));
  }
  if (req_.minor_version == 0) {  // HTTP/1.0 closes unless it asks to keep the connection
    const std::string* c = req_.header("connection");
    req_.keep_alive = c && lower(*c).find("keep-alive") != std::string::npos && req_.keep_alive;
  }
  if (n_te) {
    if (n_length) return fail(400, "both Content-Length and Transfer-Encoding (ambiguous framing)");
    if (req_.minor_version == 0) return fail(400, "Transfer-Encoding in an HTTP/1.0 request");
    if (lower(te) != "chunked")
      return fail(501, "Transfer-Encoding `" + std::string(te.substr(0, 64)) +
                           "` is not supported; send Content-Length or chunked");
    req_.chunked = true;
  }
  if (req_.content_length > 0 && static_cast<uint64_t>(req_.content_length) > limits_.max_body_bytes)
    return fail(413, "request body of " + std::to_string(req_.content_length) + " bytes is over " +
                         std::to_string(limits_.max_body_bytes) + " bytes");
  head_.clear();
  head_.shrink_to_fit();
  line_start_ = 0;
  state_ = State::kHeadDone;
}

void RequestParser::accept_body() {
  if (state_ != State::kHeadDone) return;
  if (req_.chunked) {
    state_ = State::kBody;
    body_state_ = Body::kChunkSize;
    line_.clear();
  } else if (req_.content_length > 0) {
    state_ = State::kBody;
    body_state_ = Body::kFixed;
    remaining_ = static_cast<uint64_t>(req_.content_length);
  } else {
    state_ = State::kDone;
  }
}

bool RequestParser::parse_chunk_size_line() {
  // Chunked framing is read strictly (CRLF only, no control characters): a proxy in front that
  // reads a sloppy line differently would see other request boundaries.
  std::string_view l(line_);
  if (l.empty() || l.back() != '\r') {
    fail(400, "chunk size line not ended by CRLF");
    return false;
  }
  l.remove_suffix(1);
  for (char c : l) {
    auto u = static_cast<unsigned char>(c);
    if ((u < 0x20 && u != '\t') || u == 0x7f) {
      fail(400, "a control character in a chunk size line");
      return false;
    }
  }
  size_t digits = 0;
  uint64_t size = 0;
  while (digits < l.size()) {
    char c = l[digits];
    int v = c >= '0' && c <= '9' ? c - '0' : (c | 0x20) >= 'a' && (c | 0x20) <= 'f' ? (c | 0x20) - 'a' + 10 : -1;
    if (v < 0) break;
    if (++digits > 15) {
      fail(400, "chunk size over 15 hex digits");
      return false;
    }
    size = size * 16 + static_cast<uint64_t>(v);
  }
  std::string_view rest = trim(l.substr(digits));
  if (digits == 0 || (digits < l.size() && (rest.empty() || rest.front() != ';'))) {
    fail(400, "malformed chunk size line");
    return false;
  }
  if (size == 0) {
    body_state_ = Body::kTrailer;
  } else if (size > limits_.max_body_bytes - std::min(limits_.max_body_bytes, req_.body.size())) {
    fail(413, "chunked request body over " + std::to_string(limits_.max_body_bytes) + " bytes");
    return false;
  } else {
    body_state_ = Body::kChunkData;
    remaining_ = size;
  }
  line_.clear();
  return true;
}

size_t RequestParser::feed_body(const char* data, size_t n) {
  size_t i = 0;
  while (i < n && state_ == State::kBody) {
    switch (body_state_) {
      case Body::kFixed:
      case Body::kChunkData: {
        size_t take = static_cast<size_t>(std::min<uint64_t>(remaining_, n - i));
        req_.body.append(data + i, take);
        i += take;
        remaining_ -= take;
        if (remaining_ == 0) {
          if (body_state_ == Body::kFixed) {
            state_ = State::kDone;
          } else {
            body_state_ = Body::kChunkDataEnd;
            line_.clear();
          }
        }
        break;
      }
      case Body::kChunkDataEnd: {
        char c = data[i++];
        if (c == '\r' && line_.empty()) {
          line_ = "\r";
        } else if (c == '\n' && line_ == "\r") {
          body_state_ = Body::kChunkSize;
          line_.clear();
        } else {
          fail(400, "chunk data not followed by CRLF");
        }
        break;
      }
      case Body::kChunkSize: {
        char c = data[i++];
        if (c == '\n') {
          parse_chunk_size_line();
        } else if (line_.size() >= kMaxChunkLine) {
          fail(400, "chunk size line over " + std::to_string(kMaxChunkLine) + " bytes");
        } else {
          line_.push_back(c);
        }
        break;
      }
      case Body::kTrailer: {
        char c = data[i++];
        if (++trailer_bytes_ > limits_.max_head_bytes) {
          fail(431, "chunked trailer over " + std::to_string(limits_.max_head_bytes) + " bytes");
        } else if (c == '\n') {
          std::string_view l(line_);
          if (l.empty() || l.back() != '\r') {
            fail(400, "chunked trailer line not ended by CRLF");
            break;
          }
          l.remove_suffix(1);
          if (l.empty()) state_ = State::kDone;
          line_.clear();
        } else if ((static_cast<unsigned char>(c) < 0x20 && c != '\t' && c != '\r') || c == 0x7f ||
                   (!line_.empty() && line_.back() == '\r')) {
          fail(400, "a control character in a chunked trailer");
        } else if (line_.size() < kMaxChunkLine) {
          line_.push_back(c);  // trailer fields are read and dropped
        } else {
          line_.back() = c;  // only the line's end matters: keep the last byte
        }
        break;
      }
    }
  }
  return i;
}

const char* reason_phrase(int status) {
  switch (status) {
    case 100: return "Continue";
    case 200: return "OK";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 411: return "Length Required";
    case 413: return "Payload Too Large";
    case 417: return "Expectation Failed";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 503: return "Service Unavailable";
    case 505: return "HTTP Version Not Supported";
    default: return "Unknown";
  }
}

}  // namespace ptk::http
