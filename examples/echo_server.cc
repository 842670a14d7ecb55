// examples/echo_server.cc: `echo_server NAME...` serves each NAME until it is killed. Every request
// comes back unchanged (it is already in the caller's buffer: the echo costs no copy). The
// listeners are redirected to one queue, so one loop serves new connections and requests alike.
// A NAME may be `ucx://ADDR:PORT/service` (mbmq::net, #19, where the build has UCX): its remote
// clients are served by the same loop: a thread of ours accepts them and hands each to the queue
// (net::adopt: no thread per client, and the request is answered in the memory it arrived in).
#include <atomic>
#include <cstdio>
#include <string_view>
#include <thread>
#include <vector>

#include "mbmq/mbmq.h"
#ifdef MBMQ_EXAMPLE_NET
#include "mbmq/net.h"
#endif

namespace {

constexpr std::uint64_t kListenerKey = 0;
std::atomic<std::uint64_t> next_key{1};  // channel keys, local and remote alike

#ifdef MBMQ_EXAMPLE_NET
// Accepts remote clients and hands each to the queue, as the loop in main() does for local ones
// (Kind::Connection; a net::Listener cannot be redirected to a queue yet). The thread and the
// listener live as long as the program.
bool serve_remote(const char* url, mbmq::MsgQueue& queue) {
  auto listener = mbmq::net::listen(url);
  if (!listener) {
    std::fprintf(stderr, "echo_server: listen %s: %s\n", url, listener.error().message().c_str());
    return false;
  }
  std::thread([&queue, l = std::move(*listener)]() mutable {
    for (;;) {
      auto ch = l.accept(mbmq::Deadline::never());
      if (!ch) {
        std::fprintf(stderr, "echo_server: accept: %s\n", ch.error().message().c_str());
        continue;
      }
      if (auto r = mbmq::net::adopt(queue, std::move(*ch), next_key++); !r)
        std::fprintf(stderr, "echo_server: adopt: %s\n", r.error().message().c_str());
    }
  }).detach();
  return true;
}
#endif

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: echo_server NAME|ucx://ADDR:PORT/service...\n");
    return 2;
  }
  auto queue = mbmq::MsgQueue::create();
  if (!queue) return 1;
  std::vector<mbmq::Listener> listeners;
  for (int i = 1; i < argc; ++i) {
#ifdef MBMQ_EXAMPLE_NET
    if (std::string_view(argv[i]).substr(0, 6) == "ucx://") {
      if (!serve_remote(argv[i], *queue)) return 1;
      continue;
    }
#endif
    auto listener = mbmq::Listener::create(argv[i]);
    if (!listener) {
      std::fprintf(stderr, "echo_server: listen %s: %s\n", argv[i],
                   listener.error().message().c_str());
      return 1;
    }
    if (auto r = listener->redirect(*queue, kListenerKey); !r) return 1;
    listeners.push_back(std::move(*listener));
  }
  for (int i = 1; i < argc; ++i) std::printf("echo_server: listening on %s\n", argv[i]);
  std::fflush(stdout);
  for (;;) {
    auto msg = queue->wait(mbmq::Deadline::never());
    if (!msg) continue;
    switch (msg->kind) {
      case mbmq::Kind::Connection:
        // The queue owns the channel from here on, until its client goes away.
        if (auto r = queue->adopt(std::move(msg->channel), next_key++); !r)
          std::fprintf(stderr, "echo_server: adopt: %s\n", r.error().message().c_str());
        break;
      case mbmq::Kind::Request:  // from a local or a remote client alike
        (void)mbmq::MsgQueue::reply(std::move(*msg));
        break;
      default:  // Kind::PeerClosed: that client is gone; the queue has already let its channel go
        break;
    }
  }
}
