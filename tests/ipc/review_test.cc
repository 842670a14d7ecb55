// Regression tests from the hostile review of the hardening pass (issue 11): one reproducer per
// bug the review confirmed (each failed before its fix), plus the suspicions it could not confirm,
// kept as guards. Each test states the behaviour the documentation promises.
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <thread>
#include <vector>

#include "ipc/endpoint.h"
#include "ipc/test_access.h"
#include "mbmq/mbmq.h"
#include "os/file.h"
#include "os/futex.h"
#include "os/unix_socket.h"
#include "topic_util.h"

namespace mbmq {
namespace {

using namespace std::chrono_literals;

Deadline in(std::chrono::milliseconds d) { return Deadline::after(d); }

int dup_devnull() {
  static auto devnull = os::open_read("/dev/null");
  auto d = os::dup_fd(devnull->get());
  return d ? d->release() : -1;
}

shm::Direction* dir(Channel& c, int d) {
  auto seg = detail::TestAccess::segment(c);
  return reinterpret_cast<shm::Direction*>(seg.data() + shm::kDirOffset +
                                           (d == 0 ? 0 : sizeof(shm::Direction)));
}

// ---------------------------------------------------------------------------------------------
// 1. An honest peer sends one-way messages with handles while we are inside call(): call()
//    accepts them into pending_ and their handle fds stay in the stash until receive() takes
//    them. The stash budget (kMaxStashedHandleFds = 128) is meant for packets sent *ahead* of
//    their descriptors, but here the descriptors were already taken: 17 messages of 8 fds close
//    an honest channel with Protocol.
TEST(Review, HonestMessagesWithHandlesDuringACallDoNotCloseTheChannel) {
  ChannelOptions opt;
  opt.slots_per_side = 32;  // room for 20 one-way messages outstanding
  auto ends = Channel::pair(opt);
  ASSERT_TRUE(ends);
  auto& [client, server] = *ends;
  constexpr int kMessages = 20;  // 20 x 8 = 160 fds, each message well within max_handles
  std::atomic<bool> server_ok{true};
  std::thread srv([&] {
    auto req = server.receive(in(5000ms));
    if (!req || req->kind != Kind::Request) {
      server_ok = false;
      return;
    }
    for (int i = 0; i < kMessages; ++i) {
      auto b = server.buffer(64);
      if (!b) {
        std::printf("server buffer %d: %s\n", i, b.error().message().c_str());
        server_ok = false;
        return;
      }
      b->data()[0] = static_cast<std::byte>(i);
      for (int k = 0; k < 8; ++k)
        if (!b->attach_fd(dup_devnull())) server_ok = false;
      if (auto s = server.send(std::move(*b)); !s) {
        std::printf("server send %d: %s\n", i, s.error().message().c_str());
        server_ok = false;
        return;
      }
      std::this_thread::sleep_for(1ms);  // the client is asleep in call(): each one wakes it
    }
    if (auto s = MsgQueue::reply(std::move(*req)); !s) {
      std::printf("server reply: %s\n", s.error().message().c_str());
      server_ok = false;
    }
  });
  auto b = client.buffer(64);
  ASSERT_TRUE(b);
  Status called = client.call(*b, in(5000ms));
  srv.join();
  EXPECT_TRUE(called) << called.error().message();
  EXPECT_TRUE(server_ok.load());
  int with_handles = 0, without_handles = 0;
  const char* ended = "";
  for (int i = 0; i < kMessages; ++i) {
    auto m = client.receive(in(1000ms));
    if (!m) break;
    if (m->kind == Kind::PeerClosed) {
      ended = m->why;
      break;
    }
    ASSERT_EQ(m->kind, Kind::Message);
    (m->buffer.handle_count() == 8u ? with_handles : without_handles) += 1;
  }
  EXPECT_EQ(with_handles, kMessages)
      << without_handles << " messages delivered without the handles they announced; channel "
      << "ended: \"" << ended << "\"";
}

// ---------------------------------------------------------------------------------------------
// 2. The documented server loop, msg = reply_and_wait(std::move(msg)), under back-pressure: the
//    caller is slow, its control socket is full, reply() says WouldBlock and keeps the answer
//    for a retry, but reply_and_wait() swallows that and waits; the caller's assignment then
//    destroys the kept buffer, which goes back as NoReply. The answer is lost.
TEST(Review, ReplyAndWaitUnderBackPressureNeverTurnsAnAnswerIntoNoReply) {
  auto ends = Channel::pair();
  ASSERT_TRUE(ends);
  auto& [client, server] = *ends;
  ASSERT_TRUE(os::set_send_buffer(detail::TestAccess::control_fd(server), 2048));
  auto q = MsgQueue::create();
  ASSERT_TRUE(q);
  ASSERT_TRUE(server.redirect(*q, 1));
  constexpr int kRequests = 12;
  for (int i = 0; i < kRequests; ++i) {
    auto b = client.buffer(64);
    ASSERT_TRUE(b);
    b->data()[0] = static_cast<std::byte>(i);
    ASSERT_TRUE(client.send_request(std::move(*b)));
  }
  // The server loop, as README/DESIGN show it; every answer carries one fd.
  auto msg = q->wait(in(1000ms));
  ASSERT_TRUE(msg);
  int handled = 0;
  while (msg) {
    if (msg->kind != Kind::Request) break;
    ++handled;
    msg->buffer.data()[1] = std::byte{0x5a};
    ASSERT_TRUE(msg->buffer.attach_fd(dup_devnull()));
    auto next = q->reply_and_wait(std::move(*msg), in(200ms));
    if (!next) {
      ASSERT_EQ(next.error().code, Errc::TimedOut) << next.error().message();
      msg.value().buffer.reset();  // what `msg = MBMQ_TRY(...)` does to the old message
      break;
    }
    msg = std::move(next);
  }
  EXPECT_EQ(handled, kRequests);
  // The server loop goes on (as a real one does): answers held back by back-pressure go out as
  // the slow caller makes room.
  std::atomic<bool> stop{false};
  std::thread loop([&] {
    while (!stop.load()) (void)q->wait(in(20ms));
  });
  // The slow caller now collects its answers: every one must be an answer, none NoReply.
  int answers = 0, noreply = 0;
  for (;;) {
    auto m = client.receive(in(500ms));
    if (!m) break;
    // Says why, for the rare run under load where the end closes instead (README, known issues).
    ASSERT_EQ(m->kind, Kind::Reply) << "error " << static_cast<int>(m->error) << ": " << m->why
                                    << " after " << answers << " answers";
    if (m->error == Errc::NoReply) {
      ++noreply;
    } else {
      ++answers;
      EXPECT_EQ(m->buffer.data()[1], std::byte{0x5a});
      EXPECT_EQ(m->buffer.handle_count(), 1u);
    }
  }
  stop = true;
  loop.join();
  EXPECT_EQ(noreply, 0) << "answers lost (NoReply) under back-pressure";
  EXPECT_EQ(answers, kRequests);
}

// ---------------------------------------------------------------------------------------------
// 3. reply() with more handles than the channel's max_handles: send_handles_locked() fails with
//    InvalidArgument, and reply() pushes the answer *without* its handles and returns success.
//    (send() refuses the same buffer.) Any non-WouldBlock failure of the handles packet
//    (ETOOMANYREFS, ENOBUFS, ...) takes the same path.
TEST(Review, AReplyWhoseHandlesCannotBeSentIsNotReportedAsDelivered) {
  ChannelOptions opt;
  opt.max_handles = 1;
  auto ends = Channel::pair(opt);
  ASSERT_TRUE(ends);
  auto& [client, server] = *ends;
  std::atomic<bool> reply_ok{false};
  std::thread srv([&] {
    auto req = server.receive(in(5000ms));
    if (!req) return;
    (void)req->buffer.attach_fd(dup_devnull());
    (void)req->buffer.attach_fd(dup_devnull());
    auto s = MsgQueue::reply(std::move(*req));
    reply_ok = static_cast<bool>(s);
    if (!s) std::printf("reply: %s\n", s.error().message().c_str());
  });
  auto b = client.buffer(64);
  ASSERT_TRUE(b);
  Status called = client.call(*b, in(5000ms));
  srv.join();
  // Either the reply is refused (the server learns its handles could not go) or the caller gets
  // them; never "success" on one side and an answer silently missing its handles on the other.
  if (reply_ok.load()) {
    ASSERT_TRUE(called);
    EXPECT_EQ(b->handle_count(), 2u) << "reply() returned Ok but the caller got no handles";
  }
}

// A send refused for carrying more than max_handles must leave nothing on the peer's control
// socket. It sent a fresh extent's memfd packet first (the descriptor that would make the peer
// read it never followed), so a loop of such sends filled the socket: ~555 packets later every
// send needing a packet failed, and a peer that had taken every descriptor got the channel
// closed as "control socket full: the peer does not read it" (review 2026-12-02). 1,000 refused
// sends of a fresh 1 MiB extent with 2 handles (max 1), then the channel still carries an extent
// message with one handle.
TEST(Review, SendsRefusedForTooManyHandlesLeaveNothingOnThePeersSocket) {
  ChannelOptions opt;
  opt.max_handles = 1;
  auto ends = Channel::pair(opt);
  ASSERT_TRUE(ends);
  auto& [a, b] = *ends;
  constexpr std::size_t kExtent = std::size_t{1} << 20;  // above slot_size: an extent
  for (int i = 0; i < 1000; ++i) {
    auto buf = a.buffer(kExtent);
    ASSERT_TRUE(buf) << i << ": " << buf.error().message();
    ASSERT_TRUE(buf->attach_fd(dup_devnull()));
    ASSERT_TRUE(buf->attach_fd(dup_devnull()));
    Status s = a.send(std::move(*buf));
    ASSERT_FALSE(s) << i;
    ASSERT_EQ(s.error().code, Errc::InvalidArgument) << i << ": " << s.error().message();
    // The peer takes what the ring carries meanwhile (hints of freed extents), as a live peer.
    if (i % 64 == 0) (void)b.receive(Deadline::immediate());
  }
  auto buf = a.buffer(kExtent);
  ASSERT_TRUE(buf);
  buf->data()[0] = std::byte{7};
  ASSERT_TRUE(buf->attach_fd(dup_devnull()));
  Status sent = a.send(std::move(*buf));
  ASSERT_TRUE(sent) << sent.error().message();
  auto m = b.receive(in(5000ms));
  ASSERT_TRUE(m) << m.error().message();
  ASSERT_EQ(m->kind, Kind::Message) << m->why;
  EXPECT_EQ(m->buffer.data()[0], std::byte{7});
  EXPECT_EQ(m->buffer.handle_count(), 1u);
}

// ---------------------------------------------------------------------------------------------
// Plays side 1 (the server) of a pair through the raw segment: floods the client's inbound ring
// with valid ReleaseExtent descriptors, staying a lap ahead of the consumer's head, so that the
// consumer never finds its ring empty.
struct Flooder {
  explicit Flooder(Channel& side1) : d(dir(side1, 1)) {}
  void run(std::chrono::milliseconds for_how_long) {
    const auto stop_at = std::chrono::steady_clock::now() + for_how_long;
    std::uint32_t tail = 0;
    while (std::chrono::steady_clock::now() < stop_at && !stop.load(std::memory_order_relaxed)) {
      for (int burst = 0; burst < 4096; ++burst) {
        const std::uint32_t head = d->head.load(std::memory_order_acquire);
        while (tail - head < shm::kRingCapacity) {
          shm::RingEntry& e = d->ring[tail % shm::kRingCapacity];
          e.store(shm::Desc{shm::kExtentBit | (tail % shm::kMaxExtents), 0, 12345,
                            static_cast<std::uint16_t>(shm::DescKind::ReleaseExtent), 0});
          e.seq.store(++tail, std::memory_order_release);
        }
        d->tail.store(tail, std::memory_order_release);
        // Keep the consumer awake (P4), as a producer does.
        if ((burst & 63) == 0) {
          d->doorbell.fetch_add(1, std::memory_order_release);
          (void)os::futex_wake(&d->doorbell, 1);
        }
      }
    }
    pushed = tail;
  }
  shm::Direction* d;
  std::atomic<bool> stop{false};
  std::uint32_t pushed = 0;
};

// 4. call() with a deadline against a peer that floods valid ReleaseExtent descriptors: the
//    deadline is only checked when the ring is empty (and the inner pop loop holds mu_ until it
//    is), so the call overruns its deadline for as long as the flood lasts.
TEST(Review, AReleaseExtentFloodDoesNotKeepCallPastItsDeadline) {
  auto ends = Channel::pair();
  ASSERT_TRUE(ends);
  auto& [client, server] = *ends;
  Flooder f(server);
  std::thread attacker([&] { f.run(3000ms); });
  std::this_thread::sleep_for(20ms);
  auto b = client.buffer(64);
  ASSERT_TRUE(b);
  const auto t0 = std::chrono::steady_clock::now();
  Status s = client.call(*b, in(200ms));
  const auto took = std::chrono::steady_clock::now() - t0;
  f.stop = true;
  attacker.join();
  std::printf(
      "call flood: %lld ms, %u descriptors flooded\n",
      static_cast<long long>(std::chrono::duration_cast<std::chrono::milliseconds>(took).count()),
      f.pushed);
  EXPECT_FALSE(s);
  EXPECT_LT(took, 1000ms) << "call(200 ms) returned after "
                          << std::chrono::duration_cast<std::chrono::milliseconds>(took).count()
                          << " ms (" << (s ? "ok" : s.error().message()) << "), " << f.pushed
                          << " descriptors flooded";
}

// 4b. The same flood against receive().
TEST(Review, AReleaseExtentFloodDoesNotKeepReceivePastItsDeadline) {
  auto ends = Channel::pair();
  ASSERT_TRUE(ends);
  auto& [client, server] = *ends;
  Flooder f(server);
  std::thread attacker([&] { f.run(3000ms); });
  std::this_thread::sleep_for(20ms);
  const auto t0 = std::chrono::steady_clock::now();
  auto m = client.receive(in(200ms));
  const auto took = std::chrono::steady_clock::now() - t0;
  f.stop = true;
  attacker.join();
  EXPECT_LT(took, 1000ms) << "receive(200 ms) returned after "
                          << std::chrono::duration_cast<std::chrono::milliseconds>(took).count()
                          << " ms, " << f.pushed << " descriptors flooded";
}

// 5. The same flood from one client of a server's queue: QueueCore::wait() holds the queue's
//    mutex while Endpoint::poll() loops over Internal descriptors without returning, so one
//    hostile client freezes every channel of that queue (and its deadline).
TEST(Review, OneFloodingClientDoesNotFreezeTheServersQueue) {
  auto q = MsgQueue::create();
  ASSERT_TRUE(q);
  // Hostile client: plays side 0 (client) of a pair whose side 1 is redirected to the queue.
  auto bad = Channel::pair();
  ASSERT_TRUE(bad);
  auto& [bad_client, bad_server] = *bad;
  ASSERT_TRUE(bad_server.redirect(*q, 666));
  // Flooder writes the direction side 1 consumes: dir[0] (side 0 produces).
  struct F0 : Flooder {
    explicit F0(Channel& c) : Flooder(c) { d = dir(c, 0); }
  } f(bad_client);
  auto good = Channel::pair();
  ASSERT_TRUE(good);
  auto& [good_client, good_server] = *good;
  ASSERT_TRUE(good_server.redirect(*q, 7));
  std::atomic<bool> stop{false};
  std::thread server_loop([&] {
    while (!stop.load()) {
      auto m = q->wait(in(50ms));
      if (!m) continue;
      if (m->kind == Kind::Request) (void)MsgQueue::reply(std::move(*m));
    }
  });
  std::thread attacker([&] { f.run(3000ms); });
  std::this_thread::sleep_for(50ms);
  auto b = good_client.buffer(64);
  ASSERT_TRUE(b);
  const auto t0 = std::chrono::steady_clock::now();
  Status s = good_client.call(*b, in(1000ms));
  const auto took = std::chrono::steady_clock::now() - t0;
  f.stop = true;
  attacker.join();
  stop = true;
  server_loop.join();
  EXPECT_TRUE(s) << "honest call: " << s.error().message() << " after "
                 << std::chrono::duration_cast<std::chrono::milliseconds>(took).count() << " ms, "
                 << f.pushed << " descriptors flooded by the other client";
}

// ---------------------------------------------------------------------------------------------
// 6. The server loop, msg = MBMQ_TRY(reply_and_wait(...)), with one channel closed locally (an
//    admin thread drops a client) while the loop holds its request: reply() fails with
//    InvalidArgument ("closed" = closed_errc(LocalClosed)), which reply_and_wait() returns: the
//    loop for every other client ends.
TEST(Review, ClosingOneClientsChannelDoesNotEndTheServerLoop) {
  auto q = MsgQueue::create();
  ASSERT_TRUE(q);
  auto ends = Channel::pair();
  ASSERT_TRUE(ends);
  auto& [client, server] = *ends;
  ASSERT_TRUE(server.redirect(*q, 1));
  auto b = client.buffer(64);
  ASSERT_TRUE(b);
  ASSERT_TRUE(client.send_request(std::move(*b)));
  auto msg = q->wait(in(1000ms));
  ASSERT_TRUE(msg);
  ASSERT_EQ(msg->kind, Kind::Request);
  server.close();  // e.g. from another thread: the client is kicked
  auto next = q->reply_and_wait(std::move(*msg), in(100ms));
  ASSERT_FALSE(next);
  EXPECT_NE(next.error().code, Errc::InvalidArgument)
      << "one closed channel ends the server loop: " << next.error().message();
}

// ---------------------------------------------------------------------------------------------
// 7. redirect() while another thread is inside call() on the same end: call() checked
//    redirected_ once at its start and sleeps on the channel's own doorbell; the peer now wakes
//    the queue's page. The reply is in the ring but the call is never woken (or the queue steals
//    the reply and closes the channel with Protocol).
TEST(Review, RedirectDuringACallNeitherHangsTheCallNorBreaksTheChannel) {
  ChannelOptions opt;
  opt.wait = WaitPolicy{WaitMode::Sleep, {}};
  auto ends = Channel::pair(opt);
  ASSERT_TRUE(ends);
  auto& [client, server] = *ends;
  auto q = MsgQueue::create(WaitPolicy{WaitMode::Sleep, {}});
  ASSERT_TRUE(q);
  std::thread srv([&] {
    auto req = server.receive(in(3000ms));
    if (!req) return;
    std::this_thread::sleep_for(200ms);
    (void)MsgQueue::reply(std::move(*req));
  });
  Status called;
  std::thread caller([&] {
    auto b = client.buffer(64);
    if (!b) return;
    called = client.call(*b, in(2000ms));
  });
  std::this_thread::sleep_for(100ms);
  Status red = client.redirect(*q, 9);
  const auto t0 = std::chrono::steady_clock::now();
  caller.join();
  srv.join();
  std::printf("redirect during call: redirect %s; call %s after %lld ms more\n",
              red ? "ok" : red.error().message().c_str(),
              called ? "ok" : called.error().message().c_str(),
              static_cast<long long>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                         std::chrono::steady_clock::now() - t0)
                                         .count()));
  // Acceptable: the redirect is refused while a call is in progress, or the call still gets its
  // reply. Not acceptable: a call that sleeps to its deadline with its reply in the ring.
  if (red) {
    EXPECT_TRUE(called) << "redirect() succeeded during call(); call: " << called.error().message();
    EXPECT_LT(std::chrono::steady_clock::now() - t0, 1000ms)
        << "the reply came ~100 ms after the redirect; the call slept on to its deadline";
  }
}

