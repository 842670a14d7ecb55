// examples/echo_client.cc: `echo_client NAME` makes one call to the echo server NAME and exits 0
// when the echo came back intact. `echo_client NAME --loop` calls until an error, then prints the
// error (for example peer-closed, when the server is killed) and exits 1. NAME may also be a
// "ucx://HOST:PORT/service" URL (mbmq::net, #19) where the build links mbmq::net: mbmq::connect
// then returns a remote mbmq::Channel, and the same code runs on it.
#include <cstdio>
#include <cstring>
#include <string>
#include <string_view>

#include "mbmq/mbmq.h"

using namespace std::chrono_literals;

namespace {

// Calls on `ch` (a local or a remote end) as the usage above says.
int run(mbmq::Result<mbmq::Channel> ch, const char* name, bool loop) {
  if (!ch) {
    std::fprintf(stderr, "echo_client: connect %s: %s\n", name, ch.error().message().c_str());
    return 1;
  }
  auto buf = ch->buffer(256);
  if (!buf) return 1;
  for (std::uint64_t n = 0;; ++n) {
    char text[256];
    int len = std::snprintf(text, sizeof text, "echo %llu from %s",
                            static_cast<unsigned long long>(n), name);
    if (!buf->resize(static_cast<std::size_t>(len))) return 1;
    std::memcpy(buf->data().data(), text, static_cast<std::size_t>(len));
    if (auto r = ch->call(*buf, mbmq::Deadline::after(5s)); !r) {
      std::fprintf(stderr, "echo_client: call %llu: %s\n", static_cast<unsigned long long>(n),
                   r.error().message().c_str());
      return 1;
    }
    if (buf->size() != static_cast<std::size_t>(len) ||
        std::memcmp(buf->data().data(), text, static_cast<std::size_t>(len)) != 0) {
      std::fprintf(stderr, "echo_client: call %llu: the echo differs\n",
                   static_cast<unsigned long long>(n));
      return 1;
    }
    if (!loop) {
      std::printf("echo_client: %.*s\n", len, text);
      return 0;
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  bool loop = argc == 3 && std::strcmp(argv[2], "--loop") == 0;
  if (argc < 2 || argc > 3 || (argc == 3 && !loop)) {
    std::fprintf(stderr, "usage: echo_client NAME|ucx://HOST:PORT/service [--loop]\n");
    return 2;
  }
  return run(mbmq::connect(argv[1], mbmq::Deadline::after(2s)), argv[1], loop);
}
