// ipc/queue_core.h: QueueCore, the process-private half of a MsgQueue (its shared half is the
// QueueBell of ipc/queue_bell.h: the ready page, the wait page, the signal socket). Waiting steps
// P6q of src/shm/layout.h: a look costs O(ready channels), not O(channels).
//
// Each redirected end has a slot q < kQueueCapacity. A look takes the ready bits (exchange to 0)
// into a private FIFO of slots to poll; a slot that delivered a message goes to the back (round
// robin: a busy channel cannot starve the others) and leaves the FIFO when a poll finds it empty.
// The bits are hints any peer can forge or clear: forged ones cost spurious polls; cleared ones
// are caught by a full scan (every end polled) after a wake-up that found no bit, every
// kFullScanEveryNs while looking, and kSafetyNetNs after the queue last looked: a sleep's timeout,
// or, while the owner waits on the fd instead, a timer on the watcher thread that makes the fd
// readable.
//
// Locking: mu_ guards the ends, the FIFO, listeners, deferred replies and the sleepers count.
// Order: the queue's mu_, then an end's mu_ (Endpoint::poll), or a listener's. slot_mu_ guards
// the free slots only and is taken alone or inside mu_ (a leaf). Never held while sleeping.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "ipc/atomic_wait_policy.h"
#include "ipc/endpoint.h"
#include "ipc/peer_watch.h"
#include "ipc/queue_bell.h"
#include "ipc/queue_source.h"
#include "ipc/spin_mutex.h"
#include "mbmq/buffer.h"
#include "mbmq/deadline.h"
#include "mbmq/msg_queue.h"
#include "mbmq/result.h"
#include "os/fd.h"
#include "os/thread_annotations.h"
#include "shm/layout.h"

namespace mbmq::detail {

class ListenCore;

class QueueCore final : public Watched, public std::enable_shared_from_this<QueueCore> {
 public:
  // A full scan at least this often while the queue looks (spinning, or between messages).
  static constexpr std::int64_t kFullScanEveryNs = 10'000'000;
  // A sleep (or an armed fd) lasts at most this long without a look; a full scan follows it.
  // The bound on the delay a peer clearing other channels' bits can cause an idle queue; and the
  // idle cost: one full scan per second (~0.2 ms at 1,000 channels).
  static constexpr std::int64_t kSafetyNetNs = 1'000'000'000;
  // Replies held back by a caller's full control socket are retried this often (its reading does
  // not ring our doorbell).
  static constexpr std::int64_t kRetryNs = 1'000'000;
  // A wake-up that found no ready bit triggers a full scan, at most this often.
  static constexpr std::int64_t kEmptyWakeGapNs = 1'000'000;

  static Result<std::shared_ptr<QueueCore>> make(WaitPolicy policy);
  ~QueueCore();
  QueueCore() = default;
  QueueCore(const QueueCore&) = delete;
  QueueCore& operator=(const QueueCore&) = delete;
  // The fd's safety-net timer expired (watcher thread).
  void on_watch(int fd, std::uint32_t events) noexcept override;

  Result<Message> wait(Deadline deadline);
  // A slot for an end about to be redirected here (Errc::Busy when kQueueCapacity ends are);
  // unreserve() if the redirect fails, else add() once the peer has the doorbell.
  Result<std::uint32_t> reserve();
  void unreserve(std::uint32_t q);
  void add(std::shared_ptr<Endpoint> ep, std::uint32_t q);
  // What travels to the peer of a redirected end (CtlMsg::Doorbell): the pages, and a signal
  // sender of the channel's own.
  int ready_fd() const noexcept { return bell_.ready_fd(); }
  int wait_fd() const noexcept { return bell_.wait_fd(); }
  Result<os::UniqueFd> new_signal_sender() const { return bell_.new_sender(); }
  // Something happened on the end in slot q here (its peer died, it was closed): look at it.
  void notify(std::uint32_t q) noexcept { bell_.ring_local(q); }
  // Listeners whose accepted connections arrive here as Kind::Connection.
  void add_listener(std::shared_ptr<ListenCore> l);
  void remove_listener(const ListenCore* l);
  // Bumps the wake word, wakes every waiter and makes the fd readable, so they look again.
  void poke() noexcept { bell_.poke(); }
  // Sources of messages that are not channel ends here (ipc/queue_source.h: mbmq::net's remote
  // channels). A source is asked on every look, alternately before and after the channel ends.
  void add_source(std::shared_ptr<QueueSource> s);
  // A source stored its ready flag: wakes a sleeping waiter (the producer's half of P6q).
  void wake() noexcept { bell_.wake_after_store(); }
  // MsgQueue::fd(): from the first call on, a wait() that finds nothing arms it (P6q).
  int fd() noexcept;
  std::size_t channel_count() const;
  void set_wait_policy(WaitPolicy p);
  // Lets go of every channel (the MsgQueue handle is being destroyed); its sources in *sources.
  std::vector<std::shared_ptr<Endpoint>> take_all(
      std::vector<std::shared_ptr<QueueSource>>* sources);
  // In a child forked after channels were redirected here: registers them with this process's
  // watcher (once per process).
  void watch_after_fork();
  // A reply that met back-pressure (reply_and_wait): retried by wait() until it goes.
  void defer(Buffer&& b);

  // Test hooks.
  shm::QueueReadyPage& ready_page_for_test() noexcept { return bell_.ready(); }
  std::uint64_t full_scans_for_test() const noexcept {
    return full_scans_.load(std::memory_order_relaxed);
  }