// 7b. The same with a thread waiting on the queue: the queue's scan polls the end while call()
//    consumes it too (RingConsumer::head_ read without mu_ by call(), written by the queue's
//    pop): the queue takes the call's reply, finds no call waiting, and closes the channel.
TEST(Review, RedirectDuringACallWithAQueueWaiterDoesNotBreakTheChannel) {
  auto ends = Channel::pair();
  ASSERT_TRUE(ends);
  auto& [client, server] = *ends;
  auto q = MsgQueue::create();
  ASSERT_TRUE(q);
  std::thread srv([&] {
    auto req = server.receive(in(3000ms));
    if (!req) return;
    std::this_thread::sleep_for(200ms);
    (void)MsgQueue::reply(std::move(*req));
  });
  std::atomic<bool> stop{false};
  std::vector<Message> got;
  std::thread waiter([&] {
    while (!stop.load()) {
      auto m = q->wait(in(20ms));
      if (m) got.push_back(std::move(*m));
    }
  });
  Status called;
  std::thread caller([&] {
    auto b = client.buffer(64);
    if (!b) return;
    called = client.call(*b, in(2000ms));
  });
  std::this_thread::sleep_for(100ms);
  Status red = client.redirect(*q, 9);
  caller.join();
  srv.join();
  stop = true;
  waiter.join();
  for (auto& m : got)
    std::printf("queue got kind %d error %d why \"%s\"\n", static_cast<int>(m.kind),
                static_cast<int>(m.error), m.why);
  if (red) {
    EXPECT_TRUE(called) << "redirect() succeeded during call(); call: " << called.error().message();
    for (auto& m : got) EXPECT_NE(m.kind, Kind::PeerClosed) << m.why;
  }
}

