// ipc/endpoint.h: one end of a channel: the protocol steps P2-P8 of src/shm/layout.h, composed
// from the parts that own their state (docs/PROTOCOL.md names the part of each step):
//   - BufferTable (ipc/buffer_table.h): our buffers and the peer's we hold, their life states and
//     generations, requests in flight, descriptors accepted but not yet delivered;
//   - Sideband (ipc/sideband.h): the control socket, its non-blocking outbox, its bounded stashes;
//   - PeerTrust (ipc/peer_trust.h): seal checks, private copies, sealed sends, replacements;
//   - SpinStep / sleep_once (ipc/wait_step.h): the spin-then-sleep of P6;
//   - the rings (shm/ring.h) and the peer's doorbell page.
// Endpoint itself holds the channel's state, the locks, and the order of the steps. Channel,
// Buffer and MsgQueue are thin handles over it.
//
// Locking: mu_ guards the producer ring index, the consumer ring index, and the three parts (the
// ownership tables, the control socket, trust). It is uncontended on the usual paths (one caller
// thread, or one queue waiter), never held across a sleep, and never across a blocking system call:
// the control socket is written without blocking (a peer that lets it fill has its channel closed,
// see send_ctl_locked). consumer_mu_ serializes call()/receive() on an end that is not redirected;
// it IS held while its holder sleeps for the reply, so a second caller sleeps on it (DeadlineMutex)
// and gives up at its own deadline. For a redirected end the queue's mutex plays that role.
//
// What one peer can make this end hold (each bound enforced; docs/RELIABILITY.md, peer budget):
//   - fds: its extents (<= kMaxExtents, mapped), stashed extent and replacement fds (one per extent
//     id each), its queue's doorbell (1), stashed handle fds (<= kMaxStashedHandleFds);
//   - memory: the extents' pages as far as the payloads it sends (never the whole file: no
//     prefault beyond the payload), untrusted ends' private copies (<= copy_threshold per id);
//   - control messages: drained only as far as a descriptor needs them; the socket holds at most
//     its send buffer (416 KiB: 555 small packets, 333 of 8 handles). When it is full, a sender
//     whose descriptors the peer has not all taken gets Errc::WouldBlock (back-pressure, as for a
//     full ring: the peer reads each packet when it takes its descriptor); one whose descriptors
//     were all taken closes the channel with Errc::Protocol (the peer does not read it at all).
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <vector>

#include "ipc/atomic_wait_policy.h"
#include "ipc/buffer_id.h"
#include "ipc/buffer_table.h"
#include "ipc/deadline_mutex.h"
#include "ipc/end_counters.h"
#include "ipc/handles.h"
#include "ipc/peer_trust.h"
#include "ipc/peer_watch.h"
#include "ipc/queue_bell.h"
#include "ipc/sideband.h"
#include "ipc/spin_mutex.h"
#include "ipc/topic_tap.h"
#include "ipc/wait_step.h"
#include "mbmq/buffer.h"
#include "mbmq/deadline.h"
#include "mbmq/introspect.h"
#include "mbmq/msg_queue.h"
#include "mbmq/result.h"
#include "mbmq/stream.h"
#include "mbmq/wait_policy.h"
#include "os/fd.h"
#include "os/mapping.h"
#include "os/thread_annotations.h"
#include "shm/layout.h"
#include "shm/ring.h"
#include "shm/segment.h"

namespace mbmq::detail {

class QueueCore;
class ListenCore;

enum class EpState : std::uint8_t { Open = 0, PeerClosed = 1, Protocol = 2, LocalClosed = 3 };
inline Errc closed_errc(EpState s) {
  if (s == EpState::LocalClosed) return Errc::InvalidArgument;  // Channel::close() was called
  return s == EpState::Protocol ? Errc::Protocol : Errc::PeerClosed;
}

// The control socket's send buffer we ask for (net.core.wmem_max's stock value). The kernel
// doubles it: 416 KiB, 555 packets of up to 192 bytes, 333 larger ones (8 handles), whatever
// their fd count. Not a hard requirement: a full socket is back-pressure (send_ctl_locked).
inline constexpr int kControlSendBuffer = 212992;

class Endpoint final : public Watched, public std::enable_shared_from_this<Endpoint> {
 public:
  struct Init {
    shm::Segment segment;
    os::UniqueFd control;
    int side = 0;  // 0: produces dir[0], consumes dir[1]; 1: the reverse
    WaitPolicy wait{};
    std::uint32_t tx_tail = 0;  // ring positions (non-zero for an end moved between processes)
    std::uint32_t rx_head = 0;
    std::uint32_t next_extent_gen = 1;  // 0 is taken as 1
  };
  static Result<std::shared_ptr<Endpoint>> make(Init init);
  Endpoint(const Endpoint&) = delete;
  Endpoint& operator=(const Endpoint&) = delete;
  ~Endpoint();
  const shm::Geometry& geometry() const noexcept { return seg_.geometry(); }

