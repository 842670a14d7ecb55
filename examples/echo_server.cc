// examples/echo_server.cc: `echo_server NAME` serves NAME until it is killed. Every request comes
// back unchanged (it is already in the caller's buffer: the echo costs no copy). One thread
// accepts connections and redirects each new channel to the queue; the main thread serves the
// queue, so all clients are served by one loop.
#include <cstdio>
#include <thread>

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
  std::thread acceptor([&] {
    for (std::uint64_t key = 1;; ++key) {
      auto ch = listener->accept(mbmq::Deadline::never());
      if (!ch) {
        std::fprintf(stderr, "echo_server: accept: %s\n", ch.error().message().c_str());
        continue;
      }
      // The queue owns the channel from here on, until its client goes away.
      if (auto r = queue->adopt(std::move(*ch), key); !r)
        std::fprintf(stderr, "echo_server: adopt: %s\n", r.error().message().c_str());
    }
  });
  std::printf("echo_server: listening on %s\n", argv[1]);
  std::fflush(stdout);
  for (;;) {
    auto msg = queue->wait(mbmq::Deadline::never());
    if (!msg) continue;
    if (msg->kind == mbmq::Kind::Request) (void)mbmq::MsgQueue::reply(std::move(*msg));
    // Kind::PeerClosed: that client is gone; the queue has already let its channel go.
  }
}
