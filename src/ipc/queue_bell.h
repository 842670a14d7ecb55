// ipc/queue_bell.h: a MsgQueue's doorbell, both halves (P4q/P6q of src/shm/layout.h).
//   - QueueBell, the queue's own: the ready page (read-write for everyone), the wait page (written
//     by the queue only; peers can map it read-only), and the signal receiver, MsgQueue::fd() (a
//     datagram socket; each channel's peer gets a sender of its own, connected to it).
//   - PeerBell, a producer's view of its peer's queue: the pages mapped after the seal checks, the
//     signal socket, and the slot of its channel; ring() is P4q.
// Neither takes a lock: QueueBell's sleepers word is written under the queue's mutex by its
// caller; PeerBell is used under the endpoint's.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>

#include "mbmq/result.h"
#include "os/fd.h"
#include "os/mapping.h"
#include "os/unix_socket.h"
#include "shm/layout.h"

namespace mbmq::detail {

// The three fds of a queue doorbell as they travel (CtlMsg::Doorbell, a ChannelEnd handle).
struct BellFds {
  os::UniqueFd ready;   // QueueReadyPage memfd
  os::UniqueFd wait;    // QueueWaitPage memfd
  os::UniqueFd signal;  // a datagram socket connected to the queue's signal receiver
  explicit operator bool() const noexcept { return static_cast<bool>(ready); }
  std::array<int, shm::kDoorbellFds> raw() const noexcept {
    return {ready.get(), wait.get(), signal.get()};
  }
  Result<BellFds> dup() const;
};

// P4q step 1: marks slot q ready, then the seq_cst fence.
void mark_ready(shm::QueueReadyPage& page, std::uint32_t q) noexcept;
// P4q step 2, after mark_ready(): wakes what `sleepers` says is waiting.
void wake_queue(shm::QueueReadyPage& page, std::uint32_t sleepers, int signal_fd) noexcept;

class QueueBell {
 public:
  static Result<QueueBell> make();

  shm::QueueReadyPage& ready() const noexcept { return *ready_; }
  // The queue's waiters (under its mutex): bits 0-30 asleep, kQueueArmed. A relaxed store: the
  // caller fences (P6q).
  void publish(std::uint32_t sleepers) noexcept {
    wait_->sleepers.store(sleepers, std::memory_order_relaxed);
  }
  std::uint32_t sleepers() const noexcept {
    return wait_->sleepers.load(std::memory_order_relaxed);
  }
  // The slot polled on every look (q + 1; 0: none), then the seq_cst fence (P6q).
  void publish_hot(std::uint32_t hot_plus_one) noexcept {
    wait_->hot.store(hot_plus_one, std::memory_order_relaxed);
    std::atomic_thread_fence(std::memory_order_seq_cst);
  }
  // The pages' fds, for a producer (CtlMsg::Doorbell, with a sender of new_sender()).
  int ready_fd() const noexcept { return ready_fd_.get(); }
  int wait_fd() const noexcept { return wait_fd_.get(); }
  // A sender of the channel's own: a peer that shuts its sender down silences itself only.
  Result<os::UniqueFd> new_sender() const { return os::dgram_sender_to(signal_rx_.get()); }
  // MsgQueue::fd(): readable while the socket holds a byte.
  int signal_fd() const noexcept { return signal_rx_.get(); }
  // Marks q (a local event on that channel: its peer's death, a local close) and wakes as a
  // producer would.
  void ring_local(std::uint32_t q) noexcept {
    mark_ready(*ready_, q);
    wake_queue(*ready_, sleepers(), signal_tx_.get());
  }
  // Wakes every sleeping waiter and makes the fd readable (listeners, redirect, poke()).
  void poke() noexcept;
  // Empties the signal receiver (one recv per datagram, one more to see it empty).
  void drain() noexcept;
  // Makes the fd readable from here (a message found after draining: the level must stay).
  void signal_self() noexcept;
  // P4q step 2 for a producer in this process that has stored its ready flag (a QueueSource,
  // ipc/queue_source.h): seq_cst fence, then wakes what `sleepers` says waits (one futex waiter,
  // the armed fd). No system call when nobody sleeps.
  void wake_after_store() noexcept;

 private:
  os::UniqueFd ready_fd_, wait_fd_, signal_tx_, signal_rx_;
  os::Mapping ready_map_, wait_map_;
  shm::QueueReadyPage* ready_ = nullptr;
  shm::QueueWaitPage* wait_ = nullptr;
};

class PeerBell {
 public:
  // Checks the three fds (memfds of a page sealed against shrinking; a Unix datagram socket) and
  // q < kQueueCapacity, and maps the pages: nullptr, or why not (the peer's fault: a protocol
  // error). A local mmap failure returns nullptr and leaves this bell closed (the peer's queue is
  // then never woken: the caller's problem is not the peer's).
  const char* open(BellFds fds, std::uint32_t gen, std::uint32_t q);
  bool is_open() const noexcept { return ready_ != nullptr; }
  std::uint32_t gen() const noexcept { return gen_; }
  std::uint32_t slot() const noexcept { return slot_; }
  const BellFds& fds() const noexcept { return fds_; }
  // P4q, after the descriptor was pushed.
  void ring() noexcept {
    // Step 0. Orders our ring entry before the loads below; pairs with the queue's fence after
    // it publishes hot or sleepers: either it polls our ring after, or we see what it published.
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (wait_->hot.load(std::memory_order_relaxed) != slot_ + 1) mark_ready(*ready_, slot_);
    wake_queue(*ready_, wait_->sleepers.load(std::memory_order_relaxed), fds_.signal.get());
  }

 private:
  BellFds fds_;
  os::Mapping ready_map_, wait_map_;
  shm::QueueReadyPage* ready_ = nullptr;
  const shm::QueueWaitPage* wait_ = nullptr;
  std::uint32_t gen_ = 0;
  std::uint32_t slot_ = 0;
};

}  // namespace mbmq::detail