  // (P2) Buffers of this side.
  Result<Buffer> alloc(std::size_t size);
  // alloc(), waiting (P6r) until `deadline` for a buffer to come back when none is free.
  Result<Buffer> alloc_until(std::size_t size, Deadline deadline);
  // Up to out.size() buffers of `size` bytes (slots under one lock; an extent alone): how many
  // were put in out[0..n); out's earlier buffers are dropped first. Errc::NoBuffers when none
  // is free; alloc_until() waits for the first one.
  Result<std::size_t> alloc_many(std::size_t size, std::span<Buffer> out);
  Result<std::size_t> alloc_until(std::size_t size, std::span<Buffer> out, Deadline deadline);
  Status grow(Buffer& b, std::size_t n);
  void release(Buffer& b) noexcept;  // from ~Buffer / Buffer::reset

  // (P3)-(P7) Sending.
  Status call(Buffer& b, Deadline deadline);
  Status send(Buffer&& b, shm::DescKind kind);  // OneWay, or Request answered through the queue
  // One-way messages, in order, under one lock and with one wake-up check (P4) for all: the
  // count sent (a prefix, each moved from); the error when none could be.
  Result<std::size_t> send_batch(std::span<Buffer> bufs);
  Status reply(Buffer&& b);
  // (P3s) The stream's own path (mbmq/stream.h, endpoint_stream.cc): slots reserved without a
  // Buffer each, committed as one batch; the peer's one-way slots read in place and given back
  // together. unreserve()/release_in_place() are the objects' reset().
  Result<std::size_t> reserve(Reservation& r, std::size_t size, std::size_t max, Deadline deadline);
  Result<std::size_t> commit(Reservation& r, std::size_t k);
  void unreserve(Reservation& r) noexcept;
  Result<std::size_t> receive_in_place(InPlace& in, Deadline deadline);
  void release_in_place(InPlace& in) noexcept;
  // Replies through whichever endpoint `b` belongs to (MsgQueue::reply).
  static Status reply_message(Buffer&& b);

  // Receiving, for an end that is not redirected.
  Result<Message> receive(Deadline deadline);
  // Waits for the first message as receive(), then takes up to out.size() in all without waiting.
  Result<std::size_t> receive_batch(std::span<Message> out, Deadline deadline);

  // Receiving through a queue: one thread at a time (the queue's mutex).
  enum class Poll { Got, Empty, Ended, Gone };
  // Got: *out is a message. Ended: the channel is over and drained, *out is the final
  // Kind::PeerClosed. Gone: closed locally, drop it silently.
  Poll poll(Message* out);
  // Up to n messages (one lock), into empty Messages: *got of them, and how the last look ended
  // (Got: n were taken).
  Poll poll_batch(Message* out, std::size_t n, std::size_t* got);
  // Lock-free: the ring may hold a descriptor, messages are pending, or the end changed state.
  bool inbound_ready() const noexcept;
  // (P6) Before sleeping, by the consumer: false (and the channel closed with a protocol error)
  // if the peer's published tail contradicts the ring.
  bool check_ring() noexcept;
  Status redirect(const std::shared_ptr<QueueCore>& queue, std::uint64_t key);
  std::uint64_t key() const noexcept { return key_.load(std::memory_order_relaxed); }
  void set_wait_policy(WaitPolicy p) noexcept;
  WaitPolicy wait_policy() const noexcept;

