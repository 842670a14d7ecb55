// net/keeper.cc: mbmq::net's keeper thread, which notices a silent peer (issue #19).
//
// Debian's UCX 1.13 does not see a network partition for a long time: its TCP transport has no
// UCX_TCP_USER_TIMEOUT and its keepalive needs the worker progressed. So each channel watched here
// gets, every tick (an eighth of the shortest peer_timeout, within [10 ms, 250 ms]: half the
// heartbeat interval, so that a heartbeat goes out and is read well within peer_timeout even
// when ticks come late on a loaded machine; at a quarter, a 1 s peer_timeout saw gaps of up to
// 750 ms between heartbeats read, and an idle healthy peer was declared dead under load):
//  (K1) its worker progressed if no application thread waits on it (heartbeats are read, and
//       answered by the peer's own keeper, while the application is busy elsewhere);
//  (K2) PeerClosed after peer_timeout with nothing received (any message, heartbeat or not);
//  (K3) a Heartbeat after peer_timeout / 4 with nothing sent.
// And (K4) closes that close() could not finish (net/core.h, keep_closing): progressed each tick;
// (K5) channels close() left lingering, their sends not yet fetched by a slow peer
// (keep_lingering): linger_tick() every millisecond until they are, then their endpoint closed.
// The thread starts on the first channel that asks, and lives as long as the process; it holds
// weak references only. A forked child has no keeper (and cannot use UCX anyway).
// (K7) close() does not wait for the peer to fetch what it sent: such a channel lingers (K5) at
// once. The exit handler first finishes the lingering channels and the closes (K4) for up to
// 100 ms (finish_kept), which close() used to give each channel itself.
// (K6) Exit: exit() runs UCX's library destructors after every atexit handler, and they free what
// a worker being progressed uses. The handler mbmq::net registers when it loads UCX
// (before_exit(), net/ucx.h) marks the process exiting and waits for the pass in progress; every
// later pass (of this thread and of the allocating thread below) leaves UCX alone. What they hold
// then (lingering channels, unfinished closes) is left as it is: the process is ending. So during
// the rest of exit (destructors of objects made before UCX was loaded) nothing sends heartbeats
// (K3): a peer with a short peer_timeout may see this process as dead before it is.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <thread>
#include <utility>
#include <vector>

#include "net/core.h"
#include "os/futex.h"
#include "os/process.h"

