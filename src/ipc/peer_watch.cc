#include "ipc/peer_watch.h"

#include <array>
#include <atomic>
#include <mutex>
#include <thread>
#include <unordered_map>

#include "ipc/endpoint.h"
#include "os/epoll.h"
#include "os/process.h"

namespace mbmq::detail {

namespace {

struct WatchState {
  std::mutex mu;
  os::Epoll epoll;  // guarded by mu (creation)
  struct Entry {
    std::weak_ptr<Endpoint> ep;
    int fd;
  };
  std::unordered_map<std::uint64_t, Entry> eps;  // guarded by mu
  std::uint64_t next_id = 1;                     // guarded by mu
  bool started = false;                          // guarded by mu
  std::atomic<bool> running{false};  // set by the thread itself once it is in its own code
};

// One per process. After fork() the child abandons the parent's copy (its thread does not exist
// in the child, and its epoll instance is shared with the parent) and builds a new one.
WatchState* g_state = nullptr;
std::mutex g_init_mu;

void forget_after_fork() noexcept {
  // In the child: the copied mutexes may be held by threads that do not exist here; abandon the
  // state rather than touch them (a small, bounded leak per fork), closing only its epoll fd.
  if (g_state != nullptr) {
    os::Epoll dead = std::move(g_state->epoll);
    (void)dead;
  }
  g_state = nullptr;
  new (&g_init_mu) std::mutex();
}

void run(WatchState* st) {
  // Pairs with the acquire load in watch_peer().
  st->running.store(true, std::memory_order_release);
  std::array<os::EpollEvent, 32> evs{};
  for (;;) {
    auto n = st->epoll.wait(evs, -1);
    if (!n) continue;  // EINTR is retried inside; other errors: retry (nothing better to do)
    for (std::size_t i = 0; i < *n; ++i) {
      std::shared_ptr<Endpoint> ep;
      {
        std::lock_guard lock(st->mu);
        auto it = st->eps.find(evs[i].data);
        if (it == st->eps.end()) continue;
        ep = it->second.ep.lock();
        (void)st->epoll.remove(it->second.fd);
        st->eps.erase(it);
      }
      // (P8) Outside the lock: on_hangup() takes the endpoint's lock and may drop the last
      // reference, whose destructor calls unwatch_peer().
      if (ep) ep->on_hangup();
    }
  }
}

WatchState* state() {
  std::lock_guard lock(g_init_mu);
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

Result<std::uint64_t> watch_peer(std::weak_ptr<Endpoint> ep, int fd) {
  WatchState* st = state();
  std::lock_guard lock(st->mu);
  if (!st->started) {
    st->epoll = MBMQ_TRY(os::Epoll::create());
    std::thread(run, st).detach();
    st->started = true;
    // Return only once the thread runs its own code. A fork() while a new thread is still inside
    // the C library's (or a sanitizer's) thread-start bookkeeping gives the child that internal
    // lock held, and the child's own first thread creation then deadlocks (seen under ASan).
    while (!st->running.load(std::memory_order_acquire)) std::this_thread::yield();
  }
  std::uint64_t id = st->next_id++;
  // Hang-up only, edge-triggered: a peer's close is reported once; data on the socket is read by
  // the endpoint itself.
  MBMQ_TRY(st->epoll.add(fd, os::kEpollHangup | (1u << 31) /* EPOLLET */, id));
  st->eps.emplace(id, WatchState::Entry{std::move(ep), fd});
  return id;
}

void unwatch_peer(std::uint64_t id, int fd) noexcept {
  WatchState* st = state();
  std::lock_guard lock(st->mu);
  if (st->eps.erase(id) > 0 && st->started) (void)st->epoll.remove(fd);
}

}  // namespace mbmq::detail
