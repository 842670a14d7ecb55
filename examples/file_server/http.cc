// examples/file_server/http.cc: see http.h.
#include "http.h"

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "mbmq/file.h"
#include "os/file.h"
#include "os/mapping.h"
#include "os/process.h"
#include "os/tcp.h"
#include "os/unix_socket.h"

namespace fileserver {

using mbmq::Deadline;
namespace os = mbmq::os;

const char* mode_name(Mode m) {
  switch (m) {
    case Mode::Sendfile:
      return "sendfile";
    case Mode::Splice:
      return "splice";
    case Mode::Mmap:
      return "mmap+write";
    case Mode::Copy:
      return "read+write";
  }
  return "?";
}

std::optional<Mode> parse_mode(std::string_view s) {
  if (s == "sendfile") return Mode::Sendfile;
  if (s == "splice") return Mode::Splice;
  if (s == "mmap" || s == "mmap+write") return Mode::Mmap;
  if (s == "copy" || s == "read+write") return Mode::Copy;
  return std::nullopt;
}

namespace {

bool iequals(std::string_view a, std::string_view b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin(), [](char x, char y) {
           return (x | 0x20) == (y | 0x20);
         });
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

bool parse_u64(std::string_view s, std::uint64_t* v) {
  if (s.empty() || s.size() > 19) return false;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), *v);
  return ec == std::errc() && p == s.data() + s.size();
}

int hex(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

}  // namespace

std::optional<Request> parse_request(std::string_view head) {
  std::size_t eol = head.find("\r\n");
  if (eol == std::string_view::npos) return std::nullopt;
  std::string_view line = head.substr(0, eol);
  std::size_t sp1 = line.find(' ');
  std::size_t sp2 = line.rfind(' ');
  if (sp1 == std::string_view::npos || sp2 == sp1) return std::nullopt;
  Request r;
  r.method = std::string(line.substr(0, sp1));
  r.target = std::string(line.substr(sp1 + 1, sp2 - sp1 - 1));
  r.version = std::string(line.substr(sp2 + 1));
  if (r.method.empty() || r.target.empty() || r.target.find(' ') != std::string::npos)
    return std::nullopt;
  if (r.version == "HTTP/1.1") {
    r.keep_alive = true;
  } else if (r.version == "HTTP/1.0") {
    r.keep_alive = false;
  } else {
    return std::nullopt;
  }
  std::string_view rest = head.substr(eol + 2);
  while (!rest.empty()) {
    std::size_t e = rest.find("\r\n");
    if (e == std::string_view::npos) return std::nullopt;
    std::string_view h = rest.substr(0, e);
    rest.remove_prefix(e + 2);
    if (h.empty()) break;
    std::size_t colon = h.find(':');
    if (colon == std::string_view::npos || colon == 0) return std::nullopt;
    std::string_view name = h.substr(0, colon), value = trim(h.substr(colon + 1));
    if (iequals(name, "connection")) {
      if (iequals(value, "close")) r.keep_alive = false;
      if (iequals(value, "keep-alive")) r.keep_alive = true;
    } else if (iequals(name, "range")) {
      r.range = std::string(value);
    } else if (iequals(name, "content-length")) {
      std::uint64_t n = 0;
      if (!parse_u64(value, &n)) return std::nullopt;
      if (n > 0) r.has_body = true;
    } else if (iequals(name, "transfer-encoding")) {
      r.has_body = true;
    }
  }
  return r;
}