 private:
  // One look: listeners, then the ready bits, then the FIFO. full: queue every end first.
  bool scan_locked(Message* out, bool full) MBMQ_REQUIRES(mu_);
  void harvest_locked() MBMQ_REQUIRES(mu_);
  // One pass over the FIFO: the first message, if any.
  bool poll_fifo_locked(Message* out) MBMQ_REQUIRES(mu_);
  void full_scan_locked() MBMQ_REQUIRES(mu_);
  void enqueue_locked(std::uint32_t q) MBMQ_REQUIRES(mu_);
  void remove_locked(std::uint32_t q) MBMQ_REQUIRES(mu_);
  void set_hot_locked(std::uint32_t q) MBMQ_REQUIRES(mu_);
  // After a message from slot q.
  void got_from_locked(std::uint32_t q) MBMQ_REQUIRES(mu_);
  void retry_deferred_locked() MBMQ_REQUIRES(mu_);
  void publish_locked() noexcept MBMQ_REQUIRES(mu_) {
    bell_.publish(static_cast<std::uint32_t>(sleepers_) | (armed_ ? shm::kQueueArmed : 0u));
  }
  // The fd: nothing was found; drain, arm, fence, look once more.
  bool arm_and_look(Message* out);
  void set_safety_timer_locked() MBMQ_REQUIRES(mu_);
  // Disarms the fd if this thread armed it; whether it did.
  bool disarm_if_armed_here();

  QueueBell bell_;
  mutable SpinMutex mu_;
  std::vector<std::shared_ptr<Endpoint>> by_slot_ MBMQ_GUARDED_BY(mu_);
  std::size_t live_ MBMQ_GUARDED_BY(mu_) = 0;
  // Slots to poll, in order: a ring of by_slot_.size() entries (a slot is in it at most once, so
  // it never overflows, and the message path never allocates).
  std::vector<std::uint32_t> fifo_ MBMQ_GUARDED_BY(mu_);
  std::size_t fifo_head_ MBMQ_GUARDED_BY(mu_) = 0;
  std::size_t fifo_count_ MBMQ_GUARDED_BY(mu_) = 0;
  std::vector<std::uint8_t> queued_ MBMQ_GUARDED_BY(mu_);  // by slot: in fifo_
  std::int64_t last_full_scan_ns_ MBMQ_GUARDED_BY(mu_) = 0;
  std::uint32_t looks_ MBMQ_GUARDED_BY(mu_) = 0;
  bool full_pending_ MBMQ_GUARDED_BY(mu_) = false;  // a full scan held back by kEmptyWakeGapNs
  // The hot slot (QueueWaitPage::hot): polled on every look; its producer does not mark it.
  static constexpr std::uint32_t kNone = 0xffff'ffffu;
  std::uint32_t hot_ MBMQ_GUARDED_BY(mu_) = kNone;
  std::uint32_t last_got_ MBMQ_GUARDED_BY(mu_) = kNone;  // the slot of the last message
  std::atomic<std::uint64_t> full_scans_{0};
  std::vector<std::shared_ptr<ListenCore>> listeners_ MBMQ_GUARDED_BY(mu_);
  std::vector<std::shared_ptr<QueueSource>> sources_ MBMQ_GUARDED_BY(mu_);
  std::size_t next_source_ MBMQ_GUARDED_BY(mu_) = 0;  // round robin among the sources
  bool sources_first_ MBMQ_GUARDED_BY(mu_) = false;   // alternates: sources, then channel ends
  // One look at the sources (round robin): the first message, if any.
  bool poll_sources_locked(Message* out) MBMQ_REQUIRES(mu_);
  int sleepers_ MBMQ_GUARDED_BY(mu_) = 0;
  bool armed_ MBMQ_GUARDED_BY(mu_) = false;
  std::thread::id armed_by_ MBMQ_GUARDED_BY(mu_);  // the thread whose wait() armed the fd
  std::atomic<bool> armed_hint_{false};            // armed_, read without the lock
  std::atomic<bool> fd_used_{false};
  // The fd's safety net (kSafetyNetNs): a timerfd the watcher thread watches, set when the fd is
  // armed with channels here and not already pending; when it fires, safety_due_ and the fd.
  os::UniqueFd timer_;
  std::uint64_t timer_watch_ MBMQ_GUARDED_BY(mu_) = 0;
  int timer_pid_ MBMQ_GUARDED_BY(mu_) = 0;  // the process whose watcher has the timer
  std::atomic<bool> timer_pending_{false};
  std::atomic<bool> timer_is_retry_{false};  // set for kRetryNs (deferred replies), not the net
  std::atomic<bool> safety_due_{false};
  // Free slots (slot_mu_): never reused while an end holds them.
  SpinMutex slot_mu_;
  std::vector<std::uint32_t> free_slots_ MBMQ_GUARDED_BY(slot_mu_);
  std::uint32_t next_slot_ MBMQ_GUARDED_BY(slot_mu_) = 0;
  AtomicWaitPolicy policy_{WaitPolicy{}};  // read on every wait, without the lock
  std::atomic<int> watch_pid_{0};          // the process whose watcher knows every end here
  // Replies held back by their callers' full control sockets (at most one per request held).
  std::vector<Buffer> deferred_ MBMQ_GUARDED_BY(mu_);
  std::atomic<std::size_t> deferred_count_{0};  // deferred_.size(), read without the lock
};

// mbmq::net's redirect: the queue behind a MsgQueue handle.
struct QueueAccess {
  static const std::shared_ptr<QueueCore>& core(const MsgQueue& q) noexcept { return q.core_; }
};

}  // namespace mbmq::detail
