// tools/mbmq/mech_fanout.cc: the mechanisms of `mbmq bench --fanout` (one publisher, N sleeping
// subscribers, see fanout.h), each used as its users would.
//   raw-futex      the floor: one message slot and one futex word in a shared memfd; the
//                  publisher writes the slot in place, bumps the word, FUTEX_WAKE(INT_MAX); every
//                  subscriber FUTEX_WAITs on the word and reads the slot in place
//   mbmq-channels  what mbmq offers today: one Channel per subscriber; the publisher writes the
//                  message into the first channel's buffer, copies it into the others', and
//                  send()s one buffer per channel; each subscriber receive()s (default policy;
//                  mbmq-channels-sleep: WaitMode::Sleep)
//   zmq-pubsub     ZeroMQ PUB/SUB over ipc://: zmq_send() from the publisher's buffer; each SUB
//                  socket (subscribed to everything) reads the message in place in its zmq_msg_t
// iceoryx (publish/subscribe) lives beside its other rows (mech_iceoryx.cc), mbmq-topic in
// mech_topic.cc (built where mbmq/topic.h exists).
#include <zmq.h>

#include <atomic>
#include <chrono>
#include <climits>
#include <cstring>
#include <filesystem>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "fanout.h"
#include "mbmq/mbmq.h"
#include "os/futex.h"
#include "os/mapping.h"
#include "os/memfd.h"

