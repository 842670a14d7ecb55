// Moving a channel end to a process that did not inherit it (SCM_RIGHTS over a Unix socket).
#include <gtest/gtest.h>

#include "os/unix_socket.h"
#include "test_util.h"

namespace mbmq {
namespace {

using test::join;
using test::secs;
using test::spawn;

int serve_n(Channel ch, int n) {
  for (int i = 0; i < n; ++i) {
    auto m = ch.receive(secs(30));
    if (!m || m->kind != Kind::Request) return 20;
    if (!test::check(m->buffer.data(), static_cast<std::uint64_t>(i))) return 21;
    test::fill(m->buffer.data(), static_cast<std::uint64_t>(i) + 1);
    if (!MsgQueue::reply(std::move(*m))) return 22;
  }
  return 0;
}

TEST(Transfer, AnEndSentToAProcessThatNeverHadItWorksThere) {
  auto sock = os::seqpacket_pair();
  ASSERT_TRUE(sock);
  int child_sock = sock->second.get();
  // The child is forked before the channel exists: it can only have it by transfer.
  pid_t pid = spawn([&] {
    auto ch = Channel::receive_from(child_sock, secs(30));
    if (!ch) return 30;
    return serve_n(std::move(*ch), 10);
  });
  sock->second.reset();
  auto ends = Channel::pair();
  ASSERT_TRUE(ends);
  auto& [client, server] = *ends;
  ASSERT_TRUE(server.send_over(sock->first.get()));
  EXPECT_FALSE(server.valid());
  auto b = client.buffer(100000);  // an extent, created after the transfer
  ASSERT_TRUE(b);
  for (int i = 0; i < 10; ++i) {
    test::fill(b->data(), static_cast<std::uint64_t>(i));
    auto r = client.call(*b, secs(30));
    ASSERT_TRUE(r) << r.error().message();
    ASSERT_TRUE(test::check(b->data(), static_cast<std::uint64_t>(i) + 1));
  }
  EXPECT_EQ(join(pid), 0);
}

TEST(Transfer, BothEndsHandedToTwoOtherProcessesTalkToEachOther) {
  auto s1 = os::seqpacket_pair();
  auto s2 = os::seqpacket_pair();
  ASSERT_TRUE(s1 && s2);
  int c1 = s1->second.get(), c2 = s2->second.get();
  pid_t server = spawn([&] {
    auto ch = Channel::receive_from(c1, secs(30));
    return ch ? serve_n(std::move(*ch), 5) : 30;
  });
  pid_t client = spawn([&] {
    auto ch = Channel::receive_from(c2, secs(30));
    if (!ch) return 30;
    auto b = ch->buffer(64);
    for (int i = 0; i < 5; ++i) {
      test::fill(b->data(), static_cast<std::uint64_t>(i));
      if (!ch->call(*b, secs(30))) return 31;
      if (!test::check(b->data(), static_cast<std::uint64_t>(i) + 1)) return 32;
    }
    return 0;
  });
  auto ends = Channel::pair();
  ASSERT_TRUE(ends);
  ASSERT_TRUE(ends->second.send_over(s1->first.get()));
  ASSERT_TRUE(ends->first.send_over(s2->first.get()));
  EXPECT_EQ(join(server), 0);
  EXPECT_EQ(join(client), 0);
}

TEST(Transfer, AnEndWithBuffersOutstandingIsNotSent) {
  auto sock = os::seqpacket_pair();
  auto ends = Channel::pair();
  ASSERT_TRUE(sock && ends);
  auto b = ends->first.buffer(10);
  ASSERT_TRUE(b);
  auto r = ends->first.send_over(sock->first.get());
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, Errc::Busy);
  EXPECT_TRUE(ends->first.valid());
}

TEST(Transfer, GarbageInsteadOfAnEndIsAProtocolError) {
  auto sock = os::seqpacket_pair();
  ASSERT_TRUE(sock);
  std::byte junk[40]{};
  int fds[2] = {sock->first.get(), sock->first.get()};
  ASSERT_TRUE(os::send_msg(sock->first.get(), junk, fds));
  auto ch = Channel::receive_from(sock->second.get(), secs(5));
  ASSERT_FALSE(ch);
  EXPECT_EQ(ch.error().code, Errc::Protocol);
}

}  // namespace
}  // namespace mbmq