  // Registers the control socket with this process's watcher (again after fork()). An end whose
  // peer's death could not be noticed must not be used: the error is returned.
  Status ensure_watched() noexcept;
  // Closes the channel with Errc::Protocol saying why (e.g. its peer's death cannot be watched).
  void abandon(const char* why) noexcept;
  // (P8) From the watcher thread: the control socket hung up.
  void on_hangup() noexcept;
  void on_watch(int fd, std::uint32_t events) noexcept override;
  // The owning Channel handle is gone: close the control socket (the peer sees a hang-up once no
  // other process holds it) and stop delivering.
  void close_local() noexcept;
  EpState state() const noexcept { return state_.load(std::memory_order_acquire); }
  // A const member of trust_, fixed at creation: no lock needed.
  bool untrusted() const noexcept MBMQ_NO_THREAD_SAFETY_ANALYSIS { return trust_.untrusted_me(); }
  // Something to destroy with this end (a listener's connection count). Set once, before use.
  void set_lease(std::shared_ptr<void> lease) noexcept { lease_ = std::move(lease); }
  // Introspection (#18): where this end's counters and final state go when it is destroyed (its
  // listener's totals). Set once, before use, like set_lease().
  void set_retire(std::shared_ptr<ListenTotals> totals) noexcept MBMQ_NO_THREAD_SAFETY_ANALYSIS {
    retire_ = std::move(totals);
  }
  // From the watcher thread answering a stat query: this end's counters (relaxed loads) and
  // gauges (mu_ taken briefly); peer ids, id and idle_ns are the caller's to fill.
  void fill_stat(ChannelStat* out) const noexcept;
  // Messages sent and received so far (relaxed loads): the watcher's idle-time clock.
  std::uint64_t message_total() const noexcept;
  // A topic subscription's tap (ipc/topic_tap.h), asked first by poll(). Set once, before the
  // end is redirected (the redirect publishes it to the queue's threads); held weakly (the
  // subscriber owns this end).
  void set_tap(std::weak_ptr<TopicTap> tap) noexcept { tap_ = std::move(tap); }

  // Moving an end to another process (ipc/transfer.cc). export_end: the end must be quiet (not
  // redirected, no buffers out or held, nothing pending: Errc::Busy); fills its state and
  // duplicates its two fds; the caller then closes this end. import_end validates all of it.
  // bell (the peer's queue doorbell, if meta.doorbell_gen != 0) is optional.
  Status export_end(shm::HandleMeta* meta, os::UniqueFd* seg, os::UniqueFd* ctl, BellFds* bell);
  static Result<std::shared_ptr<Endpoint>> import_end(const shm::HandleMeta& meta, os::UniqueFd seg,
                                                      os::UniqueFd ctl, BellFds bell,
                                                      WaitPolicy wait);

  // The file and offset behind buffer b's bytes (its slot in the segment memfd, or its extent's
  // memfd), for send_buffer(); false if b is not this end's, or its bytes are private memory.
  bool backing(const Buffer& b, int* fd, std::uint64_t* offset) const;

  // Test hooks: the raw segment (for the scribbling tests) and counts.
  std::byte* segment_base() const noexcept { return seg_.base(); }
  std::size_t segment_size() const noexcept { return seg_.geometry().segment_size; }
  // A test hook, read while nothing closes the end.
  int control_fd_for_test() const noexcept MBMQ_NO_THREAD_SAFETY_ANALYSIS { return ctl_.fd(); }
  // The memfd behind our extent buffer b (-1 if b is not one of our extents).
  int extent_fd_for_test(const Buffer& b) const;
  // Plays a forging sender: sends `fd` as our extent 0 at `gen` (CtlMsg aux `aux`), then a
  // Request descriptor naming it with `size` bytes.
  Status forge_extent_request_for_test(int fd, std::uint32_t gen, std::uint32_t size,
                                       std::uint32_t aux);

 private:
  explicit Endpoint(Init init);

  // What accept() made of a descriptor (P5).
  enum class Accepted { Deliver, Internal, CallDone, Bad };

