// tools/mbmq/mech_async.cc: `mbmq bench --async N`: N calls in flight at once (issue #13: "64
// concurrent async_calls on one channel finish in <= 1.5x the time of 64 channels with one call
// each"). One measured "round trip" is a whole batch: the client starts N calls and the batch ends
// when the last reply is verified.
//   async-1ch      N async_calls on ONE channel (mbmq/asio.h: an AsyncChannel on an AsyncQueue,
//                  the client's io_context in this thread); replies routed by buffer
//   async-Nch      N channels, one async_call each, all redirected to one AsyncQueue
//   blocking-Nch   N channels, one blocking Channel::call() each, from N threads released at
//                  once (the way to have N calls in flight without async)
// The server is the same for all three: a separate process (fork, as every cell) holding the
// other ends on one MsgQueue, answering each request in turn with the 8-byte sum of its payload.
// Call i of batch b carries the payload of iteration b*N+i, so a reply routed to the wrong call
// fails verification.
#include <asio/io_context.hpp>
#include <atomic>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "bench.h"
#include "mbmq/asio.h"
#include "mbmq/mbmq.h"
#include "os/process.h"

namespace mbmq::tool {
namespace {

enum class Shape : std::uint8_t { AsyncOneChannel, AsyncChannels, BlockingChannels };

constexpr auto kCallDeadline = std::chrono::seconds(10);

bool verify(const Buffer& b, std::size_t size, std::uint64_t tag) {
  std::uint64_t sum = 0;
  if (b.size() != 8) return false;
  std::memcpy(&sum, b.data().data(), 8);
  return sum == expected_sum(size, tag);
}

// The server: every channel adopted into one queue (key = index); each request answered with the
// sum of its payload; a request of size 0 is the stop. One tick per batch of n requests.
int serve_all(std::vector<Channel>& ends, std::size_t n, ServerCounter& count) {
  auto q = MsgQueue::create();
  if (!q) return 1;
  for (std::size_t i = 0; i < ends.size(); ++i)
    if (!q->adopt(std::move(ends[i]), i)) return 1;
  std::uint64_t requests = 0;
  auto msg = q->wait(Deadline::never());
  for (;;) {
    if (!msg) return 2;
    if (msg->kind != Kind::Request) return msg->kind == Kind::PeerClosed ? 0 : 3;
    Buffer& b = msg->buffer;
    const std::size_t len = b.size();
    if (len == 0) {
      count.stop();
      (void)MsgQueue::reply(std::move(*msg));
      return 0;
    }
    std::uint64_t sum = read_payload(b.data().data(), len);
    std::memcpy(b.data().data(), &sum, 8);
    if (!b.resize(8)) return 4;
    if (++requests % n == 0) count.tick();
    msg = q->reply_and_wait(std::move(*msg), Deadline::never());
  }
}

Mechanism async_mechanism(Shape shape, std::size_t n) {
  struct State {
    std::vector<Channel> client, server;
    std::size_t size = 0;
    // async-*: created after the fork, in the client
    std::unique_ptr<asio::io_context> io;
    AsyncQueue queue;
    std::vector<AsyncChannel> chans;
    std::vector<Buffer> bufs;  // one per call of a batch; never moved while a call is in flight
    // blocking-Nch: one thread per channel, released by `gen`, counted back by `left`
    std::vector<std::thread> threads;
    std::atomic<std::uint64_t> gen{0};
    std::atomic<std::size_t> left{0};
    std::atomic<bool> quit{false}, failed{false};
    std::uint64_t iter = 0;
  };
  auto st = std::make_shared<State>();
  Mechanism m;
  const std::string count = std::to_string(n);
  m.name = shape == Shape::AsyncOneChannel ? "async-1ch"
           : shape == Shape::AsyncChannels ? "async-" + count + "ch"
                                           : "blocking-" + count + "ch";
  m.copies_by_design = "0: each payload is written once, in a buffer the server reads in place";
  // The client's system calls are made by asio (epoll) or by N threads: the os/ layer's per-thread
  // counters would miss them. CPU time per batch (both processes) is reported instead.
  m.os_counted = false;
  m.max_size = 64 * 1024;  // pool slots: N of them on one channel
  m.setup = [st, shape, n](std::size_t size) -> Status {
    ChannelOptions opt;
    opt.slots_per_side = 64;
    const std::size_t channels = shape == Shape::AsyncOneChannel ? 1 : n;
    for (std::size_t i = 0; i < channels; ++i) {
      auto p = Channel::pair(opt);
      if (!p) {
        st->client.clear();
        st->server.clear();
        return fail(p.error());
      }
      st->client.push_back(std::move(p->first));
      st->server.push_back(std::move(p->second));
    }
    st->size = size;
    return {};
  };
  m.serve = [st, n](std::size_t, ServerCounter& c) -> int {
    st->client.clear();
    return serve_all(st->server, n, c);
  };
  m.after_fork_parent = [st, shape, n]() -> Status {
    st->server.clear();
    if (shape == Shape::BlockingChannels) {
      for (std::size_t i = 0; i < n; ++i)
        st->bufs.push_back(MBMQ_TRY(st->client[i].buffer(st->size)));
      return {};  // the threads start with the first batch, pinned as this thread is then
    }
    st->io = std::make_unique<asio::io_context>(1);
    st->queue = MBMQ_TRY(AsyncQueue::create(st->io->get_executor()));
    for (std::size_t i = 0; i < st->client.size(); ++i)
      st->chans.push_back(MBMQ_TRY(AsyncChannel::create(st->queue, std::move(st->client[i]), i)));
    for (std::size_t i = 0; i < n; ++i)
      st->bufs.push_back(
          MBMQ_TRY(st->chans[shape == Shape::AsyncOneChannel ? 0 : i].buffer(st->size)));
    return {};
  };
  m.client_rtt = [st, shape, n](std::uint64_t iter) -> bool {
    const std::size_t size = st->size;
    if (shape == Shape::BlockingChannels) {
      if (st->threads.empty()) {
        for (std::size_t i = 0; i < n; ++i)
          st->threads.emplace_back([st, i, n, size] {
            std::uint64_t seen = 0;
            for (;;) {
              st->gen.wait(seen, std::memory_order_acquire);
              seen = st->gen.load(std::memory_order_acquire);
              if (st->quit.load()) return;
              Buffer& b = st->bufs[i];
              const std::uint64_t tag = st->iter * n + i;
              if (!b.resize(size)) st->failed = true;
              write_payload(b.data().data(), size, tag);
              if (!st->client[i].call(b, Deadline::after(kCallDeadline)) || !verify(b, size, tag))
                st->failed = true;
              if (st->left.fetch_sub(1, std::memory_order_acq_rel) == 1) st->left.notify_one();
            }
          });
      }
      st->iter = iter;
      st->left.store(n, std::memory_order_relaxed);
      st->gen.fetch_add(1, std::memory_order_release);  // pairs with the threads' acquire loads
      st->gen.notify_all();
      for (std::size_t l; (l = st->left.load(std::memory_order_acquire)) != 0;) st->left.wait(l);
      return !st->failed.load();
    }
    std::size_t left = n;
    bool ok = true;
    for (std::size_t i = 0; i < n; ++i) {
      Buffer& b = st->bufs[i];
      const std::uint64_t tag = iter * n + i;
      if (!b.resize(size)) return false;
      write_payload(b.data().data(), size, tag);
      AsyncChannel& ch = st->chans[shape == Shape::AsyncOneChannel ? 0 : i];
      ch.async_call(b, Deadline::after(kCallDeadline), [&ok, &left, &b, size, tag](Status s) {
        if (!s || !verify(b, size, tag)) ok = false;
        --left;
      });
    }
    while (left != 0) st->io->run_one();
    return ok;
  };
  m.stop = [st, shape] {
    if (shape == Shape::BlockingChannels) {
      st->quit = true;
      st->gen.fetch_add(1);
      st->gen.notify_all();
      for (auto& t : st->threads) t.join();
      st->threads.clear();
      if (st->bufs[0].resize(0))
        (void)st->client[0].call(st->bufs[0], Deadline::after(std::chrono::seconds(5)));
      return;
    }
    if (st->chans.empty() || !st->bufs[0].valid() || !st->bufs[0].resize(0)) return;
    bool done = false;
    st->chans[0].async_call(st->bufs[0], Deadline::after(std::chrono::seconds(5)),
                            [&done](Status) { done = true; });
    while (!done) st->io->run_one();
  };
  m.teardown = [st] {
    st->bufs.clear();
    st->chans.clear();
    st->queue = {};
    st->io.reset();
    st->client.clear();
    st->server.clear();
  };
  return m;
}

}  // namespace

std::vector<Mechanism> async_mechanisms(std::size_t n) {
  return {async_mechanism(Shape::AsyncOneChannel, n), async_mechanism(Shape::AsyncChannels, n),
          async_mechanism(Shape::BlockingChannels, n)};
}

}  // namespace mbmq::tool