// ---------------------------------------------------------------------------------------------
// 8. Threads: close() while other threads are in call(), receive(), buffer() and send() on the
//    same end, with the peer answering. Run under TSan (data races) and ASan (use after unmap).
TEST(Review, CloseWhileOtherThreadsCallReceiveAndSend) {
  for (int round = 0; round < 30; ++round) {
    ChannelOptions opt;
    opt.wait = WaitPolicy{WaitMode::Sleep, {}};
    auto ends = Channel::pair(opt);
    ASSERT_TRUE(ends);
    auto& [client, server] = *ends;
    std::atomic<bool> stop{false};
    std::thread srv([&] {
      while (!stop.load()) {
        auto m = server.receive(in(20ms));
        if (!m) continue;
        if (m->kind == Kind::PeerClosed) return;
        if (m->kind == Kind::Request) (void)MsgQueue::reply(std::move(*m));
        // one-way: dropped, given back
      }
    });
    // Server sends one-way messages to the client, which the receiver thread takes.
    std::thread pusher([&] {
      while (!stop.load()) {
        auto b = server.buffer(200000);  // an extent: mapping churn
        if (b) (void)server.send(std::move(*b));
        std::this_thread::sleep_for(100us);
      }
    });
    std::thread caller([&] {
      for (int i = 0; i < 1000 && !stop.load(); ++i) {
        auto b = client.buffer(i % 2 ? 64 : 100000);
        if (!b) continue;
        std::memset(b->data().data(), 1, b->data().size());
        auto s = client.call(*b, in(200ms));
        if (!s && s.error().code == Errc::InvalidArgument) return;
        if (b->valid()) std::memset(b->data().data(), 2, b->data().size());
      }
    });
    std::thread receiver([&] {
      for (int i = 0; i < 1000 && !stop.load(); ++i) {
        auto m = client.receive(in(50ms));
        if (!m) {
          if (m.error().code == Errc::InvalidArgument) return;
          continue;
        }
        if (m->buffer.valid() && !m->buffer.data().empty())
          (void)std::to_integer<int>(m->buffer.data()[0]);
      }
    });
    std::thread sender([&] {
      for (int i = 0; i < 1000 && !stop.load(); ++i) {
        auto b = client.buffer(64);
        if (b) (void)client.send(std::move(*b));
      }
    });
    std::this_thread::sleep_for(std::chrono::milliseconds(5 + round % 7));
    client.close();
    caller.join();
    receiver.join();
    sender.join();
    stop = true;
    pusher.join();
    srv.join();
  }
}

