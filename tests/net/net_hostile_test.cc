// A hostile client speaking raw UCX to an mbmq::net listener: malformed headers before and after
// the hello. Each must end that client's channel (Errc::Protocol, or a dropped handshake), never
// crash or hang the server, and never touch another client (issue #19).
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>

#include <cstring>
#include <string>
#include <vector>

#include "mbmq/net.h"
#include "net/core.h"
#include "net/net_util.h"
#include "os/process.h"
#include "test_util.h"

namespace mbmq {
namespace {

using net::detail::kAmId;
using net::detail::kMagic;
using net::detail::kVersion;
using net::detail::WireHeader;
using net::detail::WireKind;
using test::join;
using test::Pipe;
using test::secs;
using test::spawn;

enum Mode : std::uint32_t {
  kShortHeaderFirst = 1,
  kReplyToNoCall = 2,
  kBadMagic = 3,
  kMessageAfterBye = 4,        // a 4 MiB message, its Bye, then a 64 B message, all sent at once
  kBadHeaderWhileFetched = 5,  // a 9 MiB message, then a header with a bad magic, at once
};

// Raw UCX: an endpoint to the listener, then the messages `mode` calls for; then it keeps the
// worker progressing until the server drops it (or 10 s). Exits 0 if it could send them.
int hostile(std::uint32_t port, Mode mode) {
  auto u = net::detail::ucx();
  if (!u) return 10;
  auto w = net::detail::WorkerCore::make(*u);
  if (!w) return 11;
  net::detail::WorkerCore& wk = **w;
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_port = htons(static_cast<std::uint16_t>(port));
  (void)inet_pton(AF_INET, "127.0.0.1", &sa.sin_addr);
  os::LockGuard lock(wk.mu);
  ucp_ep_params_t ep{};
  ep.field_mask = UCP_EP_PARAM_FIELD_FLAGS | UCP_EP_PARAM_FIELD_SOCK_ADDR |
                  UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE | UCP_EP_PARAM_FIELD_ERR_HANDLER;
  ep.flags = UCP_EP_PARAMS_FLAGS_CLIENT_SERVER;
  ep.sockaddr.addr = reinterpret_cast<const sockaddr*>(&sa);
  ep.sockaddr.addrlen = sizeof sa;
  ep.err_mode = UCP_ERR_HANDLING_MODE_PEER;
  static bool dropped = false;
  ep.err_handler.cb = [](void*, ucp_ep_h, ucs_status_t) { dropped = true; };
  ucp_ep_h h = nullptr;
  if ((*u)->ucp_ep_create(wk.worker, &ep, &h) != UCS_OK) return 12;
  auto send = [&](const void* hdr, std::size_t hlen, const void* data, std::size_t n) {
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    p.flags = UCP_AM_SEND_FLAG_REPLY;
    ucs_status_ptr_t r = (*u)->ucp_am_send_nbx(h, kAmId, hdr, hlen, data, n, &p);
    if (UCS_PTR_IS_PTR(r)) {
      const std::int64_t until = monotonic_ns() + 5'000'000'000;
      while ((*u)->ucp_request_check_status(r) == UCS_INPROGRESS && monotonic_ns() < until)
        (void)(*u)->ucp_worker_progress(wk.worker);
      (*u)->ucp_request_free(r);
    }
  };
  const std::string svc = "svc";
  WireHeader hello{kMagic, kVersion, static_cast<std::uint8_t>(WireKind::Hello), 0, 0, 1u << 20};
  if (mode == kShortHeaderFirst) {
    const char junk[3] = {1, 2, 3};
    send(junk, sizeof junk, nullptr, 0);
  } else {
    const auto payload = net::detail::hello_payload({16, 1u << 20}, svc);
    send(&hello, sizeof hello, payload.data(), payload.size());
    const std::int64_t until = monotonic_ns() + 300'000'000;  // its HelloAck
    while (monotonic_ns() < until) (void)(*u)->ucp_worker_progress(wk.worker);
    if (mode == kBadHeaderWhileFetched) {
      // The bad header arrives while the receiver fetches the 9 MiB payload (rendezvous): the
      // channel is failed (force-closed) with that receive in flight.
      static std::vector<char> big(9u << 20, 'f');
      const WireHeader msg{kMagic, kVersion, static_cast<std::uint8_t>(WireKind::Message), 0, 0, 0};
      const WireHeader bad{0xdeadbeef, kVersion, 3, 0, 1, 0};
      ucp_request_param_t p{};
      p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
      p.flags = UCP_AM_SEND_FLAG_REPLY;
      ucs_status_ptr_t r[2] = {
          (*u)->ucp_am_send_nbx(h, kAmId, &msg, sizeof msg, big.data(), big.size(), &p), nullptr};
      // Let the fetch begin, then the bad header.
      for (const std::int64_t t = monotonic_ns() + 3'000'000; monotonic_ns() < t;)
        (void)(*u)->ucp_worker_progress(wk.worker);
      r[1] = (*u)->ucp_am_send_nbx(h, kAmId, &bad, sizeof bad, "x", 1, &p);
      const std::int64_t end = monotonic_ns() + 10'000'000'000;
      while (!dropped && monotonic_ns() < end) (void)(*u)->ucp_worker_progress(wk.worker);
      for (ucs_status_ptr_t x : r)
        if (UCS_PTR_IS_PTR(x)) (*u)->ucp_request_free(x);
      return 0;
    }
    if (mode == kMessageAfterBye) {
      // Not waited for one by one: the Bye leaves while the 4 MiB payload (rendezvous) is still
      // to be fetched, so the receiver holds it, and the 64 B message comes behind it.
      static std::vector<char> big(4u << 20, 'b');
      static const char small[64] = "after the bye";
      const WireHeader msg{kMagic, kVersion, static_cast<std::uint8_t>(WireKind::Message), 0, 0, 0};
      const WireHeader bye{kMagic, kVersion, static_cast<std::uint8_t>(WireKind::Bye), 0, 0, 0};
      ucp_request_param_t p{};
      p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
      p.flags = UCP_AM_SEND_FLAG_REPLY;
      ucs_status_ptr_t r[3] = {
          (*u)->ucp_am_send_nbx(h, kAmId, &msg, sizeof msg, big.data(), big.size(), &p),
          (*u)->ucp_am_send_nbx(h, kAmId, &bye, sizeof bye, nullptr, 0, &p),
          (*u)->ucp_am_send_nbx(h, kAmId, &msg, sizeof msg, small, sizeof small, &p)};
      const std::int64_t end = monotonic_ns() + 10'000'000'000;
      while (!dropped && monotonic_ns() < end) (void)(*u)->ucp_worker_progress(wk.worker);
      for (ucs_status_ptr_t x : r)
        if (UCS_PTR_IS_PTR(x)) (*u)->ucp_request_free(x);
      return 0;
    }
    WireHeader bad{kMagic, kVersion, static_cast<std::uint8_t>(WireKind::Reply), 0, 12345, 0};
    if (mode == kBadMagic) bad = WireHeader{0xdeadbeef, kVersion, 3, 0, 1, 0};
    send(&bad, sizeof bad, "x", 1);
  }
  const std::int64_t until = monotonic_ns() + 10'000'000'000;
  while (!dropped && monotonic_ns() < until) (void)(*u)->ucp_worker_progress(wk.worker);
  return 0;
}

TEST(NetHostile, MalformedHeadersEndOnlyTheSendersChannel) {
  // Every client is forked before this process loads UCX; each waits for the port.
  Pipe p1 = Pipe::make(), p2 = Pipe::make(), p3 = Pipe::make(), p4 = Pipe::make();
  pid_t c1 = spawn([&] { return hostile(p1.get(), kShortHeaderFirst); }, 30);
  pid_t c2 = spawn([&] { return hostile(p2.get(), kReplyToNoCall); }, 30);
  pid_t c3 = spawn([&] { return hostile(p3.get(), kBadMagic); }, 30);
  pid_t good = spawn(
      [&]() -> int {
        const std::uint32_t port = p4.get();
        auto ch = net::connect("ucx://127.0.0.1:" + std::to_string(port) + "/svc", secs(10));
        if (!ch) return 10;
        auto b = ch->buffer(64);
        if (!b) return 11;
        return ch->call(*b, secs(10)) ? 0 : 12;
      },
      30);
  net::ListenOptions opt;
  opt.handshake_timeout = std::chrono::milliseconds(500);
  auto l = net::listen("ucx://127.0.0.1:0/svc", opt);
  ASSERT_TRUE(l) << l.error().message();
  const std::uint32_t port = l->port();

  // (1) Garbage instead of a hello: the handshake is dropped and counted, nothing delivered.
  p1.put(port);
  const Deadline d1 = secs(10);
  while (l->stats().failed == 0 && !d1.expired()) {
    auto ch = l->accept(Deadline::after(std::chrono::milliseconds(50)));
    ASSERT_FALSE(ch) << "a client that sent no hello was delivered";
  }
  EXPECT_GE(l->stats().failed, 1u);
  EXPECT_EQ(join(c1), 0);

  // (2), (3) A good hello, then a reply to no call / a bad magic: Protocol ends that channel.
  for (auto [pipe, pid] : {std::pair{&p2, c2}, std::pair{&p3, c3}}) {
    pipe->put(port);
    auto ch = l->accept(secs(10));
    ASSERT_TRUE(ch) << ch.error().message();
    auto m = ch->receive(secs(10));
    ASSERT_TRUE(m) << m.error().message();
    EXPECT_EQ(m->kind, Kind::PeerClosed);
    EXPECT_EQ(m->error, Errc::Protocol) << m->why;
    EXPECT_EQ(join(pid), 0);
  }

  // The listener still serves a well-behaved client.
  p4.put(port);
  auto ch = l->accept(secs(10));
  ASSERT_TRUE(ch) << ch.error().message();
  auto m = ch->receive(secs(10));
  ASSERT_TRUE(m) << m.error().message();
  ASSERT_EQ(m->kind, Kind::Request);
  ASSERT_TRUE(net::Channel::reply(std::move(*m)));
  EXPECT_EQ(join(good), 0);
}

// A peer's Bye is held while a payload it sent before is still being fetched (bye_pending_). A
// message it sends after the Bye must not be delivered as if the peer were still there: that
// channel ends with Protocol (before this it was queued and received after the 4 MiB one).
TEST(NetHostile, AMessageAfterTheByeIsAProtocolError) {
  Pipe p = Pipe::make();
  pid_t c = spawn([&] { return hostile(p.get(), kMessageAfterBye); }, 30);
  auto l = net::listen("ucx://127.0.0.1:0/svc");
  ASSERT_TRUE(l) << l.error().message();
  p.put(l->port());
  auto ch = l->accept(secs(10));
  ASSERT_TRUE(ch) << ch.error().message();
  std::vector<std::size_t> got;
  for (int i = 0; i < 4; ++i) {
    auto m = ch->receive(secs(10));
    ASSERT_TRUE(m) << m.error().message();
    if (m->kind == Kind::PeerClosed) {
      std::printf("received %zu message(s) before PeerClosed (\"%s\")\n", got.size(), m->why);
      EXPECT_EQ(m->error, Errc::Protocol) << m->why;
      break;
    }
    got.push_back(m->buffer.size());
  }
  for (std::size_t n : got) EXPECT_NE(n, 64u) << "the message sent after the Bye was delivered";
  EXPECT_EQ(join(c), 0);
}

// A malformed header while the receiver is fetching the sender's 9 MiB payload: the channel is
// force-closed with that receive in flight (UCX 1.13 aborted, ucp_ep.c:437, when an endpoint was
// closed with a receive on it: ReviewS6a.DestroyingAPairWithLargeTransfersInFlight...). The
// server must end that channel with Protocol, not abort, and serve the next client.
TEST(NetHostile, ABadHeaderWhileItsPayloadIsFetchedEndsOnlyThatChannel) {
  {  // one round: a child forked after this process loaded UCX cannot use it
    Pipe p = Pipe::make(), p2 = Pipe::make();
    pid_t c = spawn([&] { return hostile(p.get(), kBadHeaderWhileFetched); }, 30);
    pid_t good = spawn(
        [&]() -> int {
          auto ch = net::connect("ucx://127.0.0.1:" + std::to_string(p2.get()) + "/svc", secs(10));
          if (!ch) return 10;
          auto b = ch->buffer(64);
          if (!b) return 11;
          return ch->call(*b, secs(10)) ? 0 : 12;
        },
        30);
    auto l = net::listen("ucx://127.0.0.1:0/svc");
    ASSERT_TRUE(l) << l.error().message();
    p.put(l->port());
    auto ch = l->accept(secs(10));
    ASSERT_TRUE(ch) << ch.error().message();
    auto m = ch->receive(secs(10));
    ASSERT_TRUE(m) << m.error().message();
    std::printf("%s (%s)\n", m->kind == Kind::PeerClosed ? "PeerClosed" : "a message", m->why);
    if (m->kind == Kind::PeerClosed) {
      EXPECT_EQ(m->error, Errc::Protocol) << m->why;
    }
    ch->close();
    EXPECT_EQ(join(c), 0);
    p2.put(l->port());
    auto ch2 = l->accept(secs(10));
    ASSERT_TRUE(ch2) << ch2.error().message();
    auto req = ch2->receive(secs(10));
    ASSERT_TRUE(req) << req.error().message();
    ASSERT_EQ(req->kind, Kind::Request);
    ASSERT_TRUE(net::Channel::reply(std::move(*req)));
    EXPECT_EQ(join(good), 0);
  }
}

}  // namespace
}  // namespace mbmq
