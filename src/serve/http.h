// serve/http.h: the core of `file_server` (examples/file_server), a small static HTTP/1.1 file
// server (GET, HEAD, single byte ranges, keep-alive) that sends file bodies with sendfile(2)
// through mbmq::send_file, or, for comparison, with splice, mmap+write or read+write. `mbmq files`
// benchmarks the same code. Internal to the project (target mbmq_file_server), not part of the
// installed library.
//
// Safety: a request's path is percent-decoded and refused (400) if it holds NUL or a ".."
// segment; the file is then opened with openat2(RESOLVE_BENEATH) under the root directory, so no
// path, symlink or race can leave the root (404), and non-blocking, so that a FIFO cannot stall a
// worker. Only regular files are served. Bad input gets 400, a missing or non-regular file 404 (so
// does a trailing slash after a file name), an unsatisfiable range 416 (with Content-Range: bytes
// */size), other methods 405, a request head over 16 KiB 431.
//
// Time: a connection waits at most idle_timeout for any read, head_timeout for a whole request
// head (from its first byte; then 408), and send_timeout for a stalled reader. An error answer
// that ends the connection (400, 408, 431, ...), where the client may still be sending, is
// followed by a bounded lingering close (FIN, then up to 1 s and 1 MiB of the client's bytes read
// and dropped), so that the client reads the answer instead of a reset.
#pragma once

#include <atomic>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace fileserver {

enum class Mode { Sendfile, Splice, Mmap, Copy };
const char* mode_name(Mode m);
std::optional<Mode> parse_mode(std::string_view s);

struct Options {
  std::string root = ".";
  std::string host = "127.0.0.1";  // loopback unless told otherwise
  std::uint16_t port = 8080;       // 0: any free port (printed)
  Mode mode = Mode::Sendfile;
  bool quiet = false;
  int max_connections = 256;
  int idle_timeout_ms = 10000;  // for each read
  int head_timeout_ms = 10000;  // for a whole request head, from its first byte
  int send_timeout_ms = 30000;
};

// One parsed request head (the bytes up to and including the blank line).
struct Request {
  std::string method, target, version;
  bool keep_alive = true;
  std::optional<std::string> range;  // the Range header's value
  bool has_body = false;             // Content-Length > 0 or Transfer-Encoding: not supported
};
// Parses a request head; std::nullopt if it is not valid HTTP/1.x.
std::optional<Request> parse_request(std::string_view head);

// The file path under the root for a request target: "" when the target is malformed or holds
// NUL or a ".." segment (400). "/" maps to "index.html". A target that names a directory ("/sub/",
// "/sub/.") keeps one trailing slash ("sub/"), which the kernel refuses to open unless the path
// is a directory: "/index.html/" never opens index.html.
std::string safe_path(std::string_view target);

// A single byte range of a file of `size` bytes. Satisfiable: [first, last]. Ignore: the header is
// not a single bytes range (the whole file is served, as RFC 9110 allows).
struct ByteRange {
  enum Kind { Ignore, Satisfiable, Unsatisfiable } kind = Ignore;
  std::uint64_t first = 0, last = 0;
};
ByteRange parse_range(std::string_view value, std::uint64_t size);

struct Counters {
  std::atomic<std::uint64_t> requests{0}, bytes{0}, errors{0}, fallbacks{0}, connections{0};
};

// Serves on listening socket `listener` until *stop is set (checked between accepts). Ignores
// SIGPIPE for the process (a client leaving mid-body is that connection's EPIPE).
int serve(const Options& o, int listener, Counters* counters, const std::atomic<bool>* stop);

}  // namespace fileserver
