// examples/echo_server.cc: `echo_server NAME` serves NAME until it is killed. Every request comes
// back unchanged (it is already in the caller's buffer: the echo costs no copy). The listener is
// redirected to the queue, so one loop serves new connections and requests alike.
// `echo_server ucx://ADDR:PORT/service` (mbmq::net, #19, where the build has UCX) serves remote
// clients instead, a thread per connection: a net::Channel cannot be redirected to a MsgQueue yet.
#include <cstdio>
#include <string_view>
#include <thread>

#include "mbmq/mbmq.h"
#ifdef MBMQ_EXAMPLE_NET
#include "mbmq/net.h"
#endif

namespace {

#ifdef MBMQ_EXAMPLE_NET
int serve_remote(const char* url) {
  auto listener = mbmq::net::listen(url);
  if (!listener) {
    std::fprintf(stderr, "echo_server: listen %s: %s\n", url, listener.error().message().c_str());
    return 1;
  }
  std::printf("echo_server: listening on %s\n", url);
  std::fflush(stdout);
  for (;;) {
    auto ch = listener->accept(mbmq::Deadline::never());
    if (!ch) continue;
    std::thread([c = std::move(*ch)]() mutable {
      for (;;) {
        auto msg = c.receive(mbmq::Deadline::never());
        if (!msg || msg->kind == mbmq::Kind::PeerClosed) return;
        if (msg->kind == mbmq::Kind::Request) (void)mbmq::net::Channel::reply(std::move(*msg));
      }
    }).detach();
  }
}
#endif

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: echo_server NAME|ucx://ADDR:PORT/service\n");
    return 2;
  }
#ifdef MBMQ_EXAMPLE_NET
  if (std::string_view(argv[1]).substr(0, 6) == "ucx://") return serve_remote(argv[1]);
#endif
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
