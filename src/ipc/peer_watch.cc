#include "ipc/peer_watch.h"

#include <array>
#include <atomic>
#include <climits>
#include <map>
#include <thread>
#include <unordered_map>

#include "mbmq/deadline.h"
#include "os/epoll.h"
#include "os/mutex.h"
#include "os/process.h"

namespace mbmq::detail {

namespace {

struct WatchState {
  os::Mutex mu;
  // Assigned once, under mu, before the thread starts; the thread then waits on it without mu
  // (watcher_epoll()).
  os::Epoll epoll MBMQ_GUARDED_BY(mu);
  struct Entry {
    std::weak_ptr<Watched> who;
    int fd;
    bool oneshot;
    std::int64_t deadline_ns;
  };
  std::unordered_map<std::uint64_t, Entry> entries MBMQ_GUARDED_BY(mu);
  std::multimap<std::int64_t, std::uint64_t> deadlines MBMQ_GUARDED_BY(mu);  // deadline -> id
  std::uint64_t next_id MBMQ_GUARDED_BY(mu) = 1;
  bool started MBMQ_GUARDED_BY(mu) = false;
  std::atomic<bool> running{false};  // set by the thread itself once it is in its own code
};

// One per process. After fork() the child abandons the parent's copy (its thread does not exist
// in the child, and its epoll instance is shared with the parent) and builds a new one.
os::Mutex g_init_mu;
WatchState* g_state MBMQ_GUARDED_BY(g_init_mu) = nullptr;

// Not analysed: it runs in a forked child, where the copied mutexes may be held by threads that
// do not exist, so it must not take them; the child has one thread then, so nothing can race.
void forget_after_fork() noexcept MBMQ_NO_THREAD_SAFETY_ANALYSIS {
  // In the child: abandon the state rather than touch its mutexes (a small, bounded leak per
  // fork), closing only its epoll fd.
  if (g_state != nullptr) {
    os::Epoll dead = std::move(g_state->epoll);
    (void)dead;
  }
  g_state = nullptr;
  new (&g_init_mu) os::Mutex();
}

// The watcher thread's own view of its epoll instance, read without mu. Not analysed: epoll is
// assigned once, under mu, before the thread is started (which orders it before every read
// here), and never again in this process (forget_after_fork() only runs in a child).
os::Epoll& watcher_epoll(WatchState* st) noexcept MBMQ_NO_THREAD_SAFETY_ANALYSIS {
  return st->epoll;
}

// Removes entry `it` from epoll and the deadline index.
void erase_locked(WatchState* st, std::unordered_map<std::uint64_t, WatchState::Entry>::iterator it)
    MBMQ_REQUIRES(st->mu) {
  (void)st->epoll.remove(it->second.fd);
  if (it->second.deadline_ns != 0) {
    auto [lo, hi] = st->deadlines.equal_range(it->second.deadline_ns);
    for (auto d = lo; d != hi; ++d) {
      if (d->second == it->first) {
        st->deadlines.erase(d);
        break;
      }
    }
  }
  st->entries.erase(it);
}

struct Fire {
  std::shared_ptr<Watched> who;
  int fd;
  std::uint32_t events;
};

void run(WatchState* st) {
  std::array<os::EpollEvent, 32> evs{};
  std::vector<Fire> fire;
  fire.reserve(64);
  // Only now, after the thread's start-up allocation: watch_fd() returns once this is set, and a
  // fork() its caller makes then must not find this thread inside the allocator. GCC 12's ASan
  // does not lock its allocator around fork() (llvm/llvm-project#63224): a child forked while
  // this thread held a size class's lock hung in its own watcher's first allocation of that
  // size, and so never learnt of its peer's close (seen 3 in 100 runs of
  // Lifecycle.AQueueRedirectedBeforeForkSeesThePeerCloseInTheChild under ASan, 2026-12-02).
  // Pairs with the acquire load in watch_fd().
  st->running.store(true, std::memory_order_release);
  for (;;) {
    int timeout_ms = -1;
    {
      os::LockGuard lock(st->mu);
      if (!st->deadlines.empty())
        timeout_ms = timeout_ms_until(st->deadlines.begin()->first, monotonic_ns());
    }
    auto n = watcher_epoll(st).wait(evs, timeout_ms);
    fire.clear();
    {
      os::LockGuard lock(st->mu);
      for (std::size_t i = 0; n && i < *n; ++i) {
        auto it = st->entries.find(evs[i].data);
        if (it == st->entries.end()) continue;
        Fire f{it->second.who.lock(), it->second.fd, evs[i].events};
        if (it->second.oneshot) erase_locked(st, it);
        if (f.who) fire.push_back(std::move(f));
      }
      const std::int64_t now = monotonic_ns();
      while (!st->deadlines.empty() && st->deadlines.begin()->first <= now) {
        auto it = st->entries.find(st->deadlines.begin()->second);
        if (it == st->entries.end()) {  // cannot happen: erase_locked keeps both in step
          st->deadlines.erase(st->deadlines.begin());
          continue;
        }
        Fire f{it->second.who.lock(), it->second.fd, 0};
        erase_locked(st, it);
        if (f.who) fire.push_back(std::move(f));
      }
    }
    // Outside the lock: a callback may register or unregister fds, and may drop the last
    // reference to its object, whose destructor unregisters. Each reference is dropped as soon as
    // its callback returns: a channel its owner closed meanwhile is freed (unmapped, its fds
    // closed) right then, on this thread.
    for (Fire& f : fire) {
      f.who->on_watch(f.fd, f.events);
      f.who.reset();
    }
    fire.clear();
  }
}

WatchState* state() {
  os::LockGuard lock(g_init_mu);
  if (g_state == nullptr) {
    static const bool registered = [] {
      os::on_fork_child(forget_after_fork);
      return true;
    }();
    (void)registered;
    g_state = new WatchState();
  }
  return g_state;
}

}  // namespace

int timeout_ms_until(std::int64_t deadline_ns, std::int64_t now_ns) noexcept {
  std::int64_t left = 0;
  if (__builtin_sub_overflow(deadline_ns, now_ns, &left)) return deadline_ns > now_ns ? INT_MAX : 0;
  if (left <= 0) return 0;
  // Rounded up without computing left + 999'999, which could overflow.
  const std::int64_t ms = left / 1'000'000 + (left % 1'000'000 != 0 ? 1 : 0);
  return ms > INT_MAX ? INT_MAX : static_cast<int>(ms);
}

Result<std::uint64_t> watch_fd(std::weak_ptr<Watched> who, int fd, WatchSpec spec) {
  MBMQ_ASSERT(spec.deadline_ns == 0 || spec.oneshot);
  WatchState* st = state();
  os::LockGuard lock(st->mu);
  if (!st->started) {
    st->epoll = MBMQ_TRY(os::Epoll::create());
    std::thread(run, st).detach();
    st->started = true;
    // Return only once the thread runs its own code. A fork() while a new thread is still inside
    // the C library's (or a sanitizer's) thread-start bookkeeping gives the child that internal
    // lock held, and the child's own first thread creation then deadlocks (seen under ASan).
    while (!st->running.load(std::memory_order_acquire)) os::yield_cpu();
  }
  std::uint64_t id = st->next_id++;
  MBMQ_TRY(st->epoll.add(fd, spec.events, id));
  st->entries.emplace(id, WatchState::Entry{std::move(who), fd, spec.oneshot, spec.deadline_ns});
  // Timed registrations are made on the watcher thread itself (handshakes accepted in a callback),
  // so the loop sees the new deadline before it next sleeps.
  if (spec.deadline_ns != 0) st->deadlines.emplace(spec.deadline_ns, id);
  return id;
}

void unwatch_fd(std::uint64_t id, int fd) noexcept {
  WatchState* st = state();
  os::LockGuard lock(st->mu);
  auto it = st->entries.find(id);
  if (it == st->entries.end() || it->second.fd != fd) return;
  erase_locked(st, it);
}

}  // namespace mbmq::detail
