// Handles in buffers (P3b): fds and Channel ends travel with a message to a process that never
// had them, arrive usable, and are closed when never delivered or never taken.
#include <gtest/gtest.h>

#include <cstring>

#include "os/mapping.h"
#include "os/memfd.h"
#include "os/process.h"
#include "test_util.h"

namespace mbmq {
namespace {

using test::join;
using test::secs;
using test::spawn;

std::span<const std::byte> bytes(const char* s) {
  return {reinterpret_cast<const std::byte*>(s), std::strlen(s)};
}

// True if every write end of the pipe is closed: a read returns EOF at once.
bool pipe_at_eof(int read_end) {
  std::byte b[1];
  auto n = os::read_full(read_end, b);
  return n && *n == 0;
}

TEST(Handles, FdsCreatedAfterForkArriveUsableInThePeer) {
  auto ends = Channel::pair();
  ASSERT_TRUE(ends);
  auto& [a, b] = *ends;
  pid_t pid = spawn([&] {
    a = Channel();
    auto m = b.receive(secs(10));
    if (!m || m->kind != Kind::Message) return 30;
    if (m->buffer.handle_count() != 2 || m->buffer.handle_kind(0) != HandleKind::Fd ||
        m->buffer.handle_kind(1) != HandleKind::Fd)
      return 31;
    os::UniqueFd memfd(*m->buffer.take_fd(0));
    os::UniqueFd pipe_w(*m->buffer.take_fd(1));
    if (m->buffer.handle_kind(0) != HandleKind::None || m->buffer.take_fd(0)) return 32;
    // Read what the sender wrote into the memfd, answer through the pipe.
    auto map = os::Mapping::map_shared(memfd.get(), 4096, os::Access::ReadWrite);
    if (!map) return 33;
    if (std::memcmp(map->data(), "hello through a memfd", 21) != 0) return 34;
    return os::write_full(pipe_w.get(), bytes("ok")) ? 0 : 35;
  });
  b = Channel();
  // Made after the fork: the child can only have them through the message.
  auto memfd = os::make_sealed_memfd("handles-test", 4096);
  auto pipe = os::make_pipe();
  ASSERT_TRUE(memfd && pipe);
  {
    auto map = os::Mapping::map_shared(memfd->get(), 4096, os::Access::ReadWrite);
    ASSERT_TRUE(map);
    std::memcpy(map->data(), "hello through a memfd", 21);
  }
  auto buf = a.buffer(16);
  ASSERT_TRUE(buf);
  ASSERT_TRUE(buf->attach_fd(memfd->release()));
  ASSERT_TRUE(buf->attach_fd(pipe->second.release()));
  const std::size_t fds_before_send = os::open_fd_count();
  ASSERT_TRUE(a.send(std::move(*buf)));
  EXPECT_EQ(os::open_fd_count(), fds_before_send - 2);  // ours are closed once sent
  std::byte got[2];
  auto n = os::read_full(pipe->first.get(), got);
  ASSERT_TRUE(n);
  ASSERT_EQ(*n, 2u);
  EXPECT_EQ(std::memcmp(got, "ok", 2), 0);
  EXPECT_EQ(join(pid), 0);
}

// A channel pair and a buffer of its first end carrying the write end of a pipe: once that fd is
// closed everywhere, the pipe's read end reads EOF.
struct PipeInBuffer {
  Result<std::pair<os::UniqueFd, os::UniqueFd>> pipe = os::make_pipe();
  Result<std::pair<Channel, Channel>> ends = Channel::pair();
  Result<Buffer> buf = fail(Errc::System, "not made");
  bool make() {
    if (!pipe || !ends) return false;
    buf = ends->first.buffer(8);
    return buf && buf->attach_fd(pipe->second.release());
  }
  bool closed_everywhere() { return pipe_at_eof(pipe->first.get()); }
};

TEST(Handles, UntakenAndUndeliveredHandlesAreClosed) {
  {  // Dropped before sending.
    PipeInBuffer t;
    ASSERT_TRUE(t.make());
    t.buf->reset();
    EXPECT_TRUE(t.closed_everywhere());
  }
  {  // Received, not taken.
    PipeInBuffer t;
    ASSERT_TRUE(t.make());
    ASSERT_TRUE(t.ends->first.send(std::move(*t.buf)));
    auto m = t.ends->second.receive(secs(5));
    ASSERT_TRUE(m);
    EXPECT_EQ(m->buffer.handle_count(), 1u);
    m->buffer.reset();
    EXPECT_TRUE(t.closed_everywhere());
  }
  {  // Sent, never received: the receiving end closes.
    PipeInBuffer t;
    ASSERT_TRUE(t.make());
    ASSERT_TRUE(t.ends->first.send(std::move(*t.buf)));
    t.ends->second.close();
    t.ends->first.close();
    EXPECT_TRUE(t.closed_everywhere());
  }
}

TEST(Handles, AChannelEndPassedToAThirdProcessWorksThere) {
  // The parent connects to B and C, then makes a pair and hands one end to each inside a
  // message: B calls C directly, and C's exit reaches B as PeerClosed (the parent kept nothing).
  auto pb = Channel::pair();
  ASSERT_TRUE(pb);
  pid_t b_pid = spawn([&] {
    pb->first = Channel();
    auto m = pb->second.receive(secs(10));
    if (!m || m->buffer.handle_kind(0) != HandleKind::Channel) return 30;
    auto ch = m->buffer.take_channel(0);
    if (!ch) return 31;
    m->buffer.reset();
    auto buf = ch->buffer(64);
    if (!buf) return 32;
    for (int i = 0; i < 20; ++i) {
      test::fill(buf->data(), static_cast<std::uint64_t>(i));
      if (!ch->call(*buf, secs(10))) return 33;
      if (!test::check(buf->data(), static_cast<std::uint64_t>(i) + 1)) return 34;
    }
    test::fill(buf->data(), 999);  // "stop": C exits without answering
    auto r = ch->call(*buf, secs(10));
    return !r && r.error().code == Errc::PeerClosed ? 0 : 35;
  });
  pb->second = Channel();
  auto pc = Channel::pair();
  ASSERT_TRUE(pc);
  pid_t c_pid = spawn([&] {
    pc->first = Channel();
    pb->first = Channel();
    auto m = pc->second.receive(secs(10));
    if (!m || m->buffer.handle_kind(0) != HandleKind::Channel) return 40;
    auto ch = m->buffer.take_channel(0);
    if (!ch) return 41;
    m->buffer.reset();
    for (int i = 0;; ++i) {
      auto req = ch->receive(secs(10));
      if (!req || req->kind != Kind::Request) return 42;
      // Exit holding the request (returning would answer it NoReply): B must see PeerClosed.
      if (test::check(req->buffer.data(), 999)) os::exit_now(0);
      if (!test::check(req->buffer.data(), static_cast<std::uint64_t>(i))) return 43;
      test::fill(req->buffer.data(), static_cast<std::uint64_t>(i) + 1);
      if (!MsgQueue::reply(std::move(*req))) return 44;
    }
  });
  pc->second = Channel();
  // Made after both forks: B and C can only have these ends through the messages.
  auto xy = Channel::pair();
  ASSERT_TRUE(xy);
  auto to_b = pb->first.buffer(8);
  auto to_c = pc->first.buffer(8);
  ASSERT_TRUE(to_b && to_c);
  ASSERT_TRUE(to_b->attach(std::move(xy->first)));
  ASSERT_TRUE(to_c->attach(std::move(xy->second)));
  EXPECT_FALSE(xy->first.valid());
  ASSERT_TRUE(pb->first.send(std::move(*to_b)));
  ASSERT_TRUE(pc->first.send(std::move(*to_c)));
  EXPECT_EQ(join(c_pid), 0);
  EXPECT_EQ(join(b_pid), 0);
}

TEST(Handles, LimitsAreEnforcedAndReported) {
  ChannelOptions opt;
  opt.max_handles = 2;
  auto ends = Channel::pair(opt);
  ASSERT_TRUE(ends);
  auto buf = ends->first.buffer(8);
  ASSERT_TRUE(buf);
  for (std::size_t i = 0; i < Buffer::kMaxHandles; ++i) {
    auto p = os::make_pipe();
    ASSERT_TRUE(p);
    ASSERT_TRUE(buf->attach_fd(p->first.release()));
  }
  auto p = os::make_pipe();
  ASSERT_TRUE(p);
  auto over = buf->attach_fd(p->first.release());
  ASSERT_FALSE(over);
  EXPECT_EQ(over.error().code, Errc::InvalidArgument);
  // 8 attached, the channel takes 2: the send is refused and the buffer stays ours.
  auto s = ends->first.send(std::move(*buf));
  ASSERT_FALSE(s);
  EXPECT_EQ(s.error().code, Errc::InvalidArgument);
  EXPECT_TRUE(buf->valid());

  ChannelOptions bad;
  bad.max_handles = 9;
  EXPECT_FALSE(Channel::pair(bad));
}

TEST(Handles, TheInFlightLimitStopsTheSenderWithBusy) {
  ChannelOptions opt;
  opt.max_in_flight = 2;
  auto ends = Channel::pair(opt);
  ASSERT_TRUE(ends);
  auto q = MsgQueue::create();
  ASSERT_TRUE(q);
  ASSERT_TRUE(ends->first.redirect(*q, 1));
  for (int i = 0; i < 2; ++i) {
    auto b = ends->first.buffer(8);
    ASSERT_TRUE(b && ends->first.send_request(std::move(*b)));
  }
  auto b = ends->first.buffer(8);
  ASSERT_TRUE(b);
  auto s = ends->first.send_request(std::move(*b));
  ASSERT_FALSE(s);
  EXPECT_EQ(s.error().code, Errc::Busy);
  // One answered: there is room for one more.
  auto m = ends->second.receive(secs(5));
  ASSERT_TRUE(m && m->kind == Kind::Request);
  ASSERT_TRUE(MsgQueue::reply(std::move(*m)));
  auto r = q->wait(secs(5));
  ASSERT_TRUE(r && r->kind == Kind::Reply);
  EXPECT_TRUE(ends->first.send_request(std::move(*b)));
}

TEST(Handles, AReplyCarriesHandlesBackToTheCaller) {
  auto ends = Channel::pair();
  ASSERT_TRUE(ends);
  auto& [client, server] = *ends;
  pid_t pid = spawn([&] {
    client = Channel();
    for (int i = 0; i < 2; ++i) {
      auto m = server.receive(secs(10));
      if (!m || m->kind != Kind::Request) return 30;
      // The request's own fd is not sent back; the new one is.
      if (m->buffer.handle_count() != (i == 0 ? 1u : 0u)) return 31;
      auto p = os::make_pipe();
      if (!p || !os::write_full(p->second.get(), bytes("pong"))) return 32;
      if (!m->buffer.attach_fd(p->first.release())) return 33;
      if (!MsgQueue::reply(std::move(*m))) return 34;
    }
    return 0;
  });
  server = Channel();
  auto p = os::make_pipe();
  ASSERT_TRUE(p);
  auto buf = client.buffer(8);
  ASSERT_TRUE(buf && buf->attach_fd(p->second.release()));
  ASSERT_TRUE(client.call(*buf, secs(10)));  // call(): the reply's handles land in buf
  ASSERT_EQ(buf->handle_count(), 1u);
  auto read_pong = [](int fd) {
    os::UniqueFd owned(fd);
    std::byte got[4];
    auto n = os::read_full(owned.get(), got);
    return n && *n == 4 && std::memcmp(got, "pong", 4) == 0;
  };
  EXPECT_TRUE(read_pong(*buf->take_fd(0)));
  // The same through a queue: Kind::Reply.
  auto q = MsgQueue::create();
  ASSERT_TRUE(q && client.redirect(*q, 5));
  ASSERT_TRUE(client.send_request(std::move(*buf)));
  auto r = q->wait(secs(10));
  ASSERT_TRUE(r);
  ASSERT_EQ(r->kind, Kind::Reply);
  ASSERT_EQ(r->buffer.handle_count(), 1u);
  EXPECT_TRUE(read_pong(*r->buffer.take_fd(0)));
  EXPECT_EQ(join(pid), 0);
}

TEST(Handles, AMessageSentJustBeforeThePeerClosesStillArrivesWithItsHandles) {
  // Redirecting A sends B a doorbell page that B never reads; B's close with that message unread
  // makes the kernel report ECONNRESET on A's socket once, ahead of B's handles packet.
  auto ends = Channel::pair();
  auto q = MsgQueue::create();
  auto pipe = os::make_pipe();
  ASSERT_TRUE(ends && q && pipe);
  auto& [a, b] = *ends;
  ASSERT_TRUE(a.redirect(*q, 3));
  auto buf = b.buffer(8);
  ASSERT_TRUE(buf && buf->attach_fd(pipe->second.release()));
  ASSERT_TRUE(b.send(std::move(*buf)));
  b.close();
  auto m = q->wait(secs(5));
  ASSERT_TRUE(m);
  ASSERT_EQ(m->kind, Kind::Message) << "error: " << static_cast<int>(m->error);
  ASSERT_EQ(m->buffer.handle_kind(0), HandleKind::Fd);
  auto end = q->wait(secs(5));
  ASSERT_TRUE(end);
  EXPECT_EQ(end->kind, Kind::PeerClosed);
  EXPECT_EQ(end->error, Errc::PeerClosed);
}

}  // namespace
}  // namespace mbmq
