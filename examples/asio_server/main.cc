// examples/asio_server: one io_context, run by one thread, serving a TCP echo port and an mbmq
// Listener at once (mbmq/asio.h). The mbmq service answers each request with its bytes reversed,
// in place (no copy); the TCP service echoes what it reads. SIGINT or SIGTERM stops both and
// exits 0.
//
//   asio_server NAME [PORT]      PORT 0 (the default): any free port
//   -> "asio_server: tcp 127.0.0.1:PORT mbmq NAME" on stdout once both are listening
//
// The listener is redirected to an AsyncQueue: new connections and requests alike arrive through
// co_await queue.async_wait(), woken by the queue's fd in the same epoll as the sockets. Nothing
// throws: socket errors come back as values (as_tuple), mbmq errors as mbmq::Result.
#include <algorithm>
#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/io_context.hpp>
#include <asio/ip/tcp.hpp>
#include <asio/signal_set.hpp>
#include <asio/use_awaitable.hpp>
#include <asio/write.hpp>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "mbmq/asio.h"
#include "mbmq/mbmq.h"

namespace {

using asio::ip::tcp;
constexpr auto kNoThrow = asio::experimental::as_tuple(asio::use_awaitable);

// TCP: echo until the client closes.
asio::awaitable<void> echo_session(tcp::socket sock) {
  char data[4096];
  for (;;) {
    auto [rerr, n] = co_await sock.async_read_some(asio::buffer(data), kNoThrow);
    if (rerr) co_return;  // EOF or reset: the client is gone
    auto [werr, w] = co_await asio::async_write(sock, asio::buffer(data, n), kNoThrow);
    if (werr) co_return;
  }
}

asio::awaitable<void> tcp_accept_loop(tcp::acceptor& acceptor) {
  for (;;) {
    auto [err, sock] = co_await acceptor.async_accept(kNoThrow);
    if (err == asio::error::operation_aborted || !acceptor.is_open()) co_return;  // stopping
    if (err) continue;  // e.g. EMFILE: that client is lost, the others go on
    asio::co_spawn(acceptor.get_executor(), echo_session(std::move(sock)), asio::detached);
  }
}

// mbmq: one loop for connections and requests, on the same thread as the sockets.
asio::awaitable<void> mbmq_loop(mbmq::AsyncQueue& queue) {
  std::uint64_t next_key = 1;  // 0 is the listener's
  for (;;) {
    mbmq::Result<mbmq::Message> msg = co_await queue.async_wait(asio::use_awaitable);
    if (!msg) {
      if (msg.error().code == mbmq::Errc::InvalidArgument) co_return;  // the queue was closed
      continue;
    }
    switch (msg->kind) {
      case mbmq::Kind::Connection:
        // The queue keeps the channel from here on, until its client goes away.
        if (auto r = queue.queue().adopt(std::move(msg->channel), next_key++); !r)
          std::fprintf(stderr, "asio_server: adopt: %s\n", r.error().message().c_str());
        break;
      case mbmq::Kind::Request: {
        auto bytes = msg->buffer.data();
        std::reverse(bytes.begin(), bytes.end());  // the answer, in place
        (void)queue.reply(std::move(*msg));        // only that client's trouble if it fails
        break;
      }
      default:  // PeerClosed: that client is gone; one-way messages: not part of this service
        break;
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || argc > 3) {
    std::fprintf(stderr, "usage: asio_server NAME [PORT]\n");
    return 2;
  }
  const auto port = static_cast<unsigned short>(argc == 3 ? std::strtoul(argv[2], nullptr, 10) : 0);
  asio::io_context io(1);  // one thread: this one

  auto listener = mbmq::Listener::create(argv[1]);
  if (!listener) {
    std::fprintf(stderr, "asio_server: listen %s: %s\n", argv[1],
                 listener.error().message().c_str());
    return 1;
  }
  auto queue = mbmq::AsyncQueue::create(io.get_executor());
  if (!queue) {
    std::fprintf(stderr, "asio_server: queue: %s\n", queue.error().message().c_str());
    return 1;
  }
  if (auto r = listener->redirect(queue->queue(), 0); !r) return 1;

  asio::error_code ec;
  tcp::acceptor acceptor(io);
  const tcp::endpoint at(asio::ip::make_address("127.0.0.1"), port);
  if (acceptor.open(at.protocol(), ec) ||
      acceptor.set_option(tcp::acceptor::reuse_address(true), ec) || acceptor.bind(at, ec) ||
      acceptor.listen(asio::socket_base::max_listen_connections, ec)) {
    std::fprintf(stderr, "asio_server: tcp port %u: %s\n", port, ec.message().c_str());
    return 1;
  }

  asio::signal_set stop(io, SIGINT, SIGTERM);
  stop.async_wait([&](const asio::error_code&, int) {
    acceptor.close();
    queue->close();  // ends the mbmq loop's wait; closes every client's channel
    io.stop();       // the TCP sessions end with the io_context
  });
  asio::co_spawn(io, tcp_accept_loop(acceptor), asio::detached);
  asio::co_spawn(io, mbmq_loop(*queue), asio::detached);

  std::printf("asio_server: tcp 127.0.0.1:%u mbmq %s\n", acceptor.local_endpoint().port(), argv[1]);
  std::fflush(stdout);
  io.run();
  return 0;
}