namespace mbmq::tool {
namespace {

// A blocking wait in a subscriber gives up after this long to look whether a side has failed.
constexpr std::int64_t kPatienceNs = 200'000'000;

// ---- raw-futex --------------------------------------------------------------------------------
// In the shared segment, before the slot. `word` is a sequence lock and the futex: odd while the
// publisher writes the slot, even (2k+2 after publish k) when it is whole.
struct FutexHeader {
  // Publisher: the odd value before writing (relaxed, then a release fence: no write of the slot
  // moves above it), the even value with a release store after (pairs with the subscribers'
  // acquire load before they read the slot). Subscribers re-load it after an acquire fence: a
  // change means what they read may be torn.
  alignas(64) std::atomic<std::uint32_t> word;
};
static_assert(std::is_standard_layout_v<FutexHeader>);
constexpr std::size_t kFutexSlotOffset = 4096;

FanoutMechanism raw_futex_mechanism() {
  struct State {
    os::UniqueFd fd;
    os::Mapping map;
    FutexHeader* hdr = nullptr;
    std::byte* slot = nullptr;
  };
  auto st = std::make_shared<State>();
  FanoutMechanism m;
  m.name = "raw-futex";
  m.note =
      "raw-futex: one slot in a memfd, written and read in place; one futex word, FUTEX_WAKE of "
      "every waiter per message (the O(1)-system-call floor)";
  m.copies = [](std::size_t) { return std::size_t{0}; };
  m.setup = [st](std::size_t size, std::size_t) -> Status {
    const std::size_t total = kFutexSlotOffset + size;
    st->fd = MBMQ_TRY(os::make_sealed_memfd("bench-fanout-futex", total));
    st->map = MBMQ_TRY(os::Mapping::map_shared(st->fd.get(), total, os::Access::ReadWrite));
    st->hdr = new (st->map.data()) FutexHeader{};
    st->slot = st->map.data() + kFutexSlotOffset;
    return {};
  };
  m.publish = [st](FanoutPublisher& p) -> Status {
    std::uint32_t word = 0;
    while (p.next()) {
      st->hdr->word.store(++word, std::memory_order_relaxed);  // odd: writing
      std::atomic_thread_fence(std::memory_order_release);
      p.fill(st->slot);
      st->hdr->word.store(++word, std::memory_order_release);  // even: whole
      MBMQ_TRY(os::futex_wake(&st->hdr->word, INT_MAX));
      p.sent();
    }
    return p.status();
  };
  m.subscribe = [st](FanoutSubscriber& s) -> Status {
    std::uint32_t seen = 0;
    for (;;) {
      const std::uint32_t w = st->hdr->word.load(std::memory_order_acquire);
      if (w == seen || (w & 1) != 0) {
        if (!s.healthy()) return {};
        (void)MBMQ_TRY(os::futex_wait(&st->hdr->word, w, kPatienceNs));
        continue;
      }
      // The first word, then the lock again: unchanged, it was read whole. A message is not
      // rewritten before this subscriber acknowledges it (paced), but probes are (every 1 ms,
      // until all have joined): a probe is never handed to received(), which reads the slot again.
      std::uint64_t first;
      std::memcpy(&first, st->slot, 8);
      std::atomic_thread_fence(std::memory_order_acquire);
      if (st->hdr->word.load(std::memory_order_relaxed) != w) continue;
      seen = w;
      if (first == kFanoutProbe) {
        s.probe();
        continue;
      }
      const auto v = s.received(st->slot, s.size());  // read in place
      if (v == FanoutSubscriber::Verdict::Fail) return s.failure();
      if (v == FanoutSubscriber::Verdict::End) return {};
    }
  };
  m.after_fork = [st] {
    st->map.reset();
    st->fd.reset();
  };
  m.teardown = [] {};
  return m;
}

// ---- mbmq-channels ----------------------------------------------------------------------------
// mode: the subscribers' WaitMode (Adaptive is the default policy).
FanoutMechanism mbmq_channels_mechanism(WaitMode mode) {
  struct State {
    std::vector<Channel> pub, sub;  // pub[i] is connected to sub[i]
  };
  auto st = std::make_shared<State>();
  FanoutMechanism m;
  const bool sleep = mode == WaitMode::Sleep;
  m.name = sleep ? "mbmq-channels-sleep" : "mbmq-channels";
  m.note = sleep
               ? "mbmq-channels-sleep: the same, the subscribers in WaitMode::Sleep (no spinning)"
               : "mbmq-channels: N Channel::pair()s, 4 slots per side of the message size (16 MiB "
                 "at most), the subscribers in the default WaitPolicy (adaptive: 50 us of "
                 "spinning after each message, then the futex); per message N buffer()s, the "
                 "payload written into the first and memcpy'd into the other N-1, N send()s";
  m.copies = [](std::size_t n) { return n - 1; };
  m.setup = [st, mode](std::size_t size, std::size_t n) -> Status {
    ChannelOptions opt;
    opt.slots_per_side = 4;
    opt.wait.mode = mode;
    const std::size_t slot = std::max<std::size_t>((size + 63) / 64 * 64, 64);
    opt.slot_size = static_cast<std::uint32_t>(std::min<std::size_t>(slot, 16u << 20));
    st->pub.clear();
    st->sub.clear();
    for (std::size_t i = 0; i < n; ++i) {
      auto [a, b] = MBMQ_TRY(Channel::pair(opt));
      st->pub.push_back(std::move(a));
      st->sub.push_back(std::move(b));
    }
    return {};
  };
  m.publish = [st](FanoutPublisher& p) -> Status {
    for (auto& c : st->sub) c.close();
    std::vector<Buffer> bufs(st->pub.size());
    while (p.next()) {
      for (std::size_t i = 0; i < bufs.size(); ++i)
        bufs[i] = MBMQ_TRY(st->pub[i].buffer(p.size(), Deadline::after(std::chrono::seconds(10))));
      p.fill(bufs[0].data().data());
      for (std::size_t i = 1; i < bufs.size(); ++i)
        std::memcpy(bufs[i].data().data(), bufs[0].data().data(), p.size());
      for (std::size_t i = 0; i < bufs.size(); ++i) MBMQ_TRY(st->pub[i].send(std::move(bufs[i])));
      p.sent();
    }
    return p.status();
  };
  m.subscribe = [st](FanoutSubscriber& s) -> Status {
    Channel& ch = st->sub[s.index()];
    for (std::size_t i = 0; i < st->pub.size(); ++i) {
      st->pub[i].close();
      if (i != s.index()) st->sub[i].close();
    }
    for (;;) {
      auto msg = ch.receive(Deadline::after(std::chrono::nanoseconds(kPatienceNs)));
      if (!msg) {
        if (msg.error().code != Errc::TimedOut) return fail(msg.error());
        if (!s.healthy()) return {};
        continue;
      }
      if (msg->kind == Kind::PeerClosed) {
        if (!s.healthy()) return {};
        return fail(msg->error, "the channel closed before the end message");
      }
      if (msg->kind != Kind::Message) return fail(Errc::Protocol, "not a one-way message");
      // Read in place; dropping the message gives the buffer back.
      const auto v = s.received(msg->buffer.data().data(), msg->buffer.size());
      if (v == FanoutSubscriber::Verdict::Fail) return s.failure();
      if (v == FanoutSubscriber::Verdict::End) return {};
    }
  };
  m.after_fork = [st] {
    for (auto& c : st->pub) c.close();
    for (auto& c : st->sub) c.close();
  };
  m.teardown = [st] {
    st->pub.clear();
    st->sub.clear();
  };
  return m;
}

// ---- zmq-pubsub -------------------------------------------------------------------------------
FanoutMechanism zmq_pubsub_mechanism() {
  struct State {
    std::string path, endpoint;
  };
  auto st = std::make_shared<State>();
  FanoutMechanism m;
  m.name = "zmq-pubsub";
  m.os_counted = false;
  m.note =
      "zmq-pubsub: PUB bound, N SUB sockets connected and subscribed to everything, default "
      "high-water marks; zmq_send() from the publisher's buffer, zmq_msg_recv() in place";
  // zmq_send's copy into its message, then per subscriber the I/O thread's write() into the kernel
  // and the subscriber's read() out of it.
  m.copies = [](std::size_t n) { return 1 + 2 * n; };
  m.setup = [st](std::size_t, std::size_t) -> Status {
    st->path = unique_tmp_path("fanout-zmq", ".ipc");
    st->endpoint = "ipc://" + st->path;
    return {};
  };
  // Contexts are made in the children (libzmq is not fork-safe).
  m.publish = [st](FanoutPublisher& p) -> Status {
    void* ctx = zmq_ctx_new();
    void* sock = zmq_socket(ctx, ZMQ_PUB);
    Status rc;
    if (zmq_bind(sock, st->endpoint.c_str()) != 0) rc = fail(Errc::System, "zmq_bind");
    std::vector<std::byte> buf(p.size());
    while (rc && p.next()) {
      p.fill(buf.data());
      if (zmq_send(sock, buf.data(), buf.size(), 0) != static_cast<int>(buf.size()))
        rc = fail(Errc::System, "zmq_send");
      p.sent();
    }
    int linger = 0;  // every subscriber has exited (or failed): nothing left to deliver
    zmq_setsockopt(sock, ZMQ_LINGER, &linger, sizeof linger);
    zmq_close(sock);
    zmq_ctx_term(ctx);
    return rc ? p.status() : rc;
  };
  m.subscribe = [st](FanoutSubscriber& s) -> Status {
    return zmq_receive_each(
        ZMQ_SUB,
        [&](void* sock) {
          zmq_setsockopt(sock, ZMQ_SUBSCRIBE, "", 0);
          // Before the publisher's bind() is fine: ZeroMQ connects when the endpoint appears.
          return zmq_connect(sock, st->endpoint.c_str());
        },
        [&] { return s.healthy(); },
        [&](std::byte* p, std::size_t n) { return take_of(s.received(p, n)); });
  };
  m.teardown = [st] {
    std::error_code ec;
    std::filesystem::remove(st->path, ec);
  };
  return m;
}

}  // namespace

std::vector<FanoutMechanism> fanout_mechanisms() {
  std::vector<FanoutMechanism> v;
  v.push_back(raw_futex_mechanism());
  v.push_back(mbmq_channels_mechanism(WaitMode::Adaptive));
  v.push_back(mbmq_channels_mechanism(WaitMode::Sleep));
  for (auto& m : topic_fanout_mechanisms()) v.push_back(std::move(m));
  v.push_back(iceoryx_fanout_mechanism());
  v.push_back(zmq_pubsub_mechanism());
  return v;
}

}  // namespace mbmq::tool