std::string safe_path(std::string_view target) {
  if (target.empty() || target.front() != '/') return "";
  target = target.substr(0, target.find_first_of("?#"));
  std::string decoded;
  for (std::size_t i = 0; i < target.size(); ++i) {
    char c = target[i];
    if (c == '%') {
      if (i + 2 >= target.size()) return "";
      int hi = hex(target[i + 1]), lo = hex(target[i + 2]);
      if (hi < 0 || lo < 0) return "";
      c = static_cast<char>(hi * 16 + lo);
      i += 2;
    }
    if (c == '\0') return "";
    decoded.push_back(c);
  }
  std::string out;
  std::size_t pos = 0;
  while (pos <= decoded.size()) {
    std::size_t next = decoded.find('/', pos);
    if (next == std::string::npos) next = decoded.size();
    std::string_view seg(decoded.data() + pos, next - pos);
    if (seg == "..") return "";
    if (!seg.empty() && seg != ".") {
      if (!out.empty()) out.push_back('/');
      out.append(seg);
    }
    pos = next + 1;
  }
  return out.empty() ? "index.html" : out;
}

ByteRange parse_range(std::string_view v, std::uint64_t size) {
  ByteRange r;
  if (v.substr(0, 6) != "bytes=") return r;
  v.remove_prefix(6);
  if (v.find(',') != std::string_view::npos) return r;  // several ranges: serve it all
  std::size_t dash = v.find('-');
  if (dash == std::string_view::npos) return r;
  std::string_view a = trim(v.substr(0, dash)), b = trim(v.substr(dash + 1));
  std::uint64_t first = 0, last = 0;
  if (a.empty()) {  // suffix: the last b bytes
    if (!parse_u64(b, &last)) return r;
    if (last == 0 || size == 0) return {ByteRange::Unsatisfiable, 0, 0};
    return {ByteRange::Satisfiable, size - std::min(last, size), size - 1};
  }
  if (!parse_u64(a, &first)) return r;
  if (b.empty()) {
    last = size == 0 ? 0 : size - 1;
  } else if (!parse_u64(b, &last) || last < first) {
    return r;
  }
  if (first >= size) return {ByteRange::Unsatisfiable, 0, 0};
  return {ByteRange::Satisfiable, first, std::min(last, size - 1)};
}

namespace {

const char* content_type(std::string_view path) {
  std::size_t dot = path.rfind('.');
  std::string_view ext = dot == std::string_view::npos ? "" : path.substr(dot + 1);
  if (ext == "html" || ext == "htm") return "text/html; charset=utf-8";
  if (ext == "txt") return "text/plain; charset=utf-8";
  if (ext == "css") return "text/css";
  if (ext == "js") return "text/javascript";
  if (ext == "json") return "application/json";
  if (ext == "png") return "image/png";
  if (ext == "jpg" || ext == "jpeg") return "image/jpeg";
  if (ext == "svg") return "image/svg+xml";
  return "application/octet-stream";
}

class Connection {
 public:
  Connection(const Options& o, int root, os::UniqueFd sock, Counters* c)
      : o_(o), root_(root), sock_(std::move(sock)), c_(c) {}

  void run() {
    for (;;) {
      std::size_t end = buf_.find("\r\n\r\n");
      while (end == std::string::npos) {
        if (buf_.size() > kMaxHead) {
          respond_error(431, "Request Header Fields Too Large", false);
          return;
        }
        if (!read_more()) return;
        end = buf_.find("\r\n\r\n");
      }
      std::string head = buf_.substr(0, end + 4);
      buf_.erase(0, end + 4);
      c_->requests.fetch_add(1, std::memory_order_relaxed);
      if (!handle(head)) return;
    }
  }

 private:
  static constexpr std::size_t kMaxHead = 16 * 1024;

  bool read_more() {
    char tmp[4096];
    for (;;) {
      auto n = os::read_some(sock_.get(), {reinterpret_cast<std::byte*>(tmp), sizeof tmp});
      if (n && *n == 0) return false;  // the client closed
      if (n) {
        buf_.append(tmp, *n);
        return true;
      }
      if (n.error().code != mbmq::Errc::WouldBlock) return false;
      auto ready = os::wait_readable(sock_.get(), std::int64_t{o_.idle_timeout_ms} * 1'000'000);
      if (!ready || !*ready) return false;  // idle too long: close
    }
  }

