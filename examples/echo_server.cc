// examples/echo_server.cc: `echo_server NAME...` serves each NAME until it is killed. Every request
// comes back unchanged (it is already in the caller's buffer: the echo costs no copy). The
// listeners are redirected to one queue, so one loop serves new connections and requests alike.
// A NAME may be `ucx://ADDR:PORT/service` (mbmq::net, #19, where the build has UCX): that
// listener is redirected to the same queue, and its remote clients are served by the same loop:
// their connections arrive as the same mbmq::Channel type (a remote end), adopted by the same
// line (no thread of ours per client or in accept(), and the request is answered in the memory
// it arrived in).
#include <cstdint>
#include <cstdio>
#include <string_view>
#include <vector>

#include "mbmq/mbmq.h"
#ifdef MBMQ_EXAMPLE_NET
#include "mbmq/net.h"
#endif

namespace {

constexpr std::uint64_t kListenerKey = 0;

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: echo_server NAME|ucx://ADDR:PORT/service...\n");
    return 2;
  }
  auto queue = mbmq::MsgQueue::create();
  if (!queue) return 1;
  std::vector<mbmq::Listener> listeners;
#ifdef MBMQ_EXAMPLE_NET
  std::vector<mbmq::net::Listener> remote_listeners;
#endif
  for (int i = 1; i < argc; ++i) {
#ifdef MBMQ_EXAMPLE_NET
    if (std::string_view(argv[i]).substr(0, 6) == "ucx://") {
      auto remote = mbmq::net::listen(argv[i]);
      if (!remote) {
        std::fprintf(stderr, "echo_server: listen %s: %s\n", argv[i],
                     remote.error().message().c_str());
        return 1;
      }
      if (auto r = remote->redirect(*queue, kListenerKey); !r) return 1;
      remote_listeners.push_back(std::move(*remote));
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
  std::uint64_t next_key = 1;  // channel keys, local and remote alike
  for (;;) {
    auto msg = queue->wait(mbmq::Deadline::never());
    if (!msg) continue;
    switch (msg->kind) {
      case mbmq::Kind::Connection: {
        // The queue owns the channel from here on, until its client goes away.
        // A local Listener's or a net::Listener's (a remote end): the same Channel type.
        mbmq::Status r = queue->adopt(std::move(msg->channel), next_key++);
        if (!r) std::fprintf(stderr, "echo_server: adopt: %s\n", r.error().message().c_str());
        break;
      }
      case mbmq::Kind::Request:  // from a local or a remote client alike
        (void)mbmq::MsgQueue::reply(std::move(*msg));
        break;
      default:  // Kind::PeerClosed: that client is gone; the queue has already let its channel go
        break;
    }
  }
}
