// MsgQueue and its private half, QueueCore (waiting steps P4/P6 of src/shm/layout.h).
#include "mbmq/msg_queue.h"

#include <algorithm>

#include "ipc/endpoint.h"
#include "ipc/foreign_channel.h"
#include "ipc/listener_core.h"
#include "ipc/queue_core.h"
#include "ipc/wait_step.h"
#include "os/epoll.h"
#include "os/mutex.h"
#include "os/process.h"
#include "os/timer.h"

namespace mbmq {
namespace detail {

Result<std::shared_ptr<QueueCore>> QueueCore::make(WaitPolicy policy) {
  auto q = std::make_shared<QueueCore>();
  q->bell_ = MBMQ_TRY(QueueBell::make());
  q->policy_.store(policy);
  q->watch_pid_.store(os::current_pid(), std::memory_order_relaxed);
  return q;
}

Result<std::uint32_t> QueueCore::reserve() {
  os::LockGuard lock(slot_mu_);
  if (!free_slots_.empty()) {
    const std::uint32_t q = free_slots_.back();
    free_slots_.pop_back();
    return q;
  }
  if (next_slot_ >= shm::kQueueCapacity)
    return fail(Errc::Busy, "redirect: the queue holds kQueueCapacity (16384) channels already");
  return next_slot_++;
}

void QueueCore::unreserve(std::uint32_t q) {
  os::LockGuard lock(slot_mu_);
  free_slots_.push_back(q);
}

void QueueCore::add(std::shared_ptr<Endpoint> ep, std::uint32_t q) {
  {
    os::LockGuard lock(mu_);
    if (by_slot_.size() <= q) {
      // Grows geometrically (adding stays cheap); the ring keeps its order.
      const std::size_t n = std::max<std::size_t>(q + 1, 2 * by_slot_.size());
      std::vector<std::uint32_t> ring(n);
      for (std::size_t k = 0; k < fifo_count_; ++k)
        ring[k] = fifo_[(fifo_head_ + k) % fifo_.size()];
      fifo_ = std::move(ring);
      fifo_head_ = 0;
      by_slot_.resize(n);
      queued_.resize(n, 0);
    }
    by_slot_[q] = std::move(ep);
    ++live_;
  }
  // Whatever came before it was installed is looked at.
  bell_.ring_local(q);
}

void QueueCore::set_hot_locked(std::uint32_t q) {
  const std::uint32_t old = hot_;
  hot_ = q;
  bell_.publish_hot(q == kNone ? 0 : q + 1);
  // The old hot slot's producer may have skipped its bit before it saw the change: one more poll
  // of its ring, after the fence publish_hot() made (P4q step 0).
  if (old != kNone) enqueue_locked(old);
}

void QueueCore::got_from_locked(std::uint32_t q) {
  // Two messages in a row from one channel make it hot: a single busy client then costs what a
  // channel without a queue costs (no bitmap traffic), and many busy ones change nothing.
  if (q == last_got_ && q != hot_) set_hot_locked(q);
  last_got_ = q;
}

void QueueCore::remove_locked(std::uint32_t q) {
  if (q == hot_) set_hot_locked(kNone);
  if (q == last_got_) last_got_ = kNone;
  by_slot_[q].reset();
  --live_;
  os::LockGuard lock(slot_mu_);
  free_slots_.push_back(q);
}

void QueueCore::add_listener(std::shared_ptr<ListenCore> l) {
  os::LockGuard lock(mu_);
  listeners_.push_back(std::move(l));
}

void QueueCore::add_source(std::shared_ptr<QueueSource> s) {
  os::LockGuard lock(mu_);
  sources_.push_back(std::move(s));
}

bool QueueCore::poll_sources_locked(Message* out) {
  // Each source once, from where the last look stopped: one busy source does not hide another.
  for (std::size_t n = sources_.size(); n != 0 && !sources_.empty(); --n) {
    if (next_source_ >= sources_.size()) next_source_ = 0;
    QueueSource& src = *sources_[next_source_];
    if (!src.maybe_ready()) {
      ++next_source_;
      continue;
    }
    const QueueSource::Take t = src.take(out);
    if (t == QueueSource::Take::Got) {
      ++next_source_;
      return true;
    }
    if (t == QueueSource::Take::Gone) {
      sources_[next_source_] = std::move(sources_.back());
      sources_.pop_back();
      continue;
    }
    ++next_source_;
  }
  return false;
}

void QueueCore::remove_listener(const ListenCore* l) {
  os::LockGuard lock(mu_);
  std::erase_if(listeners_, [l](const auto& p) { return p.get() == l; });
}

QueueCore::~QueueCore() {
  os::LockGuard lock(mu_);
  if (timer_watch_ != 0 && timer_pid_ == os::current_pid()) unwatch_fd(timer_watch_, timer_.get());
}

void QueueCore::on_watch(int /*fd*/, std::uint32_t /*events*/) noexcept {
  os::drain_timer(timer_.get());
  timer_pending_.store(false, std::memory_order_relaxed);
  // Still armed: the owner is (probably) in epoll on the fd; make it look, everywhere.
  if (armed_hint_.load(std::memory_order_relaxed)) {
    if (!timer_is_retry_.load(std::memory_order_relaxed))
      safety_due_.store(true, std::memory_order_relaxed);
    bell_.signal_self();
  }
}

void QueueCore::set_safety_timer_locked() {
  if (live_ == 0 && deferred_count_.load(std::memory_order_relaxed) == 0) return;
  const int pid = os::current_pid();
  if (timer_pid_ != pid) {
    // A forked child inherits the parent's pending flag, not its watcher's registration.
    timer_pending_.store(false, std::memory_order_relaxed);
    // First use (or first in a forked child): a timer of this process's own, on its watcher.
    auto t = os::make_timer();
    if (!t) return;  // no safety net: only a hostile peer's cleared bits would wait longer
    // Set before the watcher can see it (on_watch reads timer_ without our lock). A parent's copy
    // stays registered with the parent's watcher only.
    timer_ = std::move(*t);
    auto id = watch_fd(std::weak_ptr<Watched>(weak_from_this()), timer_.get(),
                       WatchSpec{os::kEpollIn, false, 0});
    if (!id) return;
    timer_watch_ = *id;
    timer_pid_ = pid;
  }
  // Soon rather than at the safety net: a full scan held back by kEmptyWakeGapNs (it is due in
  // under a millisecond), or replies deferred by back-pressure (retried every millisecond, as on
  // the sleeping path; no full scan for them).
  const bool soon = full_pending_ || deferred_count_.load(std::memory_order_relaxed) != 0;
  if (timer_pending_.load(std::memory_order_relaxed) && !soon) return;
  timer_is_retry_.store(!full_pending_ && soon, std::memory_order_relaxed);
  if (os::arm_timer_once(timer_.get(), soon ? kRetryNs : kSafetyNetNs))
    timer_pending_.store(true, std::memory_order_relaxed);
}

int QueueCore::fd() noexcept {
  fd_used_.store(true, std::memory_order_relaxed);
  return bell_.signal_fd();
}

std::vector<std::shared_ptr<Endpoint>> QueueCore::take_all(
    std::vector<std::shared_ptr<QueueSource>>* sources) {
  os::LockGuard lock(mu_);
  listeners_.clear();
  sources->swap(sources_);
  std::vector<std::shared_ptr<Endpoint>> eps;
  for (auto& ep : by_slot_)
    if (ep) eps.push_back(std::move(ep));
  if (hot_ != kNone) set_hot_locked(kNone);
  last_got_ = kNone;
  by_slot_.clear();
  queued_.clear();
  fifo_.clear();
  fifo_head_ = 0;
  fifo_count_ = 0;
  live_ = 0;
  return eps;
}

std::size_t QueueCore::channel_count() const {
  os::LockGuard lock(mu_);
  std::size_t n = live_;
  for (const auto& src : sources_) n += src->channel_count();  // remote channels (mbmq::net)
  return n;
}

void QueueCore::set_wait_policy(WaitPolicy p) { policy_.store(p); }

void QueueCore::enqueue_locked(std::uint32_t q) {
  if (q >= by_slot_.size() || !by_slot_[q] || queued_[q] != 0) return;
  queued_[q] = 1;
  fifo_[(fifo_head_ + fifo_count_++) % fifo_.size()] = q;
}

void QueueCore::harvest_locked() {
  // (P6q) Only words a relaxed load saw non-zero are exchanged: an idle queue reads one cache
  // line per look and writes nothing.
  shm::QueueReadyPage& page = bell_.ready();
  for (std::uint32_t w = 0; w < std::size(page.summary); ++w) {
    if (page.summary[w].load(std::memory_order_relaxed) == 0) continue;
    // Acquire: pairs with the producers' acq_rel fetch_or (after their ring entries).
    std::uint64_t s = page.summary[w].exchange(0, std::memory_order_acquire);
    while (s != 0) {
      const std::uint32_t i = w * 64 + static_cast<std::uint32_t>(__builtin_ctzll(s));
      s &= s - 1;
      std::uint64_t r = page.ready[i].exchange(0, std::memory_order_acquire);
      while (r != 0) {
        enqueue_locked(i * 64 + static_cast<std::uint32_t>(__builtin_ctzll(r)));
        r &= r - 1;
      }
    }
  }
}

void QueueCore::full_scan_locked() {
  // Every end, in slot order after those already queued. A peer that cleared other channels'
  // bits delays them until here, never longer.
  for (std::uint32_t q = 0; q < by_slot_.size(); ++q) {
    if (!by_slot_[q]) continue;
    // Garbage that reads as "nothing there" must not hide a broken channel: the poll below
    // reports it (its end is closed with a protocol error).
    (void)by_slot_[q]->check_ring();
    enqueue_locked(q);
  }
  last_full_scan_ns_ = monotonic_ns();
  full_pending_ = false;
  full_scans_.fetch_add(1, std::memory_order_relaxed);
}

bool QueueCore::scan_locked(Message* out, bool full_if_empty) {
  // New connections first: they are rare, and a client waits on its connect().
  for (std::size_t k = 0; k < listeners_.size();) {
    if (!listeners_[k]->maybe_ready()) {
      ++k;
      continue;
    }
    ListenCore::Take t = listeners_[k]->take(out);
    if (t == ListenCore::Take::Got) return true;
    if (t == ListenCore::Take::Gone) {
      listeners_[k] = std::move(listeners_.back());
      listeners_.pop_back();
      continue;
    }
    ++k;
  }
  if ((++looks_ & 255) == 0 && live_ != 0 &&
      monotonic_ns() - last_full_scan_ns_ >= kFullScanEveryNs)
    full_scan_locked();
  harvest_locked();
  if (hot_ != kNone) enqueue_locked(hot_);
  // Sources (remote channels) and channel ends take turns at being asked first: a flood from
  // either side cannot starve the other.
  if (!sources_.empty()) {
    sources_first_ = !sources_first_;
    if (sources_first_ && poll_sources_locked(out)) return true;
    if (poll_fifo_locked(out)) return true;
    if (!sources_first_ && poll_sources_locked(out)) return true;
  } else if (poll_fifo_locked(out)) {
    return true;
  }
  if ((full_if_empty || full_pending_) && live_ != 0) {
    // A wake-up that found nothing (no bit, nothing on the hot slot): a full scan, at most one
    // per kEmptyWakeGapNs (spurious wakes must not cost O(channels) each); one held back is done
    // by a look after the gap (the sleep, or the fd's timer, is cut short for it).
    if (monotonic_ns() - last_full_scan_ns_ < kEmptyWakeGapNs) {
      full_pending_ = true;
      return false;
    }
    full_scan_locked();
    return poll_fifo_locked(out);
  }
  return false;
}

bool QueueCore::poll_fifo_locked(Message* out) {
  // One pass over what is queued now: an end queued again during it (still ready after a ring's
  // worth of internal descriptors) waits for the next look, so a flooding peer cannot hold us.
  for (std::size_t pass = fifo_count_; pass != 0 && fifo_count_ != 0; --pass) {
    const std::uint32_t q = fifo_[fifo_head_];
    fifo_head_ = (fifo_head_ + 1) % fifo_.size();
    --fifo_count_;
    queued_[q] = 0;
    Endpoint* ep = by_slot_[q].get();
    if (ep == nullptr) continue;  // a stale or forged bit
    switch (ep->poll(out)) {
      case Endpoint::Poll::Got:
        // Round robin: it may hold more, after the others.
        enqueue_locked(q);
        got_from_locked(q);
        return true;
      case Endpoint::Poll::Empty:
        // Empty, or it stopped after a ring's worth of internal descriptors (returns, hints):
        // then it is still ready, and nobody will mark it again.
        if (ep->inbound_ready()) enqueue_locked(q);
        break;
      case Endpoint::Poll::Ended:
        // The final PeerClosed: the queue lets go of it.
        remove_locked(q);
        return true;
      case Endpoint::Poll::Gone:
        remove_locked(q);
        break;
    }
  }
  return false;
}

void QueueCore::watch_after_fork() {
  // Ends redirected before fork(): the child's watcher must learn of their peers' deaths too.
  const int pid = os::current_pid();
  if (watch_pid_.load(std::memory_order_relaxed) == pid) return;
  std::vector<std::shared_ptr<Endpoint>> eps;
  {
    os::LockGuard lock(mu_);
    for (auto& ep : by_slot_)
      if (ep) eps.push_back(ep);
  }
  for (auto& ep : eps)
    if (!ep->ensure_watched()) ep->abandon("the peer's death cannot be watched in this process");
  watch_pid_.store(pid, std::memory_order_relaxed);
}

void QueueCore::defer(Buffer&& b) {
  os::LockGuard lock(mu_);
  deferred_.push_back(std::move(b));
  deferred_count_.store(deferred_.size(), std::memory_order_relaxed);
}

void QueueCore::retry_deferred_locked() {
  // Each is a reply its caller's full control socket held back; it goes as soon as there is room.
  // Anything but WouldBlock ends it (sent; or dropped: the caller then gets NoReply, or is gone).
  std::erase_if(deferred_, [](Buffer& b) {
    Status r = Endpoint::reply_message(std::move(b));
    // reply_message() takes an rvalue reference and leaves b with us when it cannot send it.
    // NOLINTNEXTLINE(bugprone-use-after-move)
    return r || r.error().code != Errc::WouldBlock || !b.valid();
  });
  deferred_count_.store(deferred_.size(), std::memory_order_relaxed);
}

bool QueueCore::disarm_if_armed_here() {
  os::LockGuard lock(mu_);
  if (!armed_ || armed_by_ != std::this_thread::get_id()) return false;
  armed_ = false;
  armed_hint_.store(false, std::memory_order_relaxed);
  publish_locked();
  return true;
}

bool QueueCore::arm_and_look(Message* out) {
  // (P6q, the fd) Drain first: a byte a producer sends after this (it saw kQueueArmed) stays, so
  // the fd is readable whenever a message came after our last look.
  os::LockGuard lock(mu_);
  bell_.drain();
  if (live_ != 0 && monotonic_ns() - last_full_scan_ns_ >= kFullScanEveryNs) full_scan_locked();
  set_safety_timer_locked();
  armed_ = true;
  armed_by_ = std::this_thread::get_id();
  armed_hint_.store(true, std::memory_order_relaxed);
  publish_locked();
  // Pairs with the producers' fence (P4q step 2): either they see kQueueArmed, or we see their bit.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if (!scan_locked(out, false)) return false;
  // Found after the drain: more may be behind it, and the fd must say so (level-triggered).
  bell_.signal_self();
  return true;
}

Result<Message> QueueCore::wait(Deadline deadline) {
  watch_after_fork();
  // The thread that armed the fd (its event loop) is looking now: producers stop signalling it
  // until this wait finds nothing and arms it again. Another thread's wait() leaves it armed: the
  // event loop may be in epoll on the fd, and must still hear of what that wait leaves.
  const bool from_fd = armed_hint_.load(std::memory_order_relaxed) && disarm_if_armed_here();
  // One step for the whole wait (ipc/wait_step.h): after a wake-up that brought nothing for us,
  // the spin budget is not renewed.
  SpinStep step(policy_.load(), deadline);
  // The next look scans every end if it finds no bit: after a sleep, or after the fd woke us (a
  // wake-up that found no bit: a peer may have cleared it).
  // The fd's safety-net timer fired: every end is looked at once (and that is the full scan).
  bool safety = safety_due_.load(std::memory_order_relaxed) &&
                safety_due_.exchange(false, std::memory_order_relaxed);
  bool after_sleep = from_fd && !safety;
  for (;;) {
    Message m;
    {
      os::LockGuard lock(mu_);
      if (deferred_count_.load(std::memory_order_relaxed) != 0) retry_deferred_locked();
      if (safety) {
        if (live_ != 0) full_scan_locked();
        safety = false;
      }
      if (scan_locked(&m, after_sleep)) return m;
    }
    after_sleep = false;
    const SpinStep::Next next = step.after_miss();
    if (next == SpinStep::Next::Expired) {
      if (fd_used_.load(std::memory_order_relaxed) && arm_and_look(&m)) return m;
      return fail(Errc::TimedOut, "MsgQueue::wait");
    }
    if (next == SpinStep::Next::Look) continue;
    // (P6q) Announce (one store), fence, look once more, sleep on the queue's word.
    bool got = false;
    std::int64_t max_ns = kSafetyNetNs;  // set by the last look, under mu_
    sleep_once(
        bell_.ready().word, deadline, max_ns,
        [&] {
          os::LockGuard lock(mu_);
          ++sleepers_;
          publish_locked();
        },
        [&] {
          os::LockGuard lock(mu_);
          got = scan_locked(&m, false);
          if (got) return false;
          if (deferred_count_.load(std::memory_order_relaxed) != 0 || full_pending_)
            max_ns = kRetryNs;
          return true;
        },
        [&] {
          os::LockGuard lock(mu_);
          --sleepers_;
          publish_locked();
        });
    if (got) return m;
    after_sleep = true;
  }
}

}  // namespace detail

MsgQueue::~MsgQueue() { close_all(); }

MsgQueue& MsgQueue::operator=(MsgQueue&& o) noexcept {
  if (this != &o) {
    close_all();
    core_ = std::move(o.core_);
  }
  return *this;
}

void MsgQueue::close_all() noexcept {
  if (!core_) return;
  // Channels redirected here can no longer deliver: close them, so their peers' calls end with
  // PeerClosed (the automatic reply) instead of waiting for a queue that is gone.
  std::vector<std::shared_ptr<detail::QueueSource>> sources;
  for (auto& ep : core_->take_all(&sources)) ep->close_local();
  for (auto& src : sources) src->close();  // remote channels (mbmq::net): closed too
  core_.reset();
}

Result<MsgQueue> MsgQueue::create(WaitPolicy policy) {
  MsgQueue q;
  q.core_ = MBMQ_TRY(detail::QueueCore::make(policy));
  return q;
}

Result<Message> MsgQueue::wait(Deadline deadline) {
  if (!core_) return fail(Errc::InvalidArgument, "MsgQueue::wait: invalid queue");
  return core_->wait(deadline);
}

Status MsgQueue::reply(Message&& msg) {
  if (msg.kind != Kind::Request) return fail(Errc::InvalidArgument, "reply: not a request");
  return detail::Endpoint::reply_message(std::move(msg.buffer));
}

Result<Message> MsgQueue::reply_and_wait(Message&& msg, Deadline deadline) {
  if (msg.kind == Kind::Request) {
    Status s = reply(std::move(msg));
    // The caller is slow (its control socket is full): the answer waits in the queue and goes as
    // soon as it can; never turned into NoReply.
    // reply() leaves the buffer in msg when the caller's socket is full (an rvalue reference).
    // NOLINTNEXTLINE(bugprone-use-after-move)
    if (!s && s.error().code == Errc::WouldBlock && msg.buffer.valid()) {
      core_->defer(std::move(msg.buffer));
    } else if (!s && s.error().code == Errc::InvalidArgument) {
      return fail(s.error());  // the server's own mistake (e.g. more handles than max_handles)
    }
    // Anything else concerns that one channel (its caller is gone, cheated, or got NoReply
    // because its answer could not be made, e.g. EMFILE): the loop goes on.
  } else {
    msg.buffer.reset();
  }
  return wait(deadline);
}

Status MsgQueue::adopt(Channel&& channel, std::uint64_t key) {
  if (!core_) return fail(Errc::InvalidArgument, "MsgQueue::adopt: invalid queue");
  if (!channel.ep_) {
    if (channel.remote_) {
      // mbmq::net's adopt: the queue keeps the connection; the handle lets go without closing.
      MBMQ_TRY(channel.remote_->adopt(*this, key));
      channel.remote_.reset();
      return {};
    }
    return fail(Errc::InvalidArgument, "MsgQueue::adopt: closed channel");
  }
  MBMQ_TRY(channel.redirect(*this, key));
  // The queue's reference keeps the end open; drop the handle without closing it.
  channel.ep_.reset();
  return {};
}

int MsgQueue::fd() const noexcept { return core_ ? core_->fd() : -1; }

void MsgQueue::set_wait_policy(WaitPolicy policy) {
  if (core_) core_->set_wait_policy(policy);
}

std::size_t MsgQueue::channel_count() const { return core_ ? core_->channel_count() : 0; }

}  // namespace mbmq