// REVIEW (release_batch): "Messages left in `out` from an earlier batch are dropped first"
// (Channel::receive_batch). A Sample left in a Message of the span (a span also used for
// MsgQueue::wait results, Kind::Sample) is not: neither pass of release_batch resets m.sample
// (the second pass resets only the buffer, and the channel of a Kind::Connection), and since
// #stream-skip the second pass does not even run when every buffer was a one-way slot. The
// message then comes back as Kind::Message still holding the sample (the publisher's slot).
// Pre-existing (the old second pass did not reset it either).
TEST(Review, ReceiveBatchDropsASampleLeftInItsSpan) {
  const std::string name = test::topic_name("mbmq-review-", "sample-left");
  TopicOptions o;
  o.samples = 4;
  o.sample_size = 64;
  o.keep = 1;
  auto pub = Publisher::create(name, o);
  ASSERT_TRUE(pub);
  Result<Subscriber> sub = fail(Errc::TimedOut, "not yet");
  // jthread: ends by its deadline, also after a failed ASSERT (else terminate, the finding lost);
  // 20 s: a loaded CI machine under ASan
  std::jthread connector([&] { sub = Subscriber::connect(name, test::secs(20)); });
  ASSERT_TRUE(pub->wait_for_subscribers(1, test::secs(20)));
  connector.join();
  ASSERT_TRUE(sub);
  {
    auto b = pub->buffer(8, test::secs(5));
    ASSERT_TRUE(b);
    ASSERT_TRUE(pub->publish(std::move(*b), test::secs(5)));
  }
  auto s = sub->receive(test::secs(5));
  ASSERT_TRUE(s);
  auto p = Channel::pair();
  ASSERT_TRUE(p);
  auto& [a, b] = *p;
  std::vector<Message> span(2);
  span[0].kind = Kind::Sample;
  span[0].sample = std::move(*s);
  // The stream's steady state: the other message a one-way slot, so the first pass finishes it.
  {
    auto buf = a.buffer(16);
    ASSERT_TRUE(buf);
    ASSERT_TRUE(a.send(std::move(*buf)));
    auto got = b.receive_batch({&span[1], 1}, test::secs(5));
    ASSERT_TRUE(got);
  }
  for (int round = 0; round < 2; ++round) {
    auto buf = a.buffer(16);
    ASSERT_TRUE(buf);
    ASSERT_TRUE(a.send(std::move(*buf)));
    auto got = b.receive_batch(span, test::secs(5));
    ASSERT_TRUE(got);
    EXPECT_FALSE(span[0].sample.valid() && span[0].kind != Kind::Sample)
        << "round " << round << ": a Kind::" << static_cast<int>(span[0].kind)
        << " message still holds the sample left in the span";
  }
}

