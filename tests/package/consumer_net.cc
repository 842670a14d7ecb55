// A program outside the mbmq tree that links an installed mbmq::net (find_package or pkg-config
// mbmq-net): mbmq::connect("ucx://...") returns an mbmq::Channel whose call is answered by a
// net::Listener in the same process, over UCX's TCP transport on loopback. Exit 0 on success.
#include <mbmq/mbmq.h>
#include <mbmq/net.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>

int main() {
  ::setenv("UCX_TLS", "tcp", 0);  // loopback TCP unless the caller chose
  const auto secs = [](int n) { return mbmq::Deadline::after(std::chrono::seconds(n)); };
  auto l = mbmq::net::listen("ucx://127.0.0.1:0/consumer");
  if (!l) {
    std::fprintf(stderr, "listen: %s\n", l.error().message().c_str());
    return 1;
  }
  int served = 1;
  std::thread server([&] {  // answers one request, doubling its number
    auto c = l->accept(secs(10));
    if (!c) return;
    auto ch = mbmq::net::as_channel(std::move(*c));
    if (!ch) return;
    auto m = ch->receive(secs(10));
    if (!m || m->kind != mbmq::Kind::Request) return;
    unsigned v = 0;
    std::memcpy(&v, m->buffer.data().data(), sizeof v);
    v *= 2;
    std::memcpy(m->buffer.data().data(), &v, sizeof v);
    served = mbmq::MsgQueue::reply(std::move(*m)) ? 0 : 1;
    (void)ch->receive(secs(10));  // the client's end (PeerClosed)
  });
  const std::string url = "ucx://127.0.0.1:" + std::to_string(l->port()) + "/consumer";
  auto client = mbmq::connect(url, secs(10));
  unsigned v = 21;
  mbmq::Status r = mbmq::fail(mbmq::Errc::InvalidArgument, "no channel");
  if (client) {
    auto b = client->buffer(sizeof v);
    if (b) {
      std::memcpy(b->data().data(), &v, sizeof v);
      r = client->call(*b, secs(10));
      if (r) std::memcpy(&v, b->data().data(), sizeof v);
    }
    client->close();
  }
  server.join();
  if (!client || !r || v != 42 || served != 0) {
    std::fprintf(stderr, "connect: %s; call: %s; reply %u; server %d\n",
                 client ? "ok" : client.error().message().c_str(),
                 r ? "ok" : r.error().message().c_str(), v, served);
    return 1;
  }
  std::printf("consumer_net: 21 -> 42 over %s (remote end: %d)\n", url.c_str(),
              static_cast<int>(client->is_remote()));
  return 0;
}
