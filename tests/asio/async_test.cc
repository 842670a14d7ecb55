// mbmq/asio.h: AsyncQueue::async_wait and AsyncChannel::async_call on an io_context, against
// blocking servers and clients on threads of their own (the channel ends are one pair per test).
#include <gtest/gtest.h>

#include <algorithm>
#include <asio/bind_cancellation_slot.hpp>
#include <asio/cancellation_signal.hpp>
#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/experimental/awaitable_operators.hpp>
#include <asio/io_context.hpp>
#include <asio/use_awaitable.hpp>
#include <atomic>
#include <chrono>
#include <cstring>
#include <optional>
#include <random>
#include <thread>
#include <vector>

#include "mbmq/asio.h"
#include "mbmq/mbmq.h"
#include "os/process.h"
#include "test_util.h"

namespace mbmq {
namespace {

using namespace std::chrono_literals;

// The answer a server writes at offset 8 for the request x at offset 0.
std::uint64_t answer(std::uint64_t x) { return x * 0x9E3779B97F4A7C15ull + 7; }

void put(Buffer& b, std::size_t off, std::uint64_t v) { std::memcpy(b.data().data() + off, &v, 8); }
std::uint64_t get(const Buffer& b, std::size_t off) {
  std::uint64_t v;
  std::memcpy(&v, b.data().data() + off, 8);
  return v;
}

// A blocking server on its own thread for one channel end: every request [x] is answered with
// answer(x) at offset 8. It holds requests until `batch` are there (or none came for 20 ms), waits
// `delay`, then answers them last first: replies come back in another order than the requests.
// close_at_batch: instead of answering a full batch, it closes the channel with the requests held.
struct ServerOptions {
  std::size_t batch = 1;
  std::chrono::milliseconds delay{0};
  bool close_at_batch = false;
};

class Server {
 public:
  Server(Channel&& end, ServerOptions o) : opt_(o) {
    auto q = MsgQueue::create();
    EXPECT_TRUE(q);
    queue_ = std::move(*q);
    EXPECT_TRUE(queue_.adopt(std::move(end), 1));
    thread_ = std::thread([this] { run(); });
  }
  ~Server() {
    stop_ = true;
    thread_.join();
  }
  std::size_t served() const { return served_.load(); }

 private:
  void flush(std::vector<Message>& held) {
    if (opt_.delay.count() > 0) std::this_thread::sleep_for(opt_.delay);
    for (auto it = held.rbegin(); it != held.rend(); ++it) {
      put(it->buffer, 8, answer(get(it->buffer, 0)));
      ++served_;  // before the reply: the caller may see it before reply() returns here
      // A caller that went away first (its queue closed: ClosingTheQueue...) makes the reply fail
      // with PeerClosed; that is not this server's error, anything else is.
      Status s = MsgQueue::reply(std::move(*it));
      if (!s) {
        EXPECT_EQ(s.error().code, Errc::PeerClosed) << s.error().message();
      }
    }
    held.clear();
  }
  void run() {
    std::vector<Message> held;
    std::int64_t last = monotonic_ns();
    while (!stop_) {
      auto m = queue_.wait(Deadline::after(5ms));
      if (!m) {
        if (!held.empty() && monotonic_ns() - last > 20'000'000) flush(held);
        continue;
      }
      if (m->kind != Kind::Request) continue;
      last = monotonic_ns();
      held.push_back(std::move(*m));
      if (held.size() < opt_.batch) continue;
      if (opt_.close_at_batch) {
        queue_ = MsgQueue{};  // closes the channel; the requests held go nowhere
        held.clear();
        return;
      }
      flush(held);
    }
  }