// REVIEW (release_batch's stream path, make_slot_message reusing parked buffers): a buffer the
// application moved out of a message of the span stays its own while the stream goes on: its
// slot is never given back (its bytes never overwritten by the sender) until it drops it.
TEST(Review, ABufferMovedOutOfTheSpanIsNeverGivenBackByTheStream) {
  ChannelOptions o;
  o.slots_per_side = 8;
  auto p = Channel::pair(o);
  ASSERT_TRUE(p);
  auto& [a, b] = *p;
  std::atomic<bool> stop{false};
  std::thread sender([&] {
    std::vector<Buffer> bufs(4);
    std::uint64_t seq = 0;
    while (!stop.load()) {
      auto n = a.buffers(64, bufs, test::secs(1));
      if (!n) continue;
      for (std::size_t i = 0; i < *n; ++i) test::fill(bufs[i].data(), ++seq);
      auto sent = a.send_batch({bufs.data(), *n});
      if (!sent) break;
    }
  });
  std::vector<Message> span(4);
  auto first = b.receive_batch(span, test::secs(5));
  ASSERT_TRUE(first);
  Buffer kept = std::move(span[0].buffer);
  ASSERT_TRUE(kept.valid());
  std::vector<std::byte> copy(kept.data().begin(), kept.data().end());
  for (int i = 0; i < 20000; ++i) {
    auto got = b.receive_batch(span, test::secs(5));
    ASSERT_TRUE(got);
    ASSERT_TRUE(std::equal(copy.begin(), copy.end(), kept.data().begin()))
        << "the kept buffer's slot was given back and reused, batch " << i;
  }
  stop = true;
  for (Message& m : span) m = Message{};
  kept.reset();
  sender.join();
}

}  // namespace
}  // namespace mbmq