  bool write_all(std::string_view s) {
    auto bytes = std::span<const std::byte>(reinterpret_cast<const std::byte*>(s.data()), s.size());
    Deadline d = Deadline::after(std::chrono::milliseconds(o_.send_timeout_ms));
    return write_bytes(bytes, d);
  }

  bool write_bytes(std::span<const std::byte> bytes, Deadline d) {
    while (!bytes.empty()) {
      auto n = os::write_some(sock_.get(), bytes);
      if (n) {
        bytes = bytes.subspan(*n);
        continue;
      }
      if (n.error().code != mbmq::Errc::WouldBlock) return false;
      auto ready = os::wait_writable(sock_.get(), std::max<std::int64_t>(d.remaining_ns(), 0));
      if (!ready || !*ready) return false;
    }
    return true;
  }

  bool respond_error(int code, const char* reason, bool keep_alive, bool head_only = false,
                     const std::string& extra = "") {
    c_->errors.fetch_add(1, std::memory_order_relaxed);
    std::string body = std::to_string(code) + " " + reason + "\n";
    std::string h = "HTTP/1.1 " + std::to_string(code) + " " + reason +
                    "\r\nServer: mbmq-file-server\r\nContent-Type: text/plain\r\nContent-Length: " +
                    std::to_string(body.size()) + "\r\n" + extra +
                    (keep_alive ? "Connection: keep-alive\r\n" : "Connection: close\r\n") + "\r\n";
    if (!head_only) h += body;
    return write_all(h) && keep_alive;
  }

  bool handle(const std::string& head) {
    auto req = parse_request(head);
    if (!req) return respond_error(400, "Bad Request", false);
    const bool head_only = req->method == "HEAD";
    if (req->has_body) return respond_error(400, "Bad Request", false, head_only);
    if (req->method != "GET" && !head_only)
      return respond_error(405, "Method Not Allowed", req->keep_alive, false, "Allow: GET, HEAD\r\n");
    std::string path = safe_path(req->target);
    if (path.empty()) return respond_error(400, "Bad Request", req->keep_alive, head_only);
    auto fd = os::open_beneath(root_, path.c_str());
    if (!fd) {
      if (!o_.quiet && (fd.error().sys_errno == EXDEV || fd.error().sys_errno == ELOOP))
        std::fprintf(stderr, "file_server: refused %s (leaves the root)\n", path.c_str());
      return respond_error(404, "Not Found", req->keep_alive, head_only);
    }
    auto info = os::file_info(fd->get());
    if (!info || !info->regular) return respond_error(404, "Not Found", req->keep_alive, head_only);
    const std::uint64_t size = info->size;
    std::uint64_t first = 0, length = size;
    int code = 200;
    std::string extra;
    if (req->range) {
      ByteRange r = parse_range(*req->range, size);
      if (r.kind == ByteRange::Unsatisfiable)
        return respond_error(416, "Range Not Satisfiable", req->keep_alive, head_only,
                             "Content-Range: bytes */" + std::to_string(size) + "\r\n");
      if (r.kind == ByteRange::Satisfiable) {
        code = 206;
        first = r.first;
        length = r.last - r.first + 1;
        extra = "Content-Range: bytes " + std::to_string(r.first) + "-" + std::to_string(r.last) +
                "/" + std::to_string(size) + "\r\n";
      }
    }
    std::string h = std::string("HTTP/1.1 ") + (code == 200 ? "200 OK" : "206 Partial Content") +
                    "\r\nServer: mbmq-file-server\r\nContent-Type: " + content_type(path) +
                    "\r\nContent-Length: " + std::to_string(length) +
                    "\r\nAccept-Ranges: bytes\r\n" + extra +
                    (req->keep_alive ? "Connection: keep-alive\r\n" : "Connection: close\r\n") +
                    "\r\n";
    // Header and body in full packets: cork, write both, uncork (nginx's tcp_nopush).
    (void)os::tcp_cork(sock_.get(), true);
    bool ok = write_all(h);
    if (ok && !head_only && length > 0) ok = send_body(fd->get(), first, length);
    (void)os::tcp_cork(sock_.get(), false);
    return ok && req->keep_alive;
  }