  ServerOptions opt_;
  MsgQueue queue_;
  std::atomic<bool> stop_{false};
  std::atomic<std::size_t> served_{0};
  std::thread thread_;
};

ChannelOptions wide(Trust client = Trust::Cooperative) {
  ChannelOptions o;
  o.slots_per_side = 64;
  o.trust = {client, Trust::Cooperative};
  return o;
}

// Runs io until `done` or 10 s pass (a hang fails the test instead of the ctest timeout).
template <class Pred>
void run_until(asio::io_context& io, Pred done) {
  const std::int64_t end = monotonic_ns() + 10'000'000'000;
  // A loop that ran out of work (no operation pending, as asio's own objects) has stopped.
  if (io.stopped()) io.restart();
  while (!done() && monotonic_ns() < end) io.run_one_for(10ms);
  ASSERT_TRUE(done()) << "the io_context did not get there in 10 s";
}

// ---- AsyncQueue --------------------------------------------------------------------------------

TEST(AsyncQueue, AsyncWaitDeliversARequestToACoroutine) {
  asio::io_context io;
  auto q = AsyncQueue::create(io.get_executor());
  ASSERT_TRUE(q) << q.error().message();
  auto [client, server] = *Channel::pair();
  ASSERT_TRUE(server.redirect(q->queue(), 7));
  std::optional<Status> call_result;
  Buffer cbuf = *client.buffer(16);
  put(cbuf, 0, 41);
  std::thread caller([&] { call_result = client.call(cbuf, Deadline::after(5s)); });
  bool served = false;
  asio::co_spawn(
      io,
      [&]() -> asio::awaitable<void> {
        Result<Message> m = co_await q->async_wait(Deadline::after(5s), asio::use_awaitable);
        EXPECT_TRUE(m) << m.error().message();
        if (!m) co_return;
        EXPECT_EQ(m->key, 7u);
        EXPECT_EQ(m->kind, Kind::Request);
        put(m->buffer, 8, answer(get(m->buffer, 0)));
        EXPECT_TRUE(q->reply(std::move(*m)));
        served = true;
      },
      asio::detached);
  run_until(io, [&] { return served; });
  caller.join();
  ASSERT_TRUE(call_result && *call_result);
  EXPECT_EQ(get(cbuf, 8), answer(41));
}

TEST(AsyncQueue, AsyncWaitEndsWithTimedOutAtItsDeadline) {
  asio::io_context io;
  auto q = AsyncQueue::create(io.get_executor());
  ASSERT_TRUE(q);
  auto [client, server] = *Channel::pair();
  ASSERT_TRUE(server.redirect(q->queue(), 1));
  std::optional<Result<Message>> got;
  const std::int64_t t0 = monotonic_ns();
  q->async_wait(Deadline::after(30ms), [&](Result<Message> r) { got = std::move(r); });
  run_until(io, [&] { return got.has_value(); });
  const std::int64_t took = monotonic_ns() - t0;
  ASSERT_FALSE(*got);
  EXPECT_EQ(got->error().code, Errc::TimedOut);
  EXPECT_FALSE(cancelled(got->error()));
  EXPECT_GE(took, 30'000'000);
  EXPECT_LT(took, 1'000'000'000);
}

TEST(AsyncQueue, AnExpiredDeadlineStillTakesAMessageAlreadyThere) {
  asio::io_context io;
  auto q = AsyncQueue::create(io.get_executor());
  ASSERT_TRUE(q);
  auto [client, server] = *Channel::pair();
  ASSERT_TRUE(server.redirect(q->queue(), 1));
  Buffer b = *client.buffer(8);
  ASSERT_TRUE(client.send(std::move(b)));
  std::optional<Result<Message>> got;
  q->async_wait(Deadline::immediate(), [&](Result<Message> r) { got = std::move(r); });
  run_until(io, [&] { return got.has_value(); });
  ASSERT_TRUE(*got) << got->error().message();
  EXPECT_EQ((*got)->kind, Kind::Message);
}

TEST(AsyncQueue, WaitsAreServedInOrderAndTakeOneMessageEach) {
  asio::io_context io;
  auto q = AsyncQueue::create(io.get_executor());
  ASSERT_TRUE(q);
  auto [client, server] = *Channel::pair();
  ASSERT_TRUE(server.redirect(q->queue(), 1));
  std::vector<int> order;
  std::vector<std::uint64_t> seen;
  for (int i = 0; i < 3; ++i)
    q->async_wait(Deadline::after(5s), [&, i](Result<Message> r) {
      ASSERT_TRUE(r) << r.error().message();
      order.push_back(i);
      seen.push_back(get(r->buffer, 0));
    });
  for (std::uint64_t v = 100; v < 103; ++v) {
    Buffer b = *client.buffer(8);
    put(b, 0, v);
    ASSERT_TRUE(client.send(std::move(b)));
  }
  run_until(io, [&] { return order.size() == 3; });
  EXPECT_EQ(order, (std::vector<int>{0, 1, 2}));
  EXPECT_EQ(seen, (std::vector<std::uint64_t>{100, 101, 102}));
}

// The fd is watched, not polled: a pending wait on an idle queue lets the loop sleep in epoll
// (poll() returns at once, and 200 ms of run_for cost next to no CPU), and a message then wakes it.
TEST(AsyncQueue, AnIdleWaitSleepsInEpollAndAMessageWakesIt) {
  asio::io_context io;
  auto q = AsyncQueue::create(io.get_executor());
  ASSERT_TRUE(q);
  auto [client, server] = *Channel::pair();
  ASSERT_TRUE(server.redirect(q->queue(), 1));
  std::optional<Result<Message>> got;
  q->async_wait([&](Result<Message> r) { got = std::move(r); });
  const std::int64_t p0 = monotonic_ns();
  io.poll();
  // 1 s under a sanitizer (TSan, a loaded CI machine): a spinning poll() would not return
  EXPECT_LT(monotonic_ns() - p0, test::sized(50'000'000, 1'000'000'000))
      << "poll() did not return: something spins";
  const std::int64_t cpu0 = os::process_cpu_ns();
  io.run_for(200ms);
  const std::int64_t cpu = os::process_cpu_ns() - cpu0;
  // 100 ms under a sanitizer (its own threads, a loaded CI machine): half of what a spin takes
  EXPECT_LT(cpu, test::sized(20'000'000, 100'000'000))
      << "an idle wait used " << cpu / 1000 << " us of CPU in 200 ms";
  EXPECT_FALSE(got);
  std::thread sender([&] {
    Buffer b = *client.buffer(8);
    put(b, 0, 77);
    EXPECT_TRUE(client.send(std::move(b)));
  });
  run_until(io, [&] { return got.has_value(); });
  sender.join();
  ASSERT_TRUE(*got) << got->error().message();
  EXPECT_EQ(get((*got)->buffer, 0), 77u);
}

// Messages the queue still holds when no wait is pending raise no new signal on the fd (it was
// not re-armed): a wait that comes later must look by itself, and gets them.
TEST(AsyncQueue, AWaitThatComesLaterGetsMessagesLeftInTheQueue) {
  asio::io_context io;
  auto q = AsyncQueue::create(io.get_executor());
  ASSERT_TRUE(q);
  auto [client, server] = *Channel::pair();
  ASSERT_TRUE(server.redirect(q->queue(), 1));
  std::optional<Result<Message>> first;
  q->async_wait([&](Result<Message> r) { first = std::move(r); });
  io.run_for(20ms);  // the loop sleeps in epoll on the armed fd
  for (std::uint64_t v = 1; v <= 3; ++v) {
    Buffer b = *client.buffer(8);
    put(b, 0, v);
    ASSERT_TRUE(client.send(std::move(b)));
  }
  run_until(io, [&] { return first.has_value(); });
  ASSERT_TRUE(*first);
  EXPECT_EQ(get((*first)->buffer, 0), 1u);
  io.run_for(20ms);  // nobody waits: 2 and 3 stay in the queue (and the loop runs out of work)
  for (std::uint64_t v = 2; v <= 3; ++v) {
    std::optional<Result<Message>> later;
    q->async_wait(Deadline::after(2s), [&](Result<Message> r) { later = std::move(r); });
    run_until(io, [&] { return later.has_value(); });
    ASSERT_TRUE(*later) << later->error().message();
    EXPECT_EQ(get((*later)->buffer, 0), v);
  }
}

// Waits cancelled at random (before and while messages arrive) never take a message: each of the
// client's calls is answered exactly once (a message taken and dropped would answer NoReply).
TEST(AsyncQueue, CancelledWaitsLoseNoMessage) {
  asio::io_context io;
  auto q = AsyncQueue::create(io.get_executor());
  ASSERT_TRUE(q);
  auto [client, server] = *Channel::pair();
  ASSERT_TRUE(server.redirect(q->queue(), 1));
  constexpr std::uint64_t kCalls = 300;
  std::atomic<bool> client_done{false};
  std::atomic<std::uint64_t> client_ok{0};
  std::thread caller([&] {
    Buffer b = *client.buffer(16);
    for (std::uint64_t i = 0; i < kCalls; ++i) {
      put(b, 0, i);
      Status s = client.call(b, Deadline::after(5s));
      if (!s) {
        ADD_FAILURE() << "call " << i << ": " << s.error().message();
        break;
      }
      if (get(b, 8) == answer(i)) ++client_ok;
    }
    client_done = true;
  });
  std::mt19937 rng(13);
  std::uint64_t answered = 0, cancels = 0;
  std::uint64_t next = 0;
  while (!client_done) {
    asio::cancellation_signal sig;
    std::optional<Result<Message>> got;
    q->async_wait(
        Deadline::after(5s),
        asio::bind_cancellation_slot(sig.slot(), [&](Result<Message> r) { got = std::move(r); }));
    switch (rng() % 3) {
      case 0:  // at once, before the wait ever looked
        sig.emit(asio::cancellation_type::terminal);
        break;
      case 1:  // after a turn or two of the loop, when a message may be on its way
        io.run_one_for(std::chrono::microseconds(rng() % 200));
        if (!got) sig.emit(asio::cancellation_type::terminal);
        break;
      default:
        break;
    }
    run_until(io, [&] { return got.has_value() || client_done; });
    if (!got) {  // the client finished while we waited: end this wait
      sig.emit(asio::cancellation_type::terminal);
      run_until(io, [&] { return got.has_value(); });
    }
    if (!*got) {
      EXPECT_TRUE(cancelled(got->error())) << got->error().message();
      ++cancels;
      continue;
    }
    Message& m = **got;
    ASSERT_EQ(m.kind, Kind::Request);
    EXPECT_EQ(get(m.buffer, 0), next++);
    put(m.buffer, 8, answer(get(m.buffer, 0)));
    ASSERT_TRUE(q->reply(std::move(m)));
    ++answered;
  }
  caller.join();
  EXPECT_EQ(client_ok.load(), kCalls);
  EXPECT_EQ(answered, kCalls);
  EXPECT_GT(cancels, kCalls / 4);
}

// asio's awaitable operators cancel the loser: a wait raced against a short timer, over and over,
// while requests arrive. Every request is answered once.
TEST(AsyncQueue, AWaitLosingARaceToATimerLosesNoMessage) {
  using namespace asio::experimental::awaitable_operators;
  asio::io_context io;
  auto q = AsyncQueue::create(io.get_executor());
  ASSERT_TRUE(q);
  auto [client, server] = *Channel::pair();
  ASSERT_TRUE(server.redirect(q->queue(), 1));
  constexpr std::uint64_t kCalls = 200;
  std::atomic<bool> client_done{false};
  std::atomic<std::uint64_t> client_ok{0};
  std::thread caller([&] {
    Buffer b = *client.buffer(16);
    for (std::uint64_t i = 0; i < kCalls; ++i) {
      put(b, 0, i);
      if (!client.call(b, Deadline::after(5s))) break;
      if (get(b, 8) == answer(i)) ++client_ok;
      std::this_thread::sleep_for(std::chrono::microseconds(i % 7 * 30));
    }
    client_done = true;
  });
  std::uint64_t answered = 0, timer_won = 0;
  bool finished = false;
  asio::co_spawn(
      io,
      [&]() -> asio::awaitable<void> {
        asio::steady_timer t(io);
        while (!client_done) {
          t.expires_after(std::chrono::microseconds(50));
          auto r =
              co_await (q->async_wait(asio::use_awaitable) || t.async_wait(asio::use_awaitable));
          if (r.index() == 1) {
            ++timer_won;
            continue;
          }
          Result<Message>& m = std::get<0>(r);
          if (!m) continue;  // cancelled: the timer won, both completed
          put(m->buffer, 8, answer(get(m->buffer, 0)));
          EXPECT_TRUE(q->reply(std::move(*m)));
          ++answered;
        }
        finished = true;
      },
      asio::detached);
  run_until(io, [&] { return finished; });
  caller.join();
  EXPECT_EQ(client_ok.load(), kCalls);
  EXPECT_EQ(answered, kCalls);
  EXPECT_GT(timer_won, 0u);
}

TEST(AsyncQueue, CloseEndsPendingWaitsWithInvalidArgument) {
  asio::io_context io;
  auto q = AsyncQueue::create(io.get_executor());
  ASSERT_TRUE(q);
  std::optional<Result<Message>> got;
  q->async_wait([&](Result<Message> r) { got = std::move(r); });
  io.run_for(5ms);
  EXPECT_FALSE(got);
  q->close();
  run_until(io, [&] { return got.has_value(); });
  ASSERT_FALSE(*got);
  EXPECT_EQ(got->error().code, Errc::InvalidArgument);
  // A wait started on the closed queue completes on the queue's executor (this thread, running
  // io), not on asio's system executor (a thread of its own: a data race on `after`, TSan's find).
  std::optional<Result<Message>> after;
  std::thread::id ran_on;
  EXPECT_TRUE(q->get_executor() == io.get_executor());
  q->async_wait([&](Result<Message> r) {
    ran_on = std::this_thread::get_id();
    after = std::move(r);
  });
  run_until(io, [&] { return after.has_value(); });
  ASSERT_FALSE(*after);
  EXPECT_EQ(after->error().code, Errc::InvalidArgument);
  EXPECT_EQ(ran_on, std::this_thread::get_id());
}

// ---- AsyncChannel ------------------------------------------------------------------------------

class AsyncCall : public ::testing::TestWithParam<Trust> {};

// 64 calls in flight on one channel; the server holds all 64 and answers them last first. Every
// reply lands in its own call's buffer. With an untrusted client end the reply is read in a private
// copy (data() differs from the request's): routing by Buffer::id() still matches.
TEST_P(AsyncCall, SixtyFourCallsInFlightOnOneChannelEachGetTheirOwnReply) {
  constexpr std::size_t kCalls = 64;
  asio::io_context io;
  auto q = AsyncQueue::create(io.get_executor());
  ASSERT_TRUE(q);
  auto [client, server_end] = *Channel::pair(wide(GetParam()));
  Server server(std::move(server_end), {.batch = kCalls});
  auto ch = AsyncChannel::create(*q, std::move(client), 5);
  ASSERT_TRUE(ch) << ch.error().message();
  std::vector<Buffer> bufs;
  std::vector<const std::byte*> sent_at;
  for (std::size_t i = 0; i < kCalls; ++i) {
    bufs.push_back(*ch->buffer(16));
    put(bufs[i], 0, 1000 + i);
    sent_at.push_back(bufs[i].data().data());
  }
  std::size_t done = 0;
  std::vector<std::optional<Status>> results(kCalls);
  for (std::size_t i = 0; i < kCalls; ++i)
    asio::co_spawn(
        io,
        [&, i]() -> asio::awaitable<void> {
          results[i] = co_await ch->async_call(bufs[i], Deadline::after(5s), asio::use_awaitable);
          ++done;
        },
        asio::detached);
  run_until(io, [&] { return done == kCalls; });
  EXPECT_EQ(ch->in_flight(), 0u);
  std::size_t moved = 0;
  for (std::size_t i = 0; i < kCalls; ++i) {
    ASSERT_TRUE(results[i] && *results[i]) << i << ": " << results[i]->error().message();
    ASSERT_TRUE(bufs[i].valid());
    EXPECT_EQ(get(bufs[i], 0), 1000 + i);
    EXPECT_EQ(get(bufs[i], 8), answer(1000 + i)) << "call " << i << " got another call's reply";
    if (bufs[i].data().data() != sent_at[i]) ++moved;
  }
  EXPECT_EQ(server.served(), kCalls);
  // The untrusted end reads each reply in a private copy: data() could not have routed them.
  if (GetParam() == Trust::Untrusted) {
    EXPECT_EQ(moved, kCalls);
  }
}

INSTANTIATE_TEST_SUITE_P(Trust, AsyncCall, ::testing::Values(Trust::Cooperative, Trust::Untrusted),
                         [](const ::testing::TestParamInfo<Trust>& p) {
                           return p.param == Trust::Cooperative ? "Cooperative" : "Untrusted";
                         });

TEST(AsyncChannel, PeerClosedFailsEveryCallInFlight) {
  constexpr std::size_t kCalls = 64;
  asio::io_context io;
  auto q = AsyncQueue::create(io.get_executor());
  ASSERT_TRUE(q);
  auto [client, server_end] = *Channel::pair(wide());
  Server server(std::move(server_end), {.batch = kCalls, .close_at_batch = true});
  auto ch = AsyncChannel::create(*q, std::move(client), 5);
  ASSERT_TRUE(ch);
  std::vector<Buffer> bufs;
  // Each buffer stays where it is while its call is in flight: a push_back that moved them
  // left the calls writing their results into freed memory (ASan, CI 2026-12-02).
  bufs.reserve(kCalls);
  std::vector<std::optional<Status>> results(kCalls);
  std::size_t done = 0;
  for (std::size_t i = 0; i < kCalls; ++i) {
    bufs.push_back(*ch->buffer(16));
    ch->async_call(bufs[i], Deadline::after(5s), [&, i](Status s) {
      results[i] = std::move(s);
      ++done;
    });
  }
  run_until(io, [&] { return done == kCalls; });
  for (std::size_t i = 0; i < kCalls; ++i) {
    ASSERT_FALSE(*results[i]) << i;
    EXPECT_EQ(results[i]->error().code, Errc::PeerClosed) << results[i]->error().message();
  }
  EXPECT_FALSE(ch->valid());
  // A call on the ended channel fails at once, the same way.
  Buffer b;
  auto fresh = ch->buffer(16);
  if (fresh) b = std::move(*fresh);
  std::optional<Status> later;
  ch->async_call(b, Deadline::after(5s), [&](Status s) { later = std::move(s); });
  run_until(io, [&] { return later.has_value(); });
  ASSERT_FALSE(*later);
  EXPECT_TRUE(later->error().code == Errc::PeerClosed ||
              later->error().code == Errc::InvalidArgument)
      << later->error().message();
}

// 64 calls time out at 40 ms (the server answers after 800 ms); their buffers come back with the
// late replies: 64 more calls then get buffers and answers (with 64 slots per side, they could not
// if the first 64 were lost).
TEST(AsyncChannel, CallsEndAtTheirDeadlineAndTheirBuffersComeBack) {
  constexpr std::size_t kCalls = 64;
  asio::io_context io;
  auto q = AsyncQueue::create(io.get_executor());
  ASSERT_TRUE(q);
  auto [client, server_end] = *Channel::pair(wide());
  Server server(std::move(server_end), {.batch = kCalls, .delay = 800ms});
  auto ch = AsyncChannel::create(*q, std::move(client), 5);
  ASSERT_TRUE(ch);
  std::vector<Buffer> bufs;
  bufs.reserve(kCalls);  // each buffer stays where it is while its call is in flight
  std::vector<std::optional<Status>> results(kCalls);
  std::size_t done = 0;
  const std::int64_t t0 = monotonic_ns();
  for (std::size_t i = 0; i < kCalls; ++i) {
    auto b = ch->buffer(16);
    ASSERT_TRUE(b) << b.error().message();
    bufs.push_back(std::move(*b));
    put(bufs[i], 0, i);
    ch->async_call(bufs[i], Deadline::after(40ms), [&, i](Status s) {
      results[i] = std::move(s);
      ++done;
    });
  }
  run_until(io, [&] { return done == kCalls; });
  const std::int64_t took = monotonic_ns() - t0;
  EXPECT_GE(took, 40'000'000);
  EXPECT_LT(took, 600'000'000);  // not at the late replies
  for (std::size_t i = 0; i < kCalls; ++i) {
    ASSERT_FALSE(*results[i]);
    EXPECT_EQ(results[i]->error().code, Errc::TimedOut);
    EXPECT_FALSE(cancelled(results[i]->error()));
    EXPECT_FALSE(bufs[i].valid()) << "a call given up leaves its buffer invalid";
  }
  EXPECT_EQ(ch->abandoned(), kCalls);
  run_until(io, [&] { return ch->abandoned() == 0; });  // the late replies, released
  // The pool is whole again: 64 more calls, answered.
  std::size_t ok = 0;
  done = 0;
  for (std::size_t i = 0; i < kCalls; ++i) {
    auto b = ch->buffer(16);
    ASSERT_TRUE(b) << "buffer " << i << ": " << b.error().message();
    bufs[i] = std::move(*b);
    put(bufs[i], 0, 500 + i);
    ch->async_call(bufs[i], Deadline::after(5s), [&, i](Status s) {
      ++done;
      if (s && get(bufs[i], 8) == answer(500 + i)) ++ok;
    });
  }
  run_until(io, [&] { return done == kCalls; });
  EXPECT_EQ(ok, kCalls);
}

TEST(AsyncChannel, ACancelledCallEndsAtOnceAndItsLateReplyIsReleased) {
  asio::io_context io;
  auto q = AsyncQueue::create(io.get_executor());
  ASSERT_TRUE(q);
  auto [client, server_end] = *Channel::pair();
  Server server(std::move(server_end), {.batch = 1, .delay = 800ms});
  auto ch = AsyncChannel::create(*q, std::move(client), 5);
  ASSERT_TRUE(ch);
  Buffer b = *ch->buffer(16);
  asio::cancellation_signal sig;
  std::optional<Status> got;
  ch->async_call(b, Deadline::never(),
                 asio::bind_cancellation_slot(sig.slot(), [&](Status s) { got = std::move(s); }));
  io.run_for(5ms);
  EXPECT_EQ(ch->in_flight(), 1u);
  const std::int64_t t0 = monotonic_ns();
  sig.emit(asio::cancellation_type::terminal);
  run_until(io, [&] { return got.has_value(); });
  EXPECT_LT(monotonic_ns() - t0, 500'000'000);  // not at the late reply
  ASSERT_FALSE(*got);
  EXPECT_TRUE(cancelled(got->error())) << got->error().message();
  EXPECT_FALSE(b.valid());
  EXPECT_EQ(ch->abandoned(), 1u);
  run_until(io, [&] { return ch->abandoned() == 0; });
  EXPECT_EQ(server.served(), 1u);
}

// Back-pressure: past max_in_flight the call completes with Busy at once, nothing sent, the buffer
// still the caller's; it goes through once a call has completed.
TEST(AsyncChannel, PastMaxInFlightACallEndsWithBusyAndKeepsItsBuffer) {
  asio::io_context io;
  auto q = AsyncQueue::create(io.get_executor());
  ASSERT_TRUE(q);
  ChannelOptions o;
  o.max_in_flight = 4;
  auto [client, server_end] = *Channel::pair(o);
  Server server(std::move(server_end), {.batch = 4, .delay = 50ms});
  auto ch = AsyncChannel::create(*q, std::move(client), 5);
  ASSERT_TRUE(ch);
  std::vector<Buffer> bufs;
  bufs.reserve(4);  // each buffer stays where it is while its call is in flight
  std::size_t done = 0;
  for (int i = 0; i < 4; ++i) {
    bufs.push_back(*ch->buffer(16));
    ch->async_call(bufs.back(), Deadline::after(5s), [&](Status s) {
      EXPECT_TRUE(s) << s.error().message();
      ++done;
    });
  }
  Buffer extra = *ch->buffer(16);
  put(extra, 0, 9);
  std::optional<Status> got;
  ch->async_call(extra, Deadline::after(5s), [&](Status s) { got = std::move(s); });
  run_until(io, [&] { return got.has_value(); });
  ASSERT_FALSE(*got);
  EXPECT_EQ(got->error().code, Errc::Busy) << got->error().message();
  EXPECT_TRUE(extra.valid());
  EXPECT_EQ(get(extra, 0), 9u);
  run_until(io, [&] { return done == 4; });
  got.reset();
  ch->async_call(extra, Deadline::after(5s), [&](Status s) { got = std::move(s); });
  run_until(io, [&] { return got.has_value(); });
  EXPECT_TRUE(*got) << got->error().message();
  EXPECT_EQ(get(extra, 8), answer(9));
}

TEST(AsyncChannel, ClosingTheQueueEndsCallsWithInvalidArgument) {
  asio::io_context io;
  auto q = AsyncQueue::create(io.get_executor());
  ASSERT_TRUE(q);
  auto [client, server_end] = *Channel::pair();
  Server server(std::move(server_end), {.batch = 2});
  auto ch = AsyncChannel::create(*q, std::move(client), 5);
  ASSERT_TRUE(ch);
  Buffer b = *ch->buffer(16);
  std::optional<Status> got;
  ch->async_call(b, Deadline::never(), [&](Status s) { got = std::move(s); });
  io.run_for(5ms);
  q->close();
  run_until(io, [&] { return got.has_value(); });
  ASSERT_FALSE(*got);
  EXPECT_EQ(got->error().code, Errc::InvalidArgument);
  // A call started on the closed channel completes on the queue's executor, on this thread.
  ch->close();
  auto spare = *Channel::pair();
  Buffer other = *spare.first.buffer(16);
  std::optional<Status> after;
  std::thread::id ran_on;
  ch->async_call(other, Deadline::never(), [&](Status s) {
    ran_on = std::this_thread::get_id();
    after = std::move(s);
  });
  run_until(io, [&] { return after.has_value(); });
  ASSERT_FALSE(*after);
  EXPECT_EQ(after->error().code, Errc::InvalidArgument);
  EXPECT_EQ(ran_on, std::this_thread::get_id());
}

// One queue serves requests (async_wait) and carries calls (async_call) at once: a reply goes to
// its call, a request to the wait.
TEST(AsyncChannel, OneQueueServesRequestsAndRoutesRepliesAtOnce) {
  asio::io_context io;
  auto q = AsyncQueue::create(io.get_executor());
  ASSERT_TRUE(q);
  auto [out_client, out_server] = *Channel::pair();
  Server server(std::move(out_server), {.batch = 1, .delay = 20ms});
  auto ch = AsyncChannel::create(*q, std::move(out_client), 5);
  ASSERT_TRUE(ch);
  auto [in_client, in_server] = *Channel::pair();
  ASSERT_TRUE(in_server.redirect(q->queue(), 6));
  std::optional<Status> incoming;
  Buffer ib = *in_client.buffer(16);
  put(ib, 0, 3);
  std::thread caller([&] { incoming = in_client.call(ib, Deadline::after(5s)); });
  Buffer b = *ch->buffer(16);
  put(b, 0, 4);
  std::optional<Status> outgoing;
  bool served = false;
  ch->async_call(b, Deadline::after(5s), [&](Status s) { outgoing = std::move(s); });
  q->async_wait(Deadline::after(5s), [&](Result<Message> m) {
    ASSERT_TRUE(m) << m.error().message();
    EXPECT_EQ(m->key, 6u);
    put(m->buffer, 8, answer(get(m->buffer, 0)));
    EXPECT_TRUE(q->reply(std::move(*m)));
    served = true;
  });
  run_until(io, [&] { return served && outgoing.has_value(); });
  caller.join();
  ASSERT_TRUE(*outgoing);
  EXPECT_EQ(get(b, 8), answer(4));
  ASSERT_TRUE(incoming && *incoming);
  EXPECT_EQ(get(ib, 8), answer(3));
}

}  // namespace
}  // namespace mbmq
