// examples/file_server: `file_server --root DIR --port N` serves the files under DIR over
// HTTP/1.1 on 127.0.0.1:N (GET, HEAD, Range, keep-alive), sending bodies with sendfile(2) through
// mbmq::send_file. `--mode splice|mmap|copy` (or `--copy`, read+write) serve the same bytes the
// other ways, for comparison (`mbmq files` benchmarks all of them against nginx).
#include <CLI/CLI.hpp>
#include <cstdio>

#include "os/tcp.h"
#include "serve/http.h"

int main(int argc, char** argv) {
  fileserver::Options o;
  std::string mode = "sendfile";
  bool copy = false;
  CLI::App app{"file_server: a static HTTP/1.1 file server that sends with sendfile(2)"};
  app.add_option("--root", o.root, "directory to serve (nothing outside it is reachable)")
      ->required()
      ->check(CLI::ExistingDirectory);
  app.add_option("--port", o.port, "TCP port (0: any free port, printed)")->required();
  app.add_option("--host", o.host, "IPv4 address to listen on")->capture_default_str();
  app.add_option("--mode", mode, "sendfile | splice | mmap | copy")->capture_default_str();
  app.add_flag("--copy", copy, "read+write instead of sendfile (same as --mode copy)");
  app.add_flag("--quiet", o.quiet, "no log lines");
  app.add_option("--max-connections", o.max_connections)->capture_default_str();
  app.add_option("--idle-timeout-ms", o.idle_timeout_ms, "longest wait for any read")
      ->capture_default_str();
  app.add_option("--head-timeout-ms", o.head_timeout_ms,
                 "longest time for a whole request head, from its first byte (then 408)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  if (copy) mode = "copy";
  auto m = fileserver::parse_mode(mode);
  if (!m) {
    std::fprintf(stderr, "file_server: --mode: expected sendfile, splice, mmap or copy\n");
    return 2;
  }
  o.mode = *m;
  std::uint16_t port = 0;
  auto l = mbmq::os::tcp_listen(o.host.c_str(), o.port, 512, &port);
  if (!l) {
    std::fprintf(stderr, "file_server: listen %s:%u: %s\n", o.host.c_str(), o.port,
                 l.error().message().c_str());
    return 1;
  }
  std::printf("file_server: serving %s on http://%s:%u/ (%s)\n", o.root.c_str(), o.host.c_str(),
              port, fileserver::mode_name(o.mode));
  std::fflush(stdout);
  fileserver::Counters c;
  return fileserver::serve(o, l->get(), &c, nullptr);
}
