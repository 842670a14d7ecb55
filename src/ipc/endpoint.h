// ipc/endpoint.h: one end of a channel: the private state that makes the shared segment safe to
// use against a peer that may be buggy or hostile, and the protocol steps P2-P8 of
// src/shm/layout.h. Channel, Buffer and MsgQueue are thin handles over it.
//
// Locking: mu_ guards the producer ring index, the consumer ring index, the ownership tables and
// the control socket. It is uncontended on the usual paths (one caller thread, or one queue
// waiter), never held across a sleep, and never across a blocking system call: the control socket
// is written without blocking (a peer that lets it fill has its channel closed, see
// send_ctl_locked). consumer_mu_ serializes call()/receive() on an end that is not redirected; it
// IS held while its holder sleeps for the reply, so a second caller sleeps on it (DeadlineMutex)
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
#include "ipc/deadline_mutex.h"
#include "ipc/handles.h"
#include "ipc/peer_watch.h"
#include "ipc/spin_mutex.h"
#include "mbmq/buffer.h"
#include "mbmq/deadline.h"
#include "mbmq/msg_queue.h"
#include "mbmq/result.h"
#include "mbmq/wait_policy.h"
#include "os/fd.h"
#include "os/mapping.h"
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

// Handle fds a peer may have parked in our stash (sent ahead of the descriptors naming them).
inline constexpr std::uint32_t kMaxStashedHandleFds = 128;
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
  Status grow(Buffer& b, std::size_t n);
  void release(Buffer& b) noexcept;  // from ~Buffer / Buffer::reset

  // (P3)-(P7) Sending.
  Status call(Buffer& b, Deadline deadline);
  Status send(Buffer&& b, shm::DescKind kind);  // OneWay, or Request answered through the queue
  Status reply(Buffer&& b);
  // Replies through whichever endpoint `b` belongs to (MsgQueue::reply).
  static Status reply_message(Buffer&& b);

  // Receiving, for an end that is not redirected.
  Result<Message> receive(Deadline deadline);

  // Receiving through a queue: one thread at a time (the queue's mutex).
  enum class Poll { Got, Empty, Ended, Gone };
  // Got: *out is a message. Ended: the channel is over and drained, *out is the final
  // Kind::PeerClosed. Gone: closed locally, drop it silently.
  Poll poll(Message* out);
  // (P6) Before sleeping, by the consumer: false (and the channel closed with a protocol error)
  // if the peer's published tail contradicts the ring.
  bool check_ring() noexcept;
  // Sets consumer_sleeping on the inbound direction (P6), for the queue's waiters.
  void set_consumer_sleeping(bool sleeping) noexcept;

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
  bool untrusted() const noexcept { return untrusted_me_; }
  // Something to destroy with this end (a listener's connection count). Set once, before use.
  void set_lease(std::shared_ptr<void> lease) noexcept { lease_ = std::move(lease); }

  // Moving an end to another process (ipc/transfer.cc). export_end: the end must be quiet (not
  // redirected, no buffers out or held, nothing pending: Errc::Busy); fills its state and
  // duplicates its two fds; the caller then closes this end. import_end validates all of it.
  // doorbell (the peer's queue doorbell page, if meta.doorbell_gen != 0) is optional.
  Status export_end(shm::HandleMeta* meta, os::UniqueFd* seg, os::UniqueFd* ctl,
                    os::UniqueFd* doorbell);
  static Result<std::shared_ptr<Endpoint>> import_end(const shm::HandleMeta& meta, os::UniqueFd seg,
                                                      os::UniqueFd ctl, os::UniqueFd doorbell,
                                                      WaitPolicy wait);

  // The file and offset behind buffer b's bytes (its slot in the segment memfd, or its extent's
  // memfd), for send_buffer(); false if b is not this end's, or its bytes are private memory.
  bool backing(const Buffer& b, int* fd, std::uint64_t* offset) const;

  // Test hooks: the raw segment (for the scribbling tests) and counts.
  std::byte* segment_base() const noexcept { return seg_.base(); }
  std::size_t segment_size() const noexcept { return seg_.geometry().segment_size; }
  int control_fd_for_test() const noexcept { return control_.get(); }
  // The memfd behind our extent buffer b (-1 if b is not one of our extents).
  int extent_fd_for_test(const Buffer& b) const;
  // Plays a forging sender: sends `fd` as our extent 0 at `gen` (CtlMsg aux `aux`), then a
  // Request descriptor naming it with `size` bytes.
  Status forge_extent_request_for_test(int fd, std::uint32_t gen, std::uint32_t size,
                                       std::uint32_t aux);

 private:
  explicit Endpoint(Init init);

  enum class OwnState : std::uint8_t { Free, App, LentCall, LentRequest, LentOneWay, Abandoned };
  struct OwnSlot {
    OwnState state = OwnState::Free;
    std::uint32_t gen = 0;
  };
  struct OwnExtent {
    OwnState state = OwnState::Free;
    std::uint32_t gen = 0;
    std::uint32_t sent_gen = 0;  // the peer has this extent's fd at this generation
    os::UniqueFd fd;
    os::Mapping map;  // shared read-write; copy-on-write once sealed (P3c)
    bool sealed = false;
    std::vector<std::byte> shadow;  // untrusted ends: the private copy of a reply (P5b)
  };
  struct PeerExtent {
    std::uint32_t gen = 0;
    bool held = false;
    os::UniqueFd fd;  // kept with the mapping: egress (send_buffer) and untrusted replies use it
    os::Mapping map;  // shared read-write; read-only for untrusted ends; copy-on-write if sealed
    bool sealed = false;
    std::vector<std::byte> shadow;  // untrusted ends: the private copy of the payload (P5b)
    // (P7b) A replacement for this generation is on the control socket, its reply not yet sent
    // (a reply retried after back-pressure): not sent twice.
    std::uint32_t replaced_gen = 0;
  };
  struct Stashed {  // an fd received on the control socket, not yet used
    os::UniqueFd fd;
    std::uint32_t gen = 0;
    bool sealed = false;  // announced with kExtentSealed (checked when used)
  };
  // Whose buffer a handles packet rides on: a message of the sender's, or the reply in ours.
  enum class HandlesOf : std::uint8_t { Message, Reply };
  // What accept() made of a descriptor (P5).
  enum class Accepted { Deliver, Internal, CallDone, Bad };

  Result<Buffer> alloc_once(std::size_t size);
  // All below: mu_ held.
  // Pops every inbound descriptor: our returned buffers are freed, messages kept in pending_.
  // The caller holds consumer_mu_ too.
  void reap_locked();
  // Bad: why_bad_ says why.
  Accepted accept(const shm::Desc& d, const Buffer* call_buf, std::uint16_t* call_status);
  Accepted bad(const char* why) noexcept {
    // The first reason stands: a channel already closed keeps the rule that closed it.
    if (state_.load(std::memory_order_relaxed) == EpState::Open) why_bad_ = why;
    return Accepted::Bad;
  }
  // (P3b) Sends b's outgoing handles on the control socket (ring room already checked); false if
  // it has none to send.
  Result<bool> send_handles_locked(Buffer& b, HandlesOf of);
  // Sends one control message without blocking (mu_ held). A full socket means the peer does
  // not read it: the channel is closed with Errc::Protocol.
  Status send_ctl_locked(std::span<const std::byte> bytes, std::span<const int> fds);
  // Reads one control message into the stashes; false if none (or the channel was closed for
  // it). drain_until() reads until `have()` holds or nothing is left: never further than needed.
  bool read_control_once();
  template <class Pred>
  bool drain_until(Pred have) {
    for (std::uint32_t i = 0; !have(); ++i)
      if (i >= 4 * shm::kRingCapacity || !read_control_once()) return have();
    return true;
  }
  std::uint32_t take_extent_gen_locked() noexcept {
    const std::uint32_t g = next_extent_gen_;
    next_extent_gen_ = g + 1 == 0 ? 1 : g + 1;  // 0 means "never sent" (OwnExtent::sent_gen)
    return g;
  }
  // (P8) The peer is gone: buffers lent to it come back to the pool (a call's to its caller).
  void reclaim_lent_locked() noexcept;
  // (P3b) Whether the handles of Desc d are stashed (reading the control socket if needed).
  bool handles_arrived_locked(const shm::Desc& d, HandlesOf of);
  // Takes the stashed handles of Desc d out of the stash.
  HandlesPtr take_handles_locked(const shm::Desc& d, HandlesOf of);
  void make_message(const shm::Desc& d, Message* out);
  OwnSlot* own_slot(std::uint32_t id) noexcept;
  std::uint32_t own_capacity(std::uint32_t id) const noexcept;
  std::byte* own_data(std::uint32_t id) const noexcept;
  void free_own(std::uint32_t id) noexcept;
  OwnState* own_state(std::uint32_t id) noexcept;
  // Checks an extent memfd the peer sent (P5, P5b, P7b): sealed against shrinking, immutable if
  // announced so, a sane size; maps it (immutable: copy-on-write; else unsealed_access).
  // nullptr, or why not.
  // Populates the mapping as far as `payload` bytes only.
  static const char* map_extent_fd(int fd, bool announced_sealed, os::Access unsealed_access,
                                   std::uint32_t payload, os::Mapping* map, bool* sealed);
  // (P5) Maps the peer's extent for Desc (e, gen, size); nullptr, or why it is invalid.
  const char* map_peer_extent(std::uint32_t e, std::uint32_t gen, std::uint32_t size);
  // ---- trust (P3c, P5b, P7b) ----
  bool shadowed(const Buffer& b) const noexcept;  // b.data_ is a private copy
  std::byte* slot_shadow(std::uint32_t id) const noexcept {
    return slot_shadow_.get() + std::size_t{id} * slot_size_;
  }
  // Our extent x gets a fresh memfd of `cap` bytes holding `size` bytes of src, unsealed. On
  // failure x is unchanged.
  Status fresh_extent_locked(OwnExtent& x, const std::byte* src, std::size_t size, std::size_t cap);
  // Makes our extent x immutable (P3c), through a fresh one if needed. On failure x is mapped
  // again if at all possible (x.map.valid() says whether its bytes are still reachable).
  Status seal_extent_locked(OwnExtent& x, std::size_t size);
  Status seal_unmapped_locked(OwnExtent& x, std::size_t cap, std::size_t size);
  // Before sending our buffer b: copies a private copy back, seals or refreshes its extent, and
  // points b at the result.
  Status prepare_send_locked(Buffer& b);
  // (P7b) Sends the answer in a fresh memfd replacing the peer's extent e at gen.
  Status send_replacement_locked(std::uint32_t e, std::uint32_t gen, const std::byte* src,
                                 std::uint32_t size);
  // (P7b) Checks and maps the replacement announced by Reply d into *fd/*map; installs nothing
  // (accept() installs it once every check of the descriptor passed). nullptr or why not.
  const char* prepare_replacement_locked(const shm::Desc& d, os::UniqueFd* fd, os::Mapping* map,
                                         bool* sealed);
  // After a reply: points b at our buffer's bytes, or (untrusted) at a private copy of them.
  void own_view_locked(Buffer& b, std::uint32_t size);
  Status send_locked(Buffer& b, shm::DescKind kind, OwnState lent_as);
  Status push_locked(const shm::Desc& d);
  void wake_peer_locked() noexcept;
  Error fail_protocol_locked(const char* op) noexcept;
  void pending_push(const shm::Desc& d) noexcept;
  bool pending_pop(shm::Desc* d) noexcept;

  // No lock: waits until the inbound ring may have data, the state changed, or the deadline.
  // WaitFor::Ring: messages already pending do not count (call() waits for its reply in the ring).
  enum class WaitFor : std::uint8_t { Ring, AnyMessage };
  void wait_inbound(Deadline deadline, WaitPolicy policy, WaitFor what);
  bool inbound_ready() const noexcept;
  bool ring_ready() const noexcept;

  // Removes this end from the peer watcher (before control_ closes). mu_ held, or the destructor.
  void unwatch() noexcept;
  void wake_local() noexcept;
  // A buffer handed to another owner: forget it without releasing it.
  static void detach_buffer(Buffer& b) noexcept;

  shm::Segment seg_;
  const int side_;
  const std::uint32_t n_;  // slots per side (private copy of the validated geometry)
  const std::uint32_t slot_size_;
  shm::Direction& out_;  // we produce
  shm::Direction& in_;   // we consume

  mutable SpinMutex mu_;
  DeadlineMutex consumer_mu_;
  os::UniqueFd control_;                                    // guarded by mu_
  shm::RingProducer<> tx_;                                  // guarded by mu_
  shm::RingConsumer<> rx_;                                  // consumer thread; pops under mu_
  std::array<OwnSlot, shm::kMaxSlotsPerSide> own_slots_{};  // guarded by mu_
  std::vector<std::uint32_t> free_slots_;                   // guarded by mu_ (reserved at make)
  std::array<OwnExtent, shm::kMaxExtents> own_ext_{};       // guarded by mu_
  std::vector<std::uint32_t> free_ext_;                     // guarded by mu_
  std::uint32_t next_extent_gen_;                           // guarded by mu_
  std::array<bool, shm::kMaxSlotsPerSide> peer_held_{};     // guarded by mu_
  std::array<PeerExtent, shm::kMaxExtents> peer_ext_{};     // guarded by mu_
  std::array<Stashed, shm::kMaxExtents> stash_ext_{};       // guarded by mu_
  std::array<Stashed, shm::kMaxExtents> stash_replace_{};   // guarded by mu_ (P7b)
  const bool untrusted_me_;    // we copy, or require sealed, what the peer sends (P5b)
  const bool untrusted_peer_;  // the peer does: we seal what we send above the threshold (P3c)
  const std::uint32_t copy_threshold_;
  std::unique_ptr<std::byte[]> slot_shadow_;  // untrusted_me_: a private copy per slot (2n)
  Stashed stash_doorbell_;                    // guarded by mu_
  std::uint32_t peer_db_gen_ = 0;             // guarded by mu_
  os::UniqueFd peer_db_fd_;      // guarded by mu_: kept to hand over with the end (export_end)
  os::Mapping peer_db_map_;      // guarded by mu_
  std::uint32_t my_db_gen_ = 0;  // guarded by mu_
  // Descs accepted by call() that are not its reply: delivered later by receive()/poll(). Each
  // names a distinct buffer, so 2 * (slots + extents) entries always suffice.
  std::array<shm::Desc, 2 * (shm::kMaxSlotsPerSide + shm::kMaxExtents)> pending_{};  // mu_
  std::uint32_t pending_head_ = 0, pending_count_ = 0;                               // mu_
  std::atomic<std::uint32_t> pending_nonempty_{0};
  bool end_reported_ = false;  // guarded by mu_
  struct StashedHandles {      // (P3b) received, not yet given to a buffer
    std::uint32_t id = 0, gen = 0;
    bool reply = false;
    std::uint32_t fds = 0;
    bool claimed = false;  // its descriptor was accepted: waits for make_message()/call()
    HandlesPtr h;
  };
  std::vector<StashedHandles> stash_handles_;  // guarded by mu_
  // guarded by mu_: fds and packets in stash_handles_ not yet claimed by an accepted descriptor
  // (the peer budget: what it sent ahead), bounded by kMaxStashedHandleFds and 2*(n+extents).
  std::uint32_t stash_handle_fds_ = 0;
  std::uint32_t stash_unclaimed_ = 0;
  std::uint32_t requests_out_ = 0;  // guarded by mu_: our requests not yet answered
  std::uint32_t requests_in_ = 0;   // guarded by mu_: the peer's requests we hold
  const char* why_bad_ = "";        // guarded by mu_

  std::shared_ptr<QueueCore> queue_;  // guarded by mu_
  std::atomic<std::uint64_t> key_{0};
  std::atomic<bool> redirected_{false};
  std::atomic<EpState> state_{EpState::Open};
  AtomicWaitPolicy wait_;
  std::atomic<int> watch_pid_{0};
  std::uint64_t watch_id_ = 0;  // guarded by mu_
  std::shared_ptr<void> lease_;
};

}  // namespace mbmq::detail