namespace mbmq::net::detail {
namespace {

struct Watched {
  std::weak_ptr<ChannelCore> ch;
  std::int64_t timeout_ns;    // ours (0: we never end the channel for silence)
  std::int64_t heartbeat_ns;  // the shorter positive of ours and the peer's: heartbeats at 1/4
  bool handshake;  // a listener's pending connection: dropped without a hello in timeout_ns
};

struct Closing {
  std::shared_ptr<WorkerCore> w;
  void* request;  // ucp_ep_close_nbx's, in progress
};

struct Keeper {
  // Held by the thread for each pass that may touch UCX, taken before mu; before_exit() takes it
  // to wait for the pass in progress (net/ucx.h, exiting()).
  os::Mutex pass_mu;
  os::Mutex mu;
  std::vector<Watched> watched MBMQ_GUARDED_BY(mu);
  std::vector<Closing> closing MBMQ_GUARDED_BY(mu);
  std::vector<std::shared_ptr<ChannelCore>> lingering MBMQ_GUARDED_BY(mu);  // (K5)
  std::atomic<std::uint32_t> wake{0};  // a futex word: keep_lingering() bumps it (no tick's wait)
  std::int64_t tick_ns MBMQ_GUARDED_BY(mu) = 250'000'000;
  bool started MBMQ_GUARDED_BY(mu) = false;
  std::uint64_t passes MBMQ_GUARDED_BY(pass_mu) = 0;  // passes that touched UCX (tests)
};

Keeper& keeper() {
  static auto* k = new Keeper();  // never destroyed: the thread may outlive static destructors
  return *k;
}

// Which of the two threads this is: exit() called there (by a signal handler, say) must not wait
// for that thread's own pass (net/ucx.h, before_exit()).
enum class PassThread { None, Keeper, Allocator };
thread_local PassThread t_pass_thread = PassThread::None;

// (K4) Progresses each unfinished close; the finished ones are freed, their workers let go.
void progress_closing(Keeper& k) {
  std::vector<Closing> now;
  {
    os::LockGuard lock(k.mu);
    now.swap(k.closing);
  }
  std::vector<Closing> left;
  for (Closing& c : now) {
    bool finished = false;
    {
      // Of channels nobody waits on (a closing worker's), unlocked.
      const StartDeferredAfter after(*c.w, nullptr, true);
      os::LockGuard lock(c.w->mu);
      c.w->progress_locked();
      finished = c.w->u->ucp_request_check_status(c.request) != UCS_INPROGRESS;
      if (finished) c.w->u->ucp_request_free(c.request);
    }
    if (!finished) left.push_back(std::move(c));
  }
  now.clear();  // workers let go here, unlocked (the last reference destroys the worker)
  os::LockGuard lock(k.mu);
  for (Closing& c : left) k.closing.push_back(std::move(c));
}

// (K5) One tick of each lingering channel; the finished ones are let go (unlocked: the last
// reference destroys the channel, which takes its worker's lock).
void progress_lingering(Keeper& k) {
  std::vector<std::shared_ptr<ChannelCore>> now;
  {
    os::LockGuard lock(k.mu);
    now.swap(k.lingering);
  }
  if (now.empty()) return;
  const std::int64_t t = monotonic_ns();
  std::erase_if(now, [&](const std::shared_ptr<ChannelCore>& ch) { return ch->linger_tick(t); });
  os::LockGuard lock(k.mu);
  for (auto& ch : now) k.lingering.push_back(std::move(ch));
}

[[noreturn]] void run() {
  t_pass_thread = PassThread::Keeper;
  Keeper& k = keeper();
  std::vector<Watched> now_watched;
  std::int64_t next_tick = 0;  // of the watched channels and unfinished closes
  for (;;) {
    std::int64_t tick = 0;
    bool lingering = false;
    // Every millisecond while channels linger (their peer fetching), else every tick; a channel
    // starting to linger wakes it at once (its first look would otherwise wait up to a tick):
    // `seen` is read before the list, so a push after the look bumps it and ends the wait.
    const std::uint32_t seen = k.wake.load(std::memory_order_acquire);
    {
      os::LockGuard lock(k.mu);
      tick = k.tick_ns;
      lingering = !k.lingering.empty();
    }
    if (lingering)
      os::sleep_ns(std::min<std::int64_t>(tick, 1'000'000));
    else
      (void)os::futex_wait(&k.wake, seen, tick);
    os::LockGuard pass(k.pass_mu);
    // Exit began (net/ucx.h): UCX's destructors are about to run; leave it alone for good.
    if (!ucx_usable() || exiting()) continue;
    ++k.passes;
    progress_lingering(k);
    if (monotonic_ns() < next_tick) continue;
    next_tick = monotonic_ns() + tick - tick / 8;
    {
      os::LockGuard lock(k.mu);
      std::erase_if(k.watched, [](const Watched& w) { return w.ch.expired(); });
      now_watched = k.watched;
    }
    progress_closing(k);
    for (const Watched& w : now_watched)
      if (auto ch = w.ch.lock()) {
        if (w.handshake)
          ch->handshake_tick(monotonic_ns(), w.timeout_ns);
        else
          ch->keep_alive_tick(monotonic_ns(), w.timeout_ns, w.heartbeat_ns);
      }
  }
}

}  // namespace

namespace {
void watch(const std::shared_ptr<ChannelCore>& ch, std::chrono::milliseconds timeout,
           std::chrono::milliseconds peer_timeout, bool handshake) {
  const auto to_ns = [](std::chrono::milliseconds t) -> std::int64_t {
    return t.count() <= 0 ? 0 : std::chrono::duration_cast<std::chrono::nanoseconds>(t).count();
  };
  const std::int64_t own = to_ns(timeout);
  const std::int64_t peer = to_ns(peer_timeout);
  if (own == 0 && peer == 0) return;
  const std::int64_t ns = own == 0 ? peer : peer == 0 ? own : std::min(own, peer);
  Keeper& k = keeper();
  os::LockGuard lock(k.mu);
  k.watched.push_back({ch, own, ns, handshake});
  k.tick_ns = std::clamp<std::int64_t>(std::min(k.tick_ns, ns / 8), 10'000'000, 250'000'000);
  if (!k.started) {
    k.started = true;
    std::thread(run).detach();
  }
}
}  // namespace

void keep_closing(std::shared_ptr<WorkerCore> w, void* request) {
  Keeper& k = keeper();
  os::LockGuard lock(k.mu);
  k.closing.push_back({std::move(w), request});
  if (!k.started) {
    k.started = true;
    std::thread(run).detach();
  }
}

void keep_lingering(std::shared_ptr<ChannelCore> ch) {
  Keeper& k = keeper();
  {
    os::LockGuard lock(k.mu);
    k.lingering.push_back(std::move(ch));
    if (!k.started) {
      k.started = true;
      std::thread(run).detach();
    }
  }
  k.wake.fetch_add(1, std::memory_order_release);
  (void)os::futex_wake(&k.wake, 1);
}

// ---- (D1) the allocating thread -----------------------------------------------------------------
namespace {
struct Allocator {
  os::Mutex pass_mu;  // as Keeper::pass_mu: held for each pass, taken before mu
  os::Mutex mu;
  std::vector<std::weak_ptr<WorkerCore>> queue MBMQ_GUARDED_BY(mu);
  bool started MBMQ_GUARDED_BY(mu) = false;
  std::atomic<std::uint32_t> seq{0};  // a futex word: bumped after each post
};
std::atomic<bool> g_allocator_running{false};

Allocator& allocator() {
  static auto* a = new Allocator();  // never destroyed: the thread may outlive static destructors
  return *a;
}

[[noreturn]] void allocate_run() {
  t_pass_thread = PassThread::Allocator;
  Allocator& a = allocator();
  std::vector<std::weak_ptr<WorkerCore>> now;
  std::vector<std::weak_ptr<WorkerCore>> again;
  for (;;) {
    const std::uint32_t seen = a.seq.load(std::memory_order_acquire);
    bool idle = false;
    {
      // The whole pass, from taking the queue to putting back the workers with more, holds
      // pass_mu: before_exit() then finds every queued worker in the queue (none in `now` or
      // `again` here), and a pass after it starts nothing.
      os::LockGuard pass(a.pass_mu);
      if (exiting()) {
        idle = true;  // (K6) before_exit() took the queue; nothing is posted since
      } else {
        {
          os::LockGuard lock(a.mu);
          now.swap(a.queue);
        }
        idle = now.empty();
        // One payload per worker per pass, the workers with more going back in the queue: a
        // worker receiving a stream of large payloads does not starve the others.
        for (auto& weak : now)
          if (auto w = weak.lock(); w && ucx_usable() && w->start_allocator_deferred())
            again.push_back(weak);
        now.clear();  // weak references only: the last strong one went with `w` above
        if (!again.empty()) {
          os::LockGuard lock(a.mu);
          for (auto& weak : again) a.queue.push_back(std::move(weak));
          again.clear();
        }
      }
    }
    if (idle) (void)os::futex_wait(&a.seq, seen, 1'000'000'000);  // a post after the swap: at once
  }
}
}  // namespace

bool allocate_deferred_later(std::weak_ptr<WorkerCore> w) noexcept {
  Allocator& a = allocator();
  try {
    os::LockGuard lock(a.mu);
    // Checked under a.mu: before_exit() stores exiting, then (once the allocating thread's pass,
    // which holds what it took from the queue, ended) takes what is queued under a.mu, so a post
    // either is in what it takes or sees exiting (then the caller falls back to its own threads,
    // which go on receiving during the rest of exit). Unless that pass did not end within 2 s.
    if (exiting()) return false;
    a.queue.push_back(std::move(w));
    if (!a.started) {
      std::thread(allocate_run).detach();
      a.started = true;
      g_allocator_running.store(true, std::memory_order_relaxed);
    }
  } catch (...) {  // no memory or no thread
    return false;
  }
  a.seq.fetch_add(1, std::memory_order_release);
  (void)os::futex_wake(&a.seq, 1);
  return true;
}

bool allocator_running() noexcept { return g_allocator_running.load(std::memory_order_relaxed); }

namespace {
// Takes `mu` within 2 s (1 ms steps). False: a pass did not end in that time (a thread holding a
// lock the pass needs was stopped by the signal whose handler called exit(), say): exit goes on
// without waiting, as it did before the handler existed.
bool lock_within_2s(os::Mutex& mu) MBMQ_TRY_ACQUIRE(true, mu) {
  for (int i = 0; i < 2000; ++i) {
    if (mu.try_lock()) return true;
    os::sleep_ns(1'000'000);
  }
  return false;
}
}  // namespace

void wait_for_passes() noexcept {
  // Each lock is taken once the thread's pass in progress ended; every later pass sees exiting().
  // (The states are never destroyed; a thread never started leaves its lock free.) Not on the
  // thread itself: its own pass cannot end while it is here.
  Keeper& k = keeper();
  if (t_pass_thread != PassThread::Keeper && lock_within_2s(k.pass_mu)) k.pass_mu.unlock();
  // The receives already posted to the allocating thread are started here, on the exiting thread
  // (UCX is whole until the handlers end), so that no receive waits for them during the rest of
  // exit; the thread itself starts nothing more. Each start takes its worker's lock without a
  // bound: exit() from a signal handler that interrupted a thread holding it would hang here (as
  // much else does when exit() is called where it is not async-signal-safe).
  Allocator& a = allocator();
  if (t_pass_thread == PassThread::Allocator || !lock_within_2s(a.pass_mu)) return;
  os::LockGuard pass(a.pass_mu, os::kAdoptLock);
  std::vector<std::weak_ptr<WorkerCore>> left;
  {
    os::LockGuard lock(a.mu);
    left.swap(a.queue);
  }
  for (auto& weak : left)
    if (auto w = weak.lock())
      while (w->start_allocator_deferred()) {
      }
}

Status finish_kept(Deadline deadline) noexcept {
  // (K7) What close() left to the keeper (lingering channels, then their flush closes, K4/K5) is
  // finished here, on the calling thread, every millisecond until both lists are empty or the
  // deadline: the keeper looks at the closes only each tick (up to 250 ms). A keeper pass in
  // progress is waited for (its lock and the lists' only tried: exit() from a signal handler must
  // not hang on a pass that cannot end, or on a lock its own thread holds); a thread that holds a
  // worker's lock itself (exit() from a signal handler that interrupted a progress) does
  // nothing, rather than deadlock on it. Once another thread's exit() has begun, UCX is about to
  // be torn down (K6): nothing more.
  if (!ucx_usable()) return {};  // not loaded, or a forked child's copies: nothing of ours
  if (t_pass_thread != PassThread::None || WorkerMutex::held_by_this_thread() != 0)
    return fail(Errc::InvalidArgument,
                "net::finish_closes: called from mbmq::net's own thread, or holding a worker's "
                "lock (inside a net call)");
  if (exiting())
    return fail(Errc::InvalidArgument,
                "net::finish_closes: the process is exiting (mbmq::net's exit handler ran)");
  Keeper& k = keeper();
  // 1: something kept, 0: nothing, -1: its lock busy (looked at again).
  const auto held = [&k]() -> int {
    if (!k.mu.try_lock()) return -1;
    os::LockGuard lock(k.mu, os::kAdoptLock);
    return !k.lingering.empty() || !k.closing.empty() ? 1 : 0;
  };
  for (;;) {
    bool any = true;  // (a keeper pass in progress: looked at again)
    if (k.pass_mu.try_lock()) {
      os::LockGuard pass(k.pass_mu, os::kAdoptLock);
      if (exiting())  // another thread's exit() began (its handler's own call ran before this)
        return fail(Errc::InvalidArgument, "net::finish_closes: the process is exiting");
      const int h = held();
      if (h == 1) {
        progress_lingering(k);
        progress_closing(k);
      }
      any = h != 0 && held() != 0;
    }
    if (!any) return {};
    if (deadline.expired())
      return fail(Errc::TimedOut, "net::finish_closes: closed channels still sending");
    os::sleep_ns(1'000'000);
  }
}

std::size_t keeper_holds_for_test() noexcept {
  Keeper& k = keeper();
  // Between passes: a close a pass finished is let go (its worker destroyed) inside the pass.
  os::LockGuard pass(k.pass_mu);
  os::LockGuard lock(k.mu);
  return k.closing.size() + k.lingering.size();
}

std::uint64_t keeper_passes_for_test() noexcept {
  Keeper& k = keeper();
  os::LockGuard pass(k.pass_mu);
  return k.passes;
}

void keep_alive(const std::shared_ptr<ChannelCore>& ch, std::chrono::milliseconds timeout,
                std::chrono::milliseconds peer_timeout) {
  watch(ch, timeout, peer_timeout, false);
}

void watch_handshake(const std::shared_ptr<ChannelCore>& ch, std::chrono::milliseconds timeout) {
  watch(ch, timeout, std::chrono::milliseconds(0), true);
}

void ChannelCore::handshake_tick(std::int64_t now_ns, std::int64_t timeout_ns) {
  // (K1) Deferred receives of channels nobody waits on, unlocked.
  const StartDeferredAfter after(*w_, this, true);
  os::LockGuard lock(w_->mu);
  if (state_ == State::Open && !hello_ack_sent_) {
    // (N4) Accepted, its HelloAck not yet gone (the endpoint was still being wired up): nobody
    // may be progressing the worker (accept() not called again, peer_timeout 0: no K1).
    if (w_->waiters == 0) w_->progress_locked();
    return;
  }
  if (state_ != State::Pending) return;
  if (w_->waiters == 0) w_->progress_locked();  // its hello may be waiting
  if (state_ != State::Pending || now_ns - pending_since_ns_ <= timeout_ns) return;
  // The listener's pending_ gives this channel to its graveyard; our strong reference (the
  // keeper's) keeps it alive until after the lock is released.
  fail_locked(Errc::Protocol, "net: no hello in time");
}

bool ChannelCore::linger_tick(std::int64_t now_ns) {
  std::deque<Message> drop;  // destroyed unlocked: their reply tokens take the lock
  void* closing = nullptr;
  {
    const StartDeferredAfter after(*w_, this, true);  // deferred receives, unlocked
    os::LockGuard lock(w_->mu);
    if (state_ == State::Open && w_->waiters == 0) w_->progress_locked();  // as (K1)
    drop_inbox_locked(drop);  // what the peer sends meanwhile: nobody will receive it
    if (state_ == State::Open && unfinished_locked() && now_ns < linger_until_ns_) return false;
    // Fetched (or the channel failed: nothing to close; or kLingerMaxNs passed: cut short).
    closing = close_ep_locked(unfinished_locked() ? Close::Force : Close::Flush);
    lingering_ = false;
  }
  if (closing != nullptr) {
    try {
      keep_closing(w_, closing);  // (K4): the Bye leaves as the worker progresses
    } catch (...) {
      os::LockGuard lock(w_->mu);
      w_->u->ucp_request_free(closing);
    }
  }
  return true;
}

void ChannelCore::keep_alive_tick(std::int64_t now_ns, std::int64_t timeout_ns,
                                  std::int64_t heartbeat_ns) {
  // (K1) Deferred receives of channels nobody waits on, unlocked.
  const StartDeferredAfter after(*w_, this, true);
  os::LockGuard lock(w_->mu);
  if (state_ != State::Open) return;
  if (w_->waiters == 0) w_->progress_locked();  // (K1)
  if (state_ != State::Open) return;
  if (timeout_ns > 0 && now_ns - last_rx_ns_ > timeout_ns)  // (K2)
    return fail_locked(Errc::PeerClosed, "net: no word from the peer within peer_timeout");
  if (!lingering_ && now_ns - last_tx_ns_ >= heartbeat_ns / 4)  // (K3); nothing after our Bye
    (void)send_locked(WireKind::Heartbeat, 0, 0, 0, nullptr, 0, nullptr, false);
}

}  // namespace mbmq::net::detail

namespace mbmq::net {
Status finish_closes(Deadline deadline) { return detail::finish_kept(deadline); }
}  // namespace mbmq::net
