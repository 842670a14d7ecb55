// MsgQueue and its private half, QueueCore (waiting steps P4/P6 of src/shm/layout.h).
#include "mbmq/msg_queue.h"

#include <climits>
#include <new>

#include "ipc/endpoint.h"
#include "ipc/listener_core.h"
#include "ipc/queue_core.h"
#include "ipc/wait_step.h"
#include "os/futex.h"
#include "os/memfd.h"
#include "os/mutex.h"
#include "os/process.h"

namespace mbmq {
namespace detail {

Result<std::shared_ptr<QueueCore>> QueueCore::make(WaitPolicy policy) {
  auto q = std::make_shared<QueueCore>();
  q->fd_ = MBMQ_TRY(os::make_sealed_memfd("mbmq-queue", shm::kDoorbellPageSize));
  q->map_ = MBMQ_TRY(
      os::Mapping::map_shared(q->fd_.get(), shm::kDoorbellPageSize, os::Access::ReadWrite));
  q->page_ = new (q->map_.data()) shm::DoorbellPage{};
  q->policy_.store(policy);
  {
    os::LockGuard lock(q->mu_);  // not shared yet: uncontended, for the analysis
    q->eps_.reserve(64);
  }
  q->watch_pid_.store(os::current_pid(), std::memory_order_relaxed);
  return q;
}

void QueueCore::add(std::shared_ptr<Endpoint> ep) {
  os::LockGuard lock(mu_);
  // A waiter already asleep must be woken by this channel's peer too (P6).
  if (sleepers_ > 0) ep->set_consumer_sleeping(true);
  eps_.push_back(std::move(ep));
}

void QueueCore::add_listener(std::shared_ptr<ListenCore> l) {
  os::LockGuard lock(mu_);
  listeners_.push_back(std::move(l));
}

void QueueCore::remove_listener(const ListenCore* l) {
  os::LockGuard lock(mu_);
  std::erase_if(listeners_, [l](const auto& p) { return p.get() == l; });
}

void QueueCore::poke() noexcept {
  page_->word.fetch_add(1, std::memory_order_release);
  (void)os::futex_wake(&page_->word, INT_MAX);
}

std::vector<std::shared_ptr<Endpoint>> QueueCore::take_all() {
  os::LockGuard lock(mu_);
  listeners_.clear();
  std::vector<std::shared_ptr<Endpoint>> eps;
  eps.swap(eps_);
  return eps;
}

std::size_t QueueCore::channel_count() const {
  os::LockGuard lock(mu_);
  return eps_.size();
}

void QueueCore::set_wait_policy(WaitPolicy p) { policy_.store(p); }

void QueueCore::set_sleeping_locked(bool sleeping) noexcept {
  for (auto& ep : eps_) ep->set_consumer_sleeping(sleeping);
}

bool QueueCore::scan_locked(Message* out) {
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
  std::size_t i = 0;
  while (i < eps_.size()) {
    std::size_t idx = (next_ + i) % eps_.size();
    Endpoint::Poll p = eps_[idx]->poll(out);
    if (p == Endpoint::Poll::Got) {
      next_ = idx + 1;
      return true;
    }
    if (p == Endpoint::Poll::Empty) {
      ++i;
      continue;
    }
    // Ended (deliver the final PeerClosed) or Gone (closed here): the queue lets go of it.
    eps_[idx]->set_consumer_sleeping(false);
    eps_[idx] = std::move(eps_.back());
    eps_.pop_back();
    if (p == Endpoint::Poll::Ended) {
      next_ = idx;
      return true;
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
    eps = eps_;
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

Result<Message> QueueCore::wait(Deadline deadline) {
  watch_after_fork();
  // One step for the whole wait (ipc/wait_step.h): after a wake-up that brought nothing for us,
  // the spin budget is not renewed.
  SpinStep step(policy_.load(), deadline);
  for (;;) {
    Message m;
    {
      os::LockGuard lock(mu_);
      if (deferred_count_.load(std::memory_order_relaxed) != 0) retry_deferred_locked();
      if (scan_locked(&m)) return m;
    }
    const SpinStep::Next next = step.after_miss();
    if (next == SpinStep::Next::Expired) return fail(Errc::TimedOut, "MsgQueue::wait");
    if (next == SpinStep::Next::Look) continue;
    // (P6) Announce sleep on every channel, fence, look once more, sleep on the queue's word.
    bool got = false;
    // Replies held back by a caller's full control socket are retried every millisecond (its
    // reading does not ring our doorbell).
    constexpr std::int64_t kRetryNs = 1'000'000;
    std::int64_t max_ns = -1;  // set by the last look, under mu_
    sleep_once(
        page_->word, deadline, max_ns,
        [&] {
          os::LockGuard lock(mu_);
          if (sleepers_++ == 0) set_sleeping_locked(true);
        },
        [&] {
          os::LockGuard lock(mu_);
          got = scan_locked(&m);
          if (got) return false;
          if (deferred_count_.load(std::memory_order_relaxed) != 0) max_ns = kRetryNs;
          // Garbage that reads as "nothing there" must not put us to sleep on that channel: the
          // next scan reports the broken channel.
          bool all_consistent = true;
          for (auto& ep : eps_) all_consistent &= ep->check_ring();
          return all_consistent;
        },
        [&] {
          os::LockGuard lock(mu_);
          if (--sleepers_ == 0) set_sleeping_locked(false);
        });
    if (got) return m;
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
  for (auto& ep : core_->take_all()) ep->close_local();
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
  if (!channel.ep_) return fail(Errc::InvalidArgument, "MsgQueue::adopt: closed channel");
  MBMQ_TRY(channel.redirect(*this, key));
  // The queue's reference keeps the end open; drop the handle without closing it.
  channel.ep_.reset();
  return {};
}

void MsgQueue::set_wait_policy(WaitPolicy policy) {
  if (core_) core_->set_wait_policy(policy);
}

std::size_t MsgQueue::channel_count() const { return core_ ? core_->channel_count() : 0; }

}  // namespace mbmq