  Result<Buffer> alloc_once(std::size_t size);
  void harvest_locked(std::size_t size) MBMQ_REQUIRES(mu_);
  void fill_own_locked(Buffer& b, const BufferTable::Allocated& a, std::size_t size)
      MBMQ_REQUIRES(mu_);
  // (P6r) Until room_maybe() or the deadline (Errc::TimedOut), per step's WaitPolicy.
  // slot: a pool slot is wanted (returned bits count as room), else an extent.
  Status wait_room(std::uint32_t frees, SpinStep& step, Deadline deadline, bool slot);
  static constexpr std::int64_t kRoomSleepCapNs = 10'000'000;
  // All below: mu_ held.
  // Pops every inbound descriptor: our returned buffers are freed, messages kept in pending.
  // The caller holds consumer_mu_ too.
  void reap_locked() MBMQ_REQUIRES(mu_);
  // (P5) Checks descriptor d against the tables, gathers what it needs from the control socket
  // (through PeerTrust's checks), then commits. Bad: why_bad_ says why.
  Accepted accept(const shm::Desc& d, const Buffer* call_buf, std::uint16_t* call_status)
      MBMQ_REQUIRES(mu_);
  // accept() before counting (#18).
  Accepted accept_one(const shm::Desc& d, const Buffer* call_buf, std::uint16_t* call_status)
      MBMQ_REQUIRES(mu_);
  Accepted accept_lent(const shm::Desc& d) MBMQ_REQUIRES(mu_);
  Accepted accept_back(const shm::Desc& d, const Buffer* call_buf, std::uint16_t* call_status)
      MBMQ_REQUIRES(mu_);
  Accepted bad(const char* why) noexcept MBMQ_REQUIRES(mu_) {
    // The first reason stands: a channel already closed keeps the rule that closed it.
    if (state_.load(std::memory_order_relaxed) == EpState::Open) why_bad_ = why;
    return Accepted::Bad;
  }
  // What a control-socket send's result means. A full socket with descriptors of ours still in
  // the peer's ring: the peer is slow, and reads the packets when it gets to their descriptors:
  // back-pressure, like a full ring (Errc::WouldBlock, nothing sent). Full although it had taken
  // every descriptor we sent *before this send* (`took_all`: tx_.drained() read before it; each
  // packet precedes its descriptor, and the peer reads it before it moves its head past that
  // descriptor, P5): it does not read its control socket at all, and the channel is closed.
  // Judged on drained() after the send instead, a peer that read everything between our full
  // send and the look was taken for one that reads nothing, and a healthy channel was closed
  // (Review.ReplyAndWaitUnderBackPressureNeverTurnsAnAnswerIntoNoReply: 5 of 300 runs under load).
  Status sent_locked(Status s, bool took_all) MBMQ_REQUIRES(mu_);
  // The control socket's sends (Sideband), each judged by sent_locked() against the ring as it
  // was just before the send.
  Status send_extent_locked(std::uint32_t e, std::uint32_t gen, std::uint32_t aux, int fd)
      MBMQ_REQUIRES(mu_) {
    const bool took_all = tx_.drained();
    return sent_locked(ctl_.send_extent(e, gen, aux, fd), took_all);
  }
  Status send_doorbell_locked(std::uint32_t gen, std::uint32_t q, std::span<const int> fds)
      MBMQ_REQUIRES(mu_) {
    const bool took_all = tx_.drained();
    return sent_locked(ctl_.send_doorbell(gen, q, fds), took_all);
  }
  Result<bool> send_handles_locked(BufferId id, std::uint32_t gen, HandlesOf of, const Handles& hs)
      MBMQ_REQUIRES(mu_) {
    const bool took_all = tx_.drained();
    auto sent = ctl_.send_handles(id, gen, of, hs);
    if (!sent) return fail(sent_locked(fail(sent.error()), took_all).error());
    return sent;
  }
  // Reads the control socket until have() holds or nothing is left; a bad packet closes the
  // channel (Errc::Protocol).
  template <class Pred>
  bool drain_locked(Pred have) MBMQ_REQUIRES(mu_) {
    const bool got = ctl_.drain_until(have);
    if (const char* why = ctl_.take_failure()) (void)fail_protocol_locked(why);
    return got;
  }
  // Our buffer back to the pool; a ReleaseExtent hint if the ring has room beyond the reserve.
  void free_own_locked(BufferId id) noexcept MBMQ_REQUIRES(mu_);
  // (P8) The peer is gone: buffers lent to it come back to the pool (a call's to its caller).
  void reclaim_lent_locked() noexcept MBMQ_REQUIRES(mu_) { table_.reclaim_lent(); }
  // (P3b) Whether the handles of Desc d arrived (reading the control socket if needed); claims
  // them if so.
  bool handles_arrived_locked(const shm::Desc& d, HandlesOf of) MBMQ_REQUIRES(mu_);
  // (P5) Maps the peer's extent for Desc d (reading its memfd off the socket if needed).
  const char* map_peer_extent_locked(const shm::Desc& d) MBMQ_REQUIRES(mu_);
  // (P7b) Checks and maps the replacement announced by Reply d; installs nothing.
  const char* prepare_replacement_locked(const shm::Desc& d, os::UniqueFd* fd, os::Mapping* map,
                                         bool* sealed) MBMQ_REQUIRES(mu_);
  void make_message(const shm::Desc& d, Message* out) MBMQ_REQUIRES(mu_);
  // make_message() for a OneWay in a peer's slot that take_peer_slot_one_way() took (trusted end:
  // the bytes are read in place).
  inline void make_slot_message(shm::Desc d, std::uint64_t key, Message* out) MBMQ_REQUIRES(mu_);
  // An empty buffer of another end's, or none: made ours (a reference to us), out of line.
  [[gnu::noinline]] void adopt_buffer(Buffer& b);
  // (P5) The batch path of poll_batch(): up to n messages from the ring (one head store), plain
  // one-way slots checked inline, anything else through accept(). How many were put in out;
  // stops at the first look that finds nothing, and at a protocol error.
  std::size_t take_batch_locked(Message* out, std::size_t n) MBMQ_REQUIRES(mu_);
  // receive_in_place()'s look: the leading plain one-way slots of the ring into `in` (one head
  // store); entries that deliver nothing are consumed on the way (accept()), a message of
  // another kind is set aside and ends the look. How many; *other: something else is next for
  // receive() (messages set aside, an untrusted end's copies, the end of the channel).
  std::size_t take_in_place_locked(InPlace& in, bool* other) MBMQ_REQUIRES(mu_);
  // (P3) The batch path of send_batch(): the leading buffers that are plain one-way messages in
  // our slots (no handles; a trusted end), one ring entry each and one tail store. How many were
  // sent (each parked); the caller sends the rest one by one.
  std::size_t send_slots_locked(std::span<Buffer> bufs) MBMQ_REQUIRES(mu_);
  Poll poll_locked(Message* out) MBMQ_REQUIRES(mu_);
  // Drops every message of ms (as their destructors would); the one-way messages in the peer's
  // slots are given back together (P7r): one lock, one fetch_or.
  void release_batch(std::span<Message> ms) noexcept;
  // wake = false: the caller calls wake_peer_locked() once after a batch.
  Status send_locked(Buffer& b, shm::DescKind kind, OwnState lent_as, bool wake = true)
      MBMQ_REQUIRES(mu_);
  // The control socket is full because the caller is slow (sent_locked): the answer is kept, the
  // buffer stays the application's (still held), and reply() says WouldBlock, to be retried. A
  // packet already sent for this reply (the replacement) is replaced by the retry's (one per id).
  Status keep_for_retry_locked(Buffer& b, std::shared_ptr<Endpoint>&& keep) MBMQ_REQUIRES(mu_);
  Status push_locked(const shm::Desc& d, bool wake = true) MBMQ_REQUIRES(mu_);
  void wake_peer_locked() noexcept MBMQ_REQUIRES(mu_);
  // (P7r) The peer's one-way messages in the slots of `mask` are done with: their bits in
  // `returned` (mask[w] for word w), and a wake of its producer if one waits for room (P6r).
  void give_back_slots(const std::array<std::uint64_t, shm::kReturnedWords>& mask) noexcept;
  // Where the peer's slot id goes in `returned`: its bit (in mask) of word *w.
  std::uint64_t peer_slot_bit(BufferId id, std::uint32_t* w) const noexcept {
    const std::uint32_t k = id.slot_index() - static_cast<std::uint32_t>(1 - side_) * table_slots_;
    *w = k / 64;
    return std::uint64_t{1} << (k % 64);
  }
  // The words of `returned` that name slots of ours (table_slots_ rounded up to 64).
  std::uint32_t returned_words() const noexcept { return (table_slots_ + 63) / 64; }
  // After a Return or a bit in `returned`: wakes the peer's producer if it waits for room.
  void wake_peer_producer() noexcept;
  // (P6r) Wakes our own threads waiting for room (hang-up, close, protocol error, local frees).
  void wake_room() noexcept;
  // Something may have made room since `frees` was read: min_bits returned bits, a local free,
  // the end's state changed.
  bool room_maybe(std::uint32_t frees, std::uint32_t min_bits = 1) const noexcept;
  Error fail_protocol_locked(const char* op) noexcept MBMQ_REQUIRES(mu_);
  void pending_push(const shm::Desc& d) noexcept MBMQ_REQUIRES(mu_);
  bool pending_pop(shm::Desc* d) noexcept MBMQ_REQUIRES(mu_);

