// tools/mbmq/mech_shm.cc: shared-memory mechanisms: the raw baselines and mbmq itself.
//   raw-spin   shared memory, spin on an atomic flag each way (the hardware limit)
//   raw-ring   raw-spin with mbmq's line pattern: a descriptor line, then the payload line it
//              names (the floor of a zero-copy design passing buffer references, no software)
//   raw-futex  shared memory, always FUTEX_WAKE the peer and FUTEX_WAIT for it
//   raw-spin-copy  raw-spin whose server first copies the payload into private memory (faulted
//              in once, reused) and reads the copy: the floor of any receiver that copies what
//              an untrusted peer sent (#16), in the same run
//   mbmq-spin / mbmq-adaptive / mbmq-sleep   a Channel, the server on a MsgQueue, with that
//              WaitPolicy on both sides (0 copies: the payload is written once, in place)
//   mbmq-fd    mbmq-sleep with the server in an event loop: epoll_wait on MsgQueue::fd(), then
//              wait(immediate) / reply_and_wait(immediate) until TimedOut (#13)
#include <atomic>
#include <cstring>
#include <memory>
#include <new>
#include <optional>
#include <vector>

#include "bench.h"
#include "mbmq/mbmq.h"
#include "os/epoll.h"
#include "os/futex.h"
#include "os/mapping.h"
#include "os/memfd.h"

