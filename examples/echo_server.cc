// examples/echo_server.cc: `echo_server NAME` serves NAME until it is killed. Every request comes
// back unchanged (it is already in the caller's buffer: the echo costs no copy). The listener is
// redirected to the queue, so one loop serves new connections and requests alike.
#include <cstdio>

#include "mbmq/mbmq.h"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: echo_server NAME\n");
    return 2;
  }
  auto listener = mbmq::Listener::create(argv[1]);
  if (!listener) {
    std::fprintf(stderr, "echo_server: listen %s: %s\n", argv[1],
                 listener.error().message().c_str());
    return 1;
  }
  auto queue = mbmq::MsgQueue::create();
  if (!queue) return 1;
  constexpr std::uint64_t kListenerKey = 0;
  if (auto r = listener->redirect(*queue, kListenerKey); !r) return 1;
  std::printf("echo_server: listening on %s\n", argv[1]);
  std::fflush(stdout);
  std::uint64_t next_key = 1;
  for (;;) {
    auto msg = queue->wait(mbmq::Deadline::never());
    if (!msg) continue;
    switch (msg->kind) {
      case mbmq::Kind::Connection:
        // The queue owns the channel from here on, until its client goes away.
        if (auto r = queue->adopt(std::move(msg->channel), next_key++); !r)
          std::fprintf(stderr, "echo_server: adopt: %s\n", r.error().message().c_str());
        break;
      case mbmq::Kind::Request:
        (void)mbmq::MsgQueue::reply(std::move(*msg));
        break;
      default:  // Kind::PeerClosed: that client is gone; the queue has already let its channel go
        break;
    }
  }
}
