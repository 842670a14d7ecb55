// serve/http.cc: see http.h.
#include "serve/http.h"

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
  bool names_directory = false;  // the last segment is empty or ".": "/sub/", "/sub/."
  while (pos <= decoded.size()) {
    std::size_t next = decoded.find('/', pos);
    if (next == std::string::npos) next = decoded.size();
    std::string_view seg(decoded.data() + pos, next - pos);
    if (seg == "..") return "";
    names_directory = seg.empty() || seg == ".";
    if (!names_directory) {
      if (!out.empty()) out.push_back('/');
      out.append(seg);
    }
    pos = next + 1;
  }
  if (out.empty()) return "index.html";
  // Keep the trailing slash: the kernel then opens the path only if it is a directory (which is
  // not served either), so "/index.html/" is ENOTDIR, 404, and never the file.
  if (names_directory) out.push_back('/');
  return out;
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

  // Serves requests until the client leaves, a timeout, or an answer that closes the connection.
  void run() {
    for (;;) {
      // The next head: its first byte may take idle_timeout (between requests of a keep-alive
      // connection too); from that byte on, the whole head must arrive within head_timeout, so
      // that a client sending a byte now and then cannot hold this worker for ever.
      Deadline head_deadline = Deadline::never();
      std::size_t head_size = 0;
      for (;;) {
        if (!buf_.empty() && head_deadline.is_never())
          head_deadline = Deadline::after(std::chrono::milliseconds(o_.head_timeout_ms));
        // Only a blank line within the first kMaxHead bytes ends a head that is small enough.
        std::size_t end = std::string_view(buf_).substr(0, kMaxHead).find("\r\n\r\n");
        if (end != std::string_view::npos) {
          head_size = end + 4;
          break;
        }
        if (buf_.size() >= kMaxHead) {
          respond_error(431, "Request Header Fields Too Large", false);
          return;
        }
        Read r = read_more(head_deadline);
        if (r == Read::Gone) return;
        if (r == Read::TimedOut) {
          // A partial head is answered (408); an idle connection just closes.
          if (!buf_.empty()) respond_error(408, "Request Timeout", false);
          return;
        }
      }
      std::string head = buf_.substr(0, head_size);
      buf_.erase(0, head_size);
      c_->requests.fetch_add(1, std::memory_order_relaxed);
      if (!handle(head)) return;
    }
  }

 private:
  // The largest request head, blank line included; one byte more is 431.
  static constexpr std::size_t kMaxHead = std::size_t{16} * 1024;
  // Bounds of a lingering close (close_lingering()): how long, and how many bytes, to read and
  // drop while the client may still be sending.
  static constexpr std::chrono::milliseconds kLingerTime{1000};
  static constexpr std::size_t kLingerBytes = std::size_t{1024} * 1024;

  enum class Read { Data, Gone, TimedOut };

  // Appends what the socket has to buf_, waiting for it at most idle_timeout and never past
  // `head_deadline`. Gone: the client closed, or the socket failed.
  Read read_more(Deadline head_deadline) {
    char tmp[4096];
    for (;;) {
      auto n = os::read_some(sock_.get(), {reinterpret_cast<std::byte*>(tmp), sizeof tmp});
      if (n && *n == 0) return Read::Gone;  // the client closed
      if (n) {
        buf_.append(tmp, *n);
        return Read::Data;
      }
      if (n.error().code != mbmq::Errc::WouldBlock) return Read::Gone;
      const std::int64_t wait =
          std::min(std::int64_t{o_.idle_timeout_ms} * 1'000'000, head_deadline.remaining_ns());
      if (wait <= 0) return Read::TimedOut;
      auto ready = os::wait_readable(sock_.get(), wait);
      if (!ready) return Read::Gone;
      if (!*ready) return Read::TimedOut;
    }
  }

  // Ends the connection after an answer that closes it while the client may still be sending (an
  // oversized or slow head, a body, more requests): closing a socket that holds unread bytes
  // makes the kernel send a reset, which can make the client fail its send or lose the answer
  // before reading it. So (1) a FIN after the answer, (2) read and drop what the client still
  // sends until it closes, for at most kLingerTime and kLingerBytes, (3) close (the caller returns
  // and the destructor does it). Apache's and nginx's "lingering close".
  void close_lingering() {
    os::shutdown_write(sock_.get());  // (1)
    buf_.clear();
    const Deadline d = Deadline::after(kLingerTime);
    char tmp[16384];
    for (std::size_t dropped = 0; dropped < kLingerBytes;) {  // (2)
      auto n = os::read_some(sock_.get(), {reinterpret_cast<std::byte*>(tmp), sizeof tmp});
      if (n && *n == 0) return;  // the client closed: nothing unread is left
      if (n) {
        dropped += *n;
        continue;
      }
      if (n.error().code != mbmq::Errc::WouldBlock) return;
      const std::int64_t left = d.remaining_ns();
      if (left <= 0) return;
      auto ready = os::wait_readable(sock_.get(), left);
      if (!ready || !*ready) return;
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

  // Answers `code`; false when the connection is to end (!keep_alive, or the write failed). An
  // answer that ends the connection closes it lingeringly (close_lingering()).
  bool respond_error(int code, const char* reason, bool keep_alive, bool head_only = false,
                     const std::string& extra = "") {
    c_->errors.fetch_add(1, std::memory_order_relaxed);
    std::string body = std::to_string(code) + " " + reason + "\n";
    std::string h = "HTTP/1.1 " + std::to_string(code) + " " + reason +
                    "\r\nServer: mbmq-file-server\r\nContent-Type: text/plain\r\nContent-Length: " +
                    std::to_string(body.size()) + "\r\n" + extra +
                    (keep_alive ? "Connection: keep-alive\r\n" : "Connection: close\r\n") + "\r\n";
    if (!head_only) h += body;
    if (!write_all(h)) return false;
    if (!keep_alive) close_lingering();
    return keep_alive;
  }

  bool handle(const std::string& head) {
    auto req = parse_request(head);
    if (!req) return respond_error(400, "Bad Request", false);
    const bool head_only = req->method == "HEAD";
    if (req->has_body) return respond_error(400, "Bad Request", false, head_only);
    if (req->method != "GET" && !head_only)
      return respond_error(405, "Method Not Allowed", req->keep_alive, false,
                           "Allow: GET, HEAD\r\n");
    std::string path = safe_path(req->target);
    if (path.empty()) return respond_error(400, "Bad Request", req->keep_alive, head_only);
    // Non-blocking, or a FIFO under the root would stall this worker in open() until a writer
    // comes, possibly for ever.
    auto fd = os::open_beneath(root_, path.c_str(), os::OpenMode::NonBlocking);
    if (!fd) {
      if (!o_.quiet && (fd.error().sys_errno == EXDEV || fd.error().sys_errno == ELOOP))
        (void)std::fprintf(stderr, "file_server: refused %s (leaves the root)\n", path.c_str());
      return respond_error(404, "Not Found", req->keep_alive, head_only);
    }
    // Regular files only: a directory, FIFO, socket or device under the root is 404, as if it
    // were not there (403 would tell the client it exists).
    auto info = os::file_info(fd->get());
    if (!info || !info->regular) return respond_error(404, "Not Found", req->keep_alive, head_only);
    // O_NONBLOCK was for the open only. Clear it: some file systems (and mandatory locks, before
    // Linux 5.15) fail reads of a regular file with EAGAIN under it, sendfile and splice too.
    if (!os::set_nonblocking(fd->get(), false))
      return respond_error(500, "Internal Server Error", false, head_only);
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
    std::string h =
        std::string("HTTP/1.1 ") + (code == 200 ? "200 OK" : "206 Partial Content") +
        "\r\nServer: mbmq-file-server\r\nContent-Type: " + content_type(path) +
        "\r\nContent-Length: " + std::to_string(length) + "\r\nAccept-Ranges: bytes\r\n" + extra +
        (req->keep_alive ? "Connection: keep-alive\r\n" : "Connection: close\r\n") + "\r\n";
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
        std::vector<std::byte> chunk(std::size_t{256} * 1024);
        for (std::uint64_t done = 0; done < length;) {
          std::size_t want =
              static_cast<std::size_t>(std::min<std::uint64_t>(chunk.size(), length - done));
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
    (void)std::fprintf(stderr, "file_server: --root %s: %s\n", o.root.c_str(),
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
      (void)os::write_some(sock->get(),
                           {reinterpret_cast<const std::byte*>(kBusy), sizeof kBusy - 1});
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