  bool send_body(int fd, std::uint64_t offset, std::uint64_t length) {
    Deadline d = Deadline::after(std::chrono::milliseconds(o_.send_timeout_ms) +
                                 std::chrono::milliseconds(length >> 17));  // + 1 s per 128 MiB
    switch (o_.mode) {
      case Mode::Sendfile:
      case Mode::Splice: {
        mbmq::EgressOptions eo;
        eo.deadline = d;
        eo.use_splice = o_.mode == Mode::Splice;
        auto r = mbmq::send_file(sock_.get(), fd, offset, length, eo);
        if (r && *r->fallback != '\0') c_->fallbacks.fetch_add(1, std::memory_order_relaxed);
        if (r) c_->bytes.fetch_add(r->bytes, std::memory_order_relaxed);
        return r.has_value();
      }
      case Mode::Mmap: {
        const std::uint64_t start = offset / 4096 * 4096;
        auto m = os::Mapping::map(fd, start, static_cast<std::size_t>(offset - start + length),
                                  os::Access::ReadOnly);
        if (!m) return false;
        bool ok = write_bytes({m->data() + (offset - start), static_cast<std::size_t>(length)}, d);
        if (ok) c_->bytes.fetch_add(length, std::memory_order_relaxed);
        return ok;
      }
      case Mode::Copy: {
        std::vector<std::byte> chunk(256 * 1024);
        for (std::uint64_t done = 0; done < length;) {
          std::size_t want = static_cast<std::size_t>(std::min<std::uint64_t>(chunk.size(), length - done));
          auto got = os::pread_full(fd, {chunk.data(), want}, offset + done);
          if (!got || *got == 0) return false;
          if (!write_bytes({chunk.data(), *got}, d)) return false;
          done += *got;
          c_->bytes.fetch_add(*got, std::memory_order_relaxed);
        }
        return true;
      }
    }
    return false;
  }

  const Options& o_;
  int root_;
  os::UniqueFd sock_;
  Counters* c_;
  std::string buf_;
};

}  // namespace

int serve(const Options& o, int listener, Counters* counters, const std::atomic<bool>* stop) {
  // A client that leaves mid-body must cost its connection an EPIPE, not the server its life.
  os::ignore_sigpipe();
  auto root = os::open_directory(o.root.c_str());
  if (!root) {
    std::fprintf(stderr, "file_server: --root %s: %s\n", o.root.c_str(),
                 root.error().message().c_str());
    return 1;
  }
  auto active = std::make_shared<std::atomic<int>>(0);
  const int root_fd = root->get();
  while (stop == nullptr || !stop->load()) {
    auto ready = os::wait_readable(listener, 200'000'000);
    if (!ready || !*ready) continue;
    auto sock = os::tcp_accept(listener);
    if (!sock) continue;
    counters->connections.fetch_add(1, std::memory_order_relaxed);
    if (!os::set_nonblocking(sock->get(), true)) continue;
    if (active->load() >= o.max_connections) {
      static constexpr char kBusy[] =
          "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
      (void)os::write_some(sock->get(), {reinterpret_cast<const std::byte*>(kBusy), sizeof kBusy - 1});
      continue;
    }
    active->fetch_add(1);
    std::thread([&o, root_fd, s = std::move(*sock), counters, active]() mutable {
      Connection(o, root_fd, std::move(s), counters).run();
      active->fetch_sub(1);
    }).detach();
  }
  // The root fd must outlive the connection threads: wait for them (bounded by their timeouts).
  while (active->load() > 0) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  return 0;
}

}  // namespace fileserver
