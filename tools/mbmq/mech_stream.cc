// tools/mbmq/mech_stream.cc: the mechanisms of `mbmq bench --stream` (one-way messages, see
// stream.h), each used as a sensible streaming user would.
//   raw-spsc      the floor: a single-producer/single-consumer ring in a shared memfd, 4096
//                 entries of `size` bytes (4 MiB at most), written and read in place, both sides
//                 spinning
//   uds / pipe    a Unix stream socket pair / a pipe: one write() per message; the consumer
//                 reads 256 KiB at a time and verifies the messages in its buffer (both blocking)
//   zmq-pushpull  ZeroMQ PUSH/PULL over ipc://, messages read in place in their zmq_msg_t
//   mbmq-stream   an mbmq Channel: Channel::buffer(), written in place, send(); the consumer
//                 receive()s (WaitMode::Spin), reads in place and drops the Message
// boost-mq and iceoryx live beside their round-trip rows (mech_boost.cc, mech_iceoryx.cc).
#include <zmq.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <memory>
#include <new>
#include <span>
#include <string>
#include <vector>

#include "mbmq/mbmq.h"
#include "os/mapping.h"
#include "os/memfd.h"
#include "os/process.h"
#include "os/unix_socket.h"
#include "stream.h"

namespace mbmq::tool {
namespace {

Status verification_failed() { return fail(Errc::Protocol, "stream verification"); }

// ---- raw-spsc
// ------------------------------------------------------------------------------------ In the
// shared segment, before the entries. Free-running 64-bit counters: entry i is at (i % entries) *
// stride; tail - head is the number of entries filled.
struct SpscHeader {
  // Producer: store-release after writing entry tail. Pairs with the consumer's acquire load
  // before it reads that entry.
  alignas(128) std::atomic<std::uint64_t> tail;
  // Consumer: store-release after reading entry head. Pairs with the producer's acquire load
  // before it overwrites that entry.
  alignas(128) std::atomic<std::uint64_t> head;
};
static_assert(std::is_standard_layout_v<SpscHeader>);
static_assert(sizeof(SpscHeader) == 256 && offsetof(SpscHeader, head) == 128);
static_assert(std::atomic<std::uint64_t>::is_always_lock_free);
constexpr std::size_t kSpscEntriesOffset = 4096;
constexpr std::size_t kSpscMaxEntries = 4096;
// Fewer entries for large messages: at most 4 MiB in flight (64 at 64 KiB, the bytes of
// mbmq-stream's 64 slots, within this VM's 4 MiB L2). A 64 MiB ring (1,024 x 64 KiB) streamed
// through memory and ran at half the rate of mbmq-stream's 4 MiB pool: no floor.
constexpr std::size_t kSpscMaxBytes = 4u << 20;

// `max_entries`: 4096 for the floor; 64 for raw-spsc-64, a ring as deep as mbmq-stream's pool was
// before layout v9 (64 slots per side), which shows what that depth alone costs.
StreamMechanism raw_spsc_mechanism(std::size_t max_entries) {
  struct State {
    os::UniqueFd fd;
    os::Mapping map;
    SpscHeader* hdr = nullptr;
    std::byte* entries = nullptr;
    std::size_t stride = 0;
    std::uint64_t mask = 0;  // entries - 1 (a power of two)
  };
  auto st = std::make_shared<State>();
  StreamMechanism m;
  if (max_entries == kSpscMaxEntries) {
    m.name = "raw-spsc";
    m.note =
        "raw-spsc: 4096 entries of the message size, at most 4 MiB (64 entries at 64 KiB, as "
        "mbmq-stream's 64 slots; a 64 MiB ring ran at half the rate)";
  } else {
    m.name = "raw-spsc-" + std::to_string(max_entries);
    m.note = m.name + ": the same ring with " + std::to_string(max_entries) +
             " entries, as deep as mbmq-stream's pool before layout v9 (64 slots)";
  }
  m.setup = [st, max_entries](std::size_t size) -> Status {
    st->stride = (size + 7) / 8 * 8;  // 8-byte aligned words
    std::size_t n = max_entries;
    while (n > 2 && n * st->stride > kSpscMaxBytes) n /= 2;
    st->mask = n - 1;
    const std::size_t total = kSpscEntriesOffset + n * st->stride;
    st->fd = MBMQ_TRY(os::make_sealed_memfd("bench-spsc", total));
    st->map = MBMQ_TRY(os::Mapping::map_shared(st->fd.get(), total, os::Access::ReadWrite));
    st->hdr = new (st->map.data()) SpscHeader{};
    st->entries = st->map.data() + kSpscEntriesOffset;
    return {};
  };
  m.produce = [st](StreamProducer& p) -> Status {
    const std::uint64_t entries = st->mask + 1;
    std::uint64_t tail = 0, head = 0;  // head: our cached copy of the consumer's
    for (;;) {
      if (tail - head == entries) {  // full by the cache: look again, and wait for room
        while (tail - (head = st->hdr->head.load(std::memory_order_acquire)) == entries) {
          if (!p.healthy()) return {};  // the consumer failed: it reports why
          __builtin_ia32_pause();
        }
      }
      const bool more = p.next(st->entries + (tail & st->mask) * st->stride);
      st->hdr->tail.store(++tail, std::memory_order_release);
      if (!more) return {};
    }
  };
  m.consume = [st](StreamConsumer& c) -> Status {
    std::uint64_t head = 0, tail = 0;  // tail: our cached copy of the producer's
    for (;;) {
      if (head == tail) {  // empty by the cache: look again, and wait for an entry
        while ((tail = st->hdr->tail.load(std::memory_order_acquire)) == head) {
          if (!c.healthy()) return {};  // the producer failed: it reports why
          __builtin_ia32_pause();
        }
      }
      const auto v = c.check(st->entries + (head & st->mask) * st->stride, c.size());
      if (v == StreamConsumer::Verdict::Fail) return verification_failed();
      st->hdr->head.store(++head, std::memory_order_release);
      if (v == StreamConsumer::Verdict::End) return {};
    }
  };
  m.after_fork = [st] {
    st->map.reset();
    st->fd.reset();
  };
  m.teardown = [] {};
  return m;
}

// ---- uds and pipe
// --------------------------------------------------------------------------------
constexpr std::size_t kReadChunk = std::size_t{256} * 1024;

StreamMechanism byte_stream_mechanism(bool pipe) {
  struct State {
    os::UniqueFd rd, wr;  // the consumer reads rd, the producer writes wr
  };
  auto st = std::make_shared<State>();
  StreamMechanism m;
  m.name = pipe ? "pipe" : "uds";
  m.setup = [st, pipe](std::size_t) -> Status {
    auto [a, b] = pipe ? MBMQ_TRY(os::make_pipe()) : MBMQ_TRY(os::stream_pair());
    st->rd = std::move(a);
    st->wr = std::move(b);
    return {};
  };
  m.produce = [st](StreamProducer& p) -> Status {
    st->rd.reset();
    std::vector<std::byte> buf(p.size());
    for (;;) {
      const bool more = p.next(buf.data());
      if (auto s = os::write_full(st->wr.get(), buf); !s) return p.healthy() ? s : Status{};
      if (!more) return {};
    }
  };
  m.consume = [st](StreamConsumer& c) -> Status {
    st->wr.reset();
    const std::size_t size = c.size();
    // Frames are parsed out of large reads; a partial one moves to the front for the next read.
    std::vector<std::byte> buf(std::max(kReadChunk, 2 * size));
    std::size_t have = 0;
    for (;;) {
      const long n = os::read_once(st->rd.get(), buf.data() + have, buf.size() - have);
      if (n < 0) return fail(Error::from_syscall("read", errno));
      if (n == 0) {
        if (!c.healthy()) return {};
        return fail(Errc::PeerClosed, "the stream ended before its end message");
      }
      have += static_cast<std::size_t>(n);
      std::size_t off = 0;
      for (; have - off >= size; off += size) {
        const auto v = c.check(buf.data() + off, size);
        if (v == StreamConsumer::Verdict::Fail) return verification_failed();
        if (v == StreamConsumer::Verdict::End) return {};
      }
      std::memmove(buf.data(), buf.data() + off, have - off);
      have -= off;
    }
  };
  m.after_fork = [st] {
    st->rd.reset();
    st->wr.reset();
  };
  m.teardown = [] {};
  return m;
}

// ---- zmq-pushpull
// -------------------------------------------------------------------------------- Both sides wait
// at most this long in one zmq call, to notice the other side's failure.
constexpr int kZmqPatienceMs = 200;

StreamMechanism zmq_pushpull_mechanism() {
  struct State {
    std::string path, endpoint;
  };
  auto st = std::make_shared<State>();
  StreamMechanism m;
  m.name = "zmq-pushpull";
  m.os_counted = false;
  m.note = "zmq-pushpull: libzmq's default high-water marks (1000 messages each side)";
  m.setup = [st](std::size_t) -> Status {
    st->path = unique_tmp_path("stream-zmq", ".ipc");
    st->endpoint = "ipc://" + st->path;
    return {};
  };
  // Contexts are made in the children (libzmq is not fork-safe).
  m.produce = [st](StreamProducer& p) -> Status {
    void* ctx = zmq_ctx_new();
    void* sock = zmq_socket(ctx, ZMQ_PUSH);
    int patience = kZmqPatienceMs;
    zmq_setsockopt(sock, ZMQ_SNDTIMEO, &patience, sizeof patience);
    Status rc;
    // connect() before the consumer's bind() is fine: ZeroMQ connects when the endpoint appears.
    if (zmq_connect(sock, st->endpoint.c_str()) != 0) rc = fail(Errc::System, "zmq_connect");
    std::vector<std::byte> buf(p.size());
    for (bool more = true; rc && more;) {
      more = p.next(buf.data());
      // zmq_send copies buf into a message; EAGAIN: the queue stayed full for kZmqPatienceMs.
      while (zmq_send(sock, buf.data(), buf.size(), 0) != static_cast<int>(buf.size())) {
        if (zmq_errno() != EAGAIN) {
          rc = fail(Errc::System, "zmq_send");
          break;
        }
        if (!p.healthy()) return {};
      }
    }
    // Linger only hands the last messages to the kernel: closing then lost the end message on the
    // consumer's side about half the time (8 B messages, libzmq 4.3). Close once it has ended.
    p.await_consumer();
    // With the consumer gone (it failed) nothing is delivered, and zmq_ctx_term would wait
    // forever with the default linger.
    if (!p.healthy()) {
      int linger = 0;
      zmq_setsockopt(sock, ZMQ_LINGER, &linger, sizeof linger);
    }
    zmq_close(sock);
    zmq_ctx_term(ctx);
    return rc;
  };
  m.consume = [st](StreamConsumer& c) -> Status {
    return zmq_receive_each(
        ZMQ_PULL, [&](void* sock) { return zmq_bind(sock, st->endpoint.c_str()); },
        [&] { return c.healthy(); },
        [&](std::byte* p, std::size_t n) { return take_of(c.check(p, n)); });
  };
  m.teardown = [st] {
    std::error_code ec;
    std::filesystem::remove(st->path, ec);
  };
  return m;
}

// ---- mbmq-stream
// --------------------------------------------------------------------------------- Messages per
// step of the producer and the consumer. 1 with today's Channel API.
// Messages per batch: buffers(), send_batch() and receive_batch() take up to this many at once.
constexpr std::size_t kMbmqBatch = 32;
constexpr std::size_t kMbmqMaxSlots = 448;  // shm::kMaxSlotsPerSide

// The producer's two steps. A wait for room that reaches its (short) deadline is a retry
// (counted); it gives up, successfully, when the consumer has failed (it says why).
struct MbmqProducer {
  Channel& ch;
  StreamProducer& p;
  // Fills `bufs` with buffers of p.size() bytes, waiting for the first; how many (0: stop).
  // First without waiting: a deadline reads the clock (a vDSO call, ~5% of the producer's time per
  // batch of 32 at 64 B), needed only when there is no room.
  Result<std::size_t> acquire(std::span<Buffer> bufs) {
    if (auto n = ch.buffers(p.size(), bufs, Deadline::immediate())) return *n;
    for (;;) {
      auto n = ch.buffers(p.size(), bufs, Deadline::after(std::chrono::milliseconds(100)));
      if (n) return *n;
      if (n.error().code != Errc::TimedOut) return fail(n.error());
      if (!p.healthy()) return 0;
      p.retry();
    }
  }
  // Sends every buffer of `bufs`, in order, as batches.
  Status publish(std::span<Buffer> bufs) {
    while (!bufs.empty()) {
      auto n = ch.send_batch(bufs);
      if (n) {
        bufs = bufs.subspan(*n);
        continue;
      }
      if (n.error().code != Errc::WouldBlock) return fail(n.error());
      if (!p.healthy()) return {};
      p.retry();
      __builtin_ia32_pause();
    }
    return {};
  }
};

// The consumer's step: the next messages, at least one (waiting, spinning) unless the channel
// failed. The messages of the previous batch are given back first, together.
Result<std::size_t> take(Channel& ch, std::span<Message> out) {
  return ch.receive_batch(out, Deadline::never());
}

// The producer's steps on the stream's own path (mbmq/stream.h): slots reserved, written in place
// and committed, no Buffer per message. As MbmqProducer, a wait for room that reaches its
// deadline is a retry, and a commit refused (WouldBlock) is retried.
struct MbmqReserver {
  Channel& ch;
  StreamProducer& p;
  Reservation out;
  // Reserves up to `max` slots of p.size() bytes, waiting for the first; how many (0: stop).
  Result<std::size_t> acquire(std::size_t max) {
    if (auto n = ch.reserve(out, p.size(), max, Deadline::immediate())) return *n;
    for (;;) {
      auto n = ch.reserve(out, p.size(), max, Deadline::after(std::chrono::milliseconds(100)));
      if (n) return *n;
      if (n.error().code != Errc::TimedOut) return fail(n.error());
      if (!p.healthy()) return 0;
      p.retry();
    }
  }
  // Sends the first n reserved slots.
  Status publish(std::size_t n) {
    while (n > 0) {
      auto k = out.commit(n);
      if (k) {
        n -= *k;
        continue;
      }
      if (k.error().code != Errc::WouldBlock) return fail(k.error());
      if (!p.healthy()) return {};
      p.retry();
      __builtin_ia32_pause();
    }
    return {};
  }
};

// One mechanism per API: `in_place` (mbmq-stream): Channel::reserve(), Reservation::commit(),
// Channel::receive_in_place(); else (mbmq-buffers) Channel::buffers(), send_batch(),
// receive_batch(), a Buffer and a Message per message.
StreamMechanism mbmq_stream_mechanism(bool in_place) {
  struct State {
    Channel producer, consumer;
  };
  auto st = std::make_shared<State>();
  StreamMechanism m;
  m.name = in_place ? "mbmq-stream" : "mbmq-buffers";
  m.counts_retries = true;
  m.note = in_place ? "mbmq-stream: Channel::pair(), slots of max(size, 64) bytes (16 MiB at most: "
                      "larger messages go as mbmq-buffers), 448 per side or 4 MiB of them (64 at "
                      "least, as at 64 KiB), consumer in WaitMode::Spin; batches of up to 32: "
                      "Channel::reserve(), Reservation::commit(), Channel::receive_in_place() "
                      "(mbmq/stream.h); retries/msg: a 100 ms wait for room that ran out, or a "
                      "commit() refused (WouldBlock)"
                    : "mbmq-buffers: the same channel through the Buffer API: Channel::buffers(), "
                      "send_batch(), receive_batch(), a Buffer and a Message per message";
  m.setup = [st](std::size_t size) -> Status {
    ChannelOptions opt;
    const std::size_t slot = std::max<std::size_t>((size + 63) / 64 * 64, 64);
    opt.slot_size = static_cast<std::uint32_t>(std::min<std::size_t>(slot, 16u << 20));
    // As deep as raw-spsc where its bytes allow: at most 4 MiB of slots (kSpscMaxBytes), between
    // 64 and the most a side may have (448, layout v9).
    opt.slots_per_side = static_cast<std::uint32_t>(
        std::clamp<std::size_t>(kSpscMaxBytes / opt.slot_size, 64, kMbmqMaxSlots));
    opt.wait.mode = WaitMode::Spin;
    auto [a, b] = MBMQ_TRY(Channel::pair(opt));
    st->producer = std::move(a);
    st->consumer = std::move(b);
    return {};
  };
  m.produce = [st, in_place](StreamProducer& p) -> Status {
    st->consumer.close();
    if (in_place && p.size() <= (16u << 20)) {
      MbmqReserver out{st->producer, p, {}};
      for (bool more = true; more;) {
        std::size_t n = MBMQ_TRY(out.acquire(kMbmqBatch));
        if (n == 0) return {};
        for (std::size_t i = 0; i < n && more; ++i) {
          more = p.next(out.out.slot(i).data());
          if (!more) n = i + 1;  // the end message last; the slots after it go back unused
        }
        MBMQ_TRY(out.publish(n));
      }
      return {};
    }
    MbmqProducer out{st->producer, p};
    std::array<Buffer, kMbmqBatch> bufs;
    for (bool more = true; more;) {
      std::size_t n = MBMQ_TRY(out.acquire(bufs));
      if (n == 0) return {};
      for (std::size_t i = 0; i < n && more; ++i) {
        more = p.next(bufs[i].data().data());
        if (!more) n = i + 1;  // the end message last; the buffers after it go back unused
      }
      MBMQ_TRY(out.publish({bufs.data(), n}));
    }
    return {};
  };
  m.consume = [st, in_place](StreamConsumer& c) -> Status {
    st->producer.close();
    // A message: read in place, checked. Done: the end message (verified) or a failure.
    std::array<Message, kMbmqBatch> msgs;
    auto one = [&](Message& msg, bool* done) -> Status {
      *done = true;
      if (msg.kind == Kind::PeerClosed) {
        if (!c.healthy()) return {};
        return fail(msg.error, "the channel closed before the end message");
      }
      if (msg.kind != Kind::Message) return fail(Errc::Protocol, "not a one-way message");
      const auto v = c.check(msg.buffer.data().data(), msg.buffer.size());
      if (v == StreamConsumer::Verdict::Fail) return verification_failed();
      *done = v == StreamConsumer::Verdict::End;
      return {};
    };
    if (in_place) {
      InPlace in;
      for (;;) {
        const std::size_t n = MBMQ_TRY(st->consumer.receive_in_place(in, Deadline::never()));
        for (std::size_t i = 0; i < n; ++i) {
          // Read in place; the next receive_in_place() gives the batch back to the producer.
          // check() writes only for --inject-corruption (a byte flipped, as a broken transport
          // would): the mapping is writable, InPlace's view is const to say it is not ours.
          const auto v = c.check(const_cast<std::byte*>(in[i].data()), in[i].size());
          if (v == StreamConsumer::Verdict::Fail) return verification_failed();
          if (v == StreamConsumer::Verdict::End) return {};
        }
        if (n > 0) continue;
        // Another kind of message next (an extent above 16 MiB, the end of the channel).
        msgs[0] = MBMQ_TRY(st->consumer.receive(Deadline::never()));
        bool done = false;
        MBMQ_TRY(one(msgs[0], &done));
        if (done) return {};
      }
    }
    for (;;) {
      const std::size_t n = MBMQ_TRY(take(st->consumer, msgs));
      for (std::size_t i = 0; i < n; ++i) {
        // Read in place; the next receive_batch() gives the batch back to the producer.
        bool done = false;
        MBMQ_TRY(one(msgs[i], &done));
        if (done) return {};
      }
    }
  };
  m.after_fork = [st] {
    st->producer.close();
    st->consumer.close();
  };
  m.teardown = [st] {
    st->producer = {};
    st->consumer = {};
  };
  return m;
}

}  // namespace

std::vector<StreamMechanism> stream_mechanisms() {
  std::vector<StreamMechanism> v;
  v.push_back(raw_spsc_mechanism(kSpscMaxEntries));
  v.push_back(raw_spsc_mechanism(64));
  v.push_back(mbmq_stream_mechanism(true));
  v.push_back(mbmq_stream_mechanism(false));
  v.push_back(byte_stream_mechanism(false));
  v.push_back(byte_stream_mechanism(true));
  v.push_back(zmq_pushpull_mechanism());
  v.push_back(boost_mq_stream_mechanism());
  v.push_back(iceoryx_stream_mechanism());
  return v;
}

}  // namespace mbmq::tool