namespace mbmq::tool {
namespace {

// ---- raw shared memory: spin and futex ---------------------------------------------------------
// Each flag in its own 128-byte block: the adjacent-line prefetcher pairs 128-byte-aligned lines,
// and the baselines must be the best the hardware can do.
struct RawCtl {
  alignas(128) std::atomic<std::uint32_t> req;   // client: store-release seq; server: acquire
  alignas(128) std::atomic<std::uint32_t> resp;  // server: store-release seq; client: acquire
  std::uint64_t sum;                             // written by the server before resp
};
static_assert(sizeof(RawCtl) == 256);
constexpr std::size_t kRawPayloadOffset = 4096;
constexpr std::uint32_t kStop = 0xFFFFFFFFu;

// futex: sleep in FUTEX_WAIT (else spin). deadline: the client's wait carries a timeout computed
// per call from a 10 s deadline, as an mbmq client's call() does (an hrtimer armed and cancelled
// per wait, one clock read): the raw cost of the API's deadline, to set beside raw-futex.
Mechanism raw_mechanism(bool futex, bool deadline = false, bool copy = false) {
  struct State {
    os::UniqueFd fd;
    os::Mapping map;
    RawCtl* ctl = nullptr;
    std::byte* payload = nullptr;
  };
  auto st = std::make_shared<State>();
  Mechanism m;
  m.name = copy       ? "raw-spin-copy"
           : !futex   ? "raw-spin"
           : deadline ? "raw-futex-deadline"
                      : "raw-futex";
  m.copies_by_design =
      copy ? "1: the server copies the payload into private memory (memcpy), then reads the copy"
           : "0: the payload is written in place in shared memory";
  m.setup = [st](std::size_t size) -> Status {
    std::size_t total = kRawPayloadOffset + size;
    st->fd = MBMQ_TRY(os::make_sealed_memfd("bench-raw", total));
    st->map = MBMQ_TRY(os::Mapping::map_shared(st->fd.get(), total, os::Access::ReadWrite));
    st->ctl = new (st->map.data()) RawCtl{};
    st->payload = st->map.data() + kRawPayloadOffset;
    return {};
  };
  m.serve = [st, futex, copy](std::size_t size, ServerCounter& count) -> int {
    // raw-spin-copy's private memory: zeroed here, so its pages are faulted in before the first
    // request (an untrusted mbmq end keeps its private copies for reuse too).
    std::vector<std::byte> own(copy ? size : 0);
    std::uint32_t last = 0;
    for (;;) {
      std::uint32_t seq;
      while ((seq = st->ctl->req.load(std::memory_order_acquire)) == last) {
        if (futex)
          (void)os::futex_wait(&st->ctl->req, last, -1);
        else
          __builtin_ia32_pause();
      }
      last = seq;
      if (seq == kStop) return count.stop(), 0;
      if (copy) std::memcpy(own.data(), st->payload, size);
      st->ctl->sum = read_payload(copy ? own.data() : st->payload, size);
      st->ctl->resp.store(seq, std::memory_order_release);
      if (futex) (void)os::futex_wake(&st->ctl->resp, 1);
      count.tick();
    }
  };
  m.client_rtt = [st, futex, deadline](std::uint64_t iter) -> bool {
    std::size_t size = st->map.size() - kRawPayloadOffset;
    const Deadline until = deadline ? Deadline::after(std::chrono::seconds(10)) : Deadline::never();
    write_payload(st->payload, size, iter);
    std::uint32_t seq = static_cast<std::uint32_t>(iter % 0x7FFFFFFF) + 1;
    st->ctl->req.store(seq, std::memory_order_release);
    if (futex) (void)os::futex_wake(&st->ctl->req, 1);
    std::uint32_t got;
    while ((got = st->ctl->resp.load(std::memory_order_acquire)) != seq) {
      if (futex)
        (void)os::futex_wait(&st->ctl->resp, got, until.is_never() ? -1 : until.remaining_ns());
      else
        __builtin_ia32_pause();
    }
    return st->ctl->sum == expected_sum(size, iter);
  };
  m.stop = [st, futex] {
    st->ctl->req.store(kStop, std::memory_order_release);
    if (futex) (void)os::futex_wake(&st->ctl->req, 1);
  };
  m.teardown = [st] {
    st->map.reset();
    st->fd.reset();
  };
  return m;
}

// ---- raw-ring: mbmq's cache-line pattern with no software around it
// Each way, a descriptor line (sequence + buffer index) and then the payload line it names, read
// only after the descriptor (the address depends on it): the floor of any zero-copy design that
// passes buffer references through a ring, measured beside mbmq in the same run.
struct RingCtl {
  struct alignas(128) Entry {
    std::atomic<std::uint32_t> seq;  // writer: store-release after `index`; reader: acquire
    std::uint32_t index;             // which payload buffer (always 0 here, but read and used)
  };
  Entry req;   // client -> server
  Entry resp;  // server -> client
};
static_assert(sizeof(RingCtl) == 256);

Mechanism raw_ring_mechanism() {
  struct State {
    os::UniqueFd fd;
    os::Mapping map;
    RingCtl* ctl = nullptr;
    std::byte* pool = nullptr;
    std::size_t size = 0;
  };
  auto st = std::make_shared<State>();
  Mechanism m;
  m.name = "raw-ring";
  m.copies_by_design = "0: the payload is written in place in shared memory";
  m.setup = [st](std::size_t size) -> Status {
    std::size_t total = kRawPayloadOffset + size;
    st->fd = MBMQ_TRY(os::make_sealed_memfd("bench-raw-ring", total));
    st->map = MBMQ_TRY(os::Mapping::map_shared(st->fd.get(), total, os::Access::ReadWrite));
    st->ctl = new (st->map.data()) RingCtl{};
    st->pool = st->map.data() + kRawPayloadOffset;
    st->size = size;
    return {};
  };
  m.serve = [st](std::size_t size, ServerCounter& count) -> int {
    std::uint32_t last = 0;
    for (;;) {
      std::uint32_t seq;
      while ((seq = st->ctl->req.seq.load(std::memory_order_acquire)) == last)
        __builtin_ia32_pause();
      last = seq;
      if (seq == kStop) return count.stop(), 0;
      std::byte* buf = st->pool + std::size_t{st->ctl->req.index} * size;  // dependent address
      std::uint64_t sum = read_payload(buf, size);
      std::memcpy(buf, &sum, 8);  // the answer in the request's own buffer
      st->ctl->resp.index = st->ctl->req.index;
      st->ctl->resp.seq.store(seq, std::memory_order_release);
      count.tick();
    }
  };
  m.client_rtt = [st](std::uint64_t iter) -> bool {
    write_payload(st->pool, st->size, iter);
    std::uint32_t seq = static_cast<std::uint32_t>(iter % 0x7FFFFFFF) + 1;
    st->ctl->req.index = 0;
    st->ctl->req.seq.store(seq, std::memory_order_release);
    while (st->ctl->resp.seq.load(std::memory_order_acquire) != seq) __builtin_ia32_pause();
    const std::byte* buf = st->pool + std::size_t{st->ctl->resp.index} * st->size;
    std::uint64_t sum;
    std::memcpy(&sum, buf, 8);
    return sum == expected_sum(st->size, iter);
  };
  m.stop = [st] { st->ctl->req.seq.store(kStop, std::memory_order_release); };
  m.teardown = [st] {
    st->map.reset();
    st->fd.reset();
  };
  return m;
}

// ---- mbmq ---------------------------------------------------------------------------------------
// `how`: the server in wait() (Block) or in epoll_wait on the queue's fd (Epoll).
Mechanism mbmq_mechanism(const char* name, WaitMode mode, QueueWait how = QueueWait::Block,
                         Trust server_trust = Trust::Cooperative,
                         std::uint32_t copy_threshold = 0) {
  struct State {
    Channel client, server;
    Buffer buf;
    std::size_t size = 0;
  };
  auto st = std::make_shared<State>();
  Mechanism m;
  m.name = name;
  m.copies_by_design =
      server_trust != Trust::Untrusted
          ? "0: the payload is written once, in a buffer the server reads in place"
      : copy_threshold == 0
          ? "1: the server copies every request into private memory (the untrusted default), and "
            "its 8-byte answer back"
          : "1 up to copy_threshold = 64 KiB (the server copies the request into private memory); "
            "0 above it (a sealed memfd, mapped), but fresh pages for every message";
  m.setup = [st, mode, server_trust, copy_threshold](std::size_t size) -> Status {
    ChannelOptions opt;
    opt.wait.mode = mode;
    opt.trust = {Trust::Cooperative, server_trust};
    opt.copy_threshold = copy_threshold;
    auto [c, s] = MBMQ_TRY(Channel::pair(opt));
    st->client = std::move(c);
    st->server = std::move(s);
    st->size = size;
    return {};
  };
  m.serve = [st, mode, how](std::size_t, ServerCounter& count) -> int {
    st->client.close();
    WaitPolicy policy;
    policy.mode = mode;
    auto q = MsgQueue::create(policy);
    if (!q || !st->server.redirect(*q, 1)) return 1;
    return serve_queue(*q, how, 1, count);
  };
  m.after_fork_parent = [st]() -> Status {
    st->server.close();
    return {};
  };
  m.client_rtt = [st](std::uint64_t iter) -> bool {
    if (!st->buf.valid()) {
      auto b = st->client.buffer(st->size);
      if (!b) return false;
      st->buf = std::move(*b);
    }
    Buffer& b = st->buf;
    if (!b.resize(st->size)) return false;  // within capacity: no move, no allocation
    write_payload(b.data().data(), st->size, iter);
    if (!st->client.call(b, Deadline::after(std::chrono::seconds(10)))) return false;
    std::uint64_t sum;
    std::memcpy(&sum, b.data().data(), 8);
    return b.size() == 8 && sum == expected_sum(st->size, iter);
  };
  m.stop = [st] {
    if (st->buf.valid() && st->buf.resize(0))
      (void)st->client.call(st->buf, Deadline::after(std::chrono::seconds(5)));
  };
  m.teardown = [st] {
    st->buf.reset();
    st->client.close();
    st->server.close();
  };
  return m;
}

}  // namespace

int serve_queue(MsgQueue& q, QueueWait how, std::uint64_t key, ServerCounter& count) {
  std::optional<os::Epoll> ep;
  if (how == QueueWait::Epoll) {
    // fd() before the first wait(): from then on, a wait() that finds nothing arms the fd.
    auto e = os::Epoll::create();
    if (!e || !e->add(q.fd(), os::kEpollIn, key)) return 6;
    ep = std::move(*e);
  }
  const Deadline deadline = ep ? Deadline::immediate() : Deadline::never();
  auto msg = q.wait(deadline);
  for (;;) {
    if (!msg) {
      if (!ep || msg.error().code != Errc::TimedOut) return 2;
      // Nothing there: that wait() armed the fd (level-triggered), so sleep in epoll_wait until
      // it is readable, then take messages until the next TimedOut.
      os::EpollEvent ev[1];
      if (!ep->wait(ev, -1)) return 6;
      msg = q.wait(deadline);
      continue;
    }
    if (msg->key != key) return 5;
    if (msg->kind != Kind::Request) return msg->kind == Kind::PeerClosed ? 0 : 3;
    Buffer& b = msg->buffer;
    std::size_t n = b.size();
    if (n == 0) {
      count.stop();
      (void)MsgQueue::reply(std::move(*msg));  // the stop request
      return 0;
    }
    std::uint64_t sum = read_payload(b.data().data(), n);  // read in place
    std::memcpy(b.data().data(), &sum, 8);
    if (!b.resize(8)) return 4;
    count.tick();
    // With Epoll, a TimedOut here has sent the reply all the same (only the wait timed out).
    msg = q.reply_and_wait(std::move(*msg), deadline);
  }
}

std::vector<Mechanism> shm_mechanisms() {
  std::vector<Mechanism> v;
  v.push_back(raw_mechanism(false));
  v.push_back(raw_mechanism(false, false, true));  // raw-spin-copy: #16's floor for a copy
  v.push_back(raw_ring_mechanism());
  v.push_back(raw_mechanism(true));
  v.push_back(raw_mechanism(true, true));
  v.push_back(mbmq_mechanism("mbmq-spin", WaitMode::Spin));
  v.push_back(mbmq_mechanism("mbmq-adaptive", WaitMode::Adaptive));
  v.push_back(mbmq_mechanism("mbmq-sleep", WaitMode::Sleep));
  // The server in an event loop (#13). Its queue sleeps at once (WaitMode::Sleep): a
  // wait(immediate) then looks once and returns TimedOut, where Spin or Adaptive would look 64
  // times first (SpinStep reads the clock once per 64 looks).
  v.push_back(mbmq_mechanism("mbmq-fd", WaitMode::Sleep, QueueWait::Epoll));
  // The server untrusted of its client (Trust::Untrusted, default copy_threshold: every payload
  // copied).
  v.push_back(
      mbmq_mechanism("mbmq-untrusted", WaitMode::Adaptive, QueueWait::Block, Trust::Untrusted));
  // The same with the sealed path above 64 KiB (copy_threshold = slot_size, the old default).
  v.push_back(mbmq_mechanism("mbmq-untrusted-sealed", WaitMode::Adaptive, QueueWait::Block,
                             Trust::Untrusted, 64u << 10));
  return v;
}

}  // namespace mbmq::tool