  // No lock: waits until the inbound ring may have data, the state changed, or the deadline.
  // WaitFor::Ring: messages already pending do not count (call() waits for its reply in the ring).
  enum class WaitFor : std::uint8_t { Ring, AnyMessage };
  void wait_inbound(Deadline deadline, WaitPolicy policy, WaitFor what);
  bool ring_ready() const noexcept;

  // Removes this end from the peer watcher (before the control socket closes). mu_ held, or the
  // destructor.
  void unwatch() noexcept MBMQ_REQUIRES(mu_);
  void wake_local() noexcept;
  // A buffer handed to another owner: forget it without releasing it.
  static void detach_buffer(Buffer& b) noexcept;
  // The same, but b keeps its reference to its end (invalid, and reset() only drops the
  // reference): the batch paths reuse it, two atomic updates fewer per message.
  static void park_buffer(Buffer& b) noexcept {
    b.origin_ = Buffer::Origin::None;
    b.data_ = nullptr;
    b.size_ = b.capacity_ = 0;
  }

  shm::Segment seg_;
  const int side_;
  shm::Direction& out_;              // we produce
  shm::Direction& in_;               // we consume
  const std::uint32_t table_slots_;  // slots per side (the validated geometry's private copy)

  mutable SpinMutex mu_;
  DeadlineMutex consumer_mu_;
  BufferTable table_ MBMQ_GUARDED_BY(mu_);
  PeerTrust trust_ MBMQ_GUARDED_BY(mu_);
  Sideband ctl_ MBMQ_GUARDED_BY(mu_);
  shm::RingProducer<> tx_ MBMQ_GUARDED_BY(mu_);
  shm::RingConsumer<> rx_;                   // consumer thread; pops under mu_
  PeerBell peer_bell_ MBMQ_GUARDED_BY(mu_);  // (P4q) the peer's queue, once it redirected
  std::uint32_t my_db_gen_ MBMQ_GUARDED_BY(mu_) = 0;
  // Our slot on our queue_ (P4q), while redirected.
  std::uint32_t my_slot_ MBMQ_GUARDED_BY(mu_) = 0;
  std::atomic<std::uint32_t> pending_nonempty_{0};  // !table_.pending().empty(), for waiters
  // (P6r) Our buffers freed (free_own_locked), and our threads asleep waiting for room: a free
  // wakes `room` only when someone sleeps on it.
  std::atomic<std::uint32_t> frees_{0};
  std::atomic<std::uint32_t> room_sleepers_{0};
  bool end_reported_ MBMQ_GUARDED_BY(mu_) = false;
  const char* why_bad_ MBMQ_GUARDED_BY(mu_) = "";

  std::shared_ptr<QueueCore> queue_ MBMQ_GUARDED_BY(mu_);
  std::atomic<std::uint64_t> key_{0};
  std::atomic<bool> redirected_{false};
  std::atomic<EpState> state_{EpState::Open};
  std::weak_ptr<TopicTap> tap_;  // set once before redirect (set_tap), read by poll()
  AtomicWaitPolicy wait_;
  std::atomic<int> watch_pid_{0};
  std::uint64_t watch_id_ MBMQ_GUARDED_BY(mu_) = 0;
  std::shared_ptr<void> lease_;
  // (#18) Written under mu_ by the thread pushing or accepting a descriptor; read by the watcher
  // (ipc/end_counters.h says why relaxed is enough).
  EndCounters counters_;
  std::shared_ptr<ListenTotals> retire_ MBMQ_GUARDED_BY(mu_);
  // Adds counters_ and the end's state before closing (`was`) to retire_, once.
  void retire_locked(EpState was) noexcept MBMQ_REQUIRES(mu_);
};

}  // namespace mbmq::detail
