// net/bridge.cc: Bridge (mbmq/net_bridge.h). Built on the public API of mbmq/net.h and
// mbmq/channel.h only: a thread per remote connection forwards between the accepted net::Channel
// and the bridge's end of a local Channel::pair(), whose other end the server serves.
//
// Each bridge thread, for its connection (a "link"):
//  (B1) Waits for the remote client's next message, for at most poll_interval; between waits it
//       looks at the local end (a Kind::PeerClosed there: the server closed it) and at the
//       bridge's stop flag.
//  (B2) A request: copies its bytes into a local buffer (one copy), call()s it on the local end
//       with a deadline of call_timeout, copies the reply back into the net message (one copy)
//       and net::Channel::reply()s. A local NoReply, TimedOut or WouldBlock answers the remote
//       caller NoReply (the net message is dropped) and the link goes on.
//  (B3) A one-way message: copied into a local buffer and send()s it, waiting for a free buffer
//       and ring room for at most call_timeout (back-pressure from a server that is behind).
//  (B4) The end: the remote side closed or failed (PeerClosed or Protocol from net), the local
//       side closed (PeerClosed, Protocol, or InvalidArgument: ~Bridge closed it to interrupt a
//       call), or the bridge stops. The remote channel is closed first (a Bye: the remote caller
//       of a request still held gets PeerClosed, not NoReply), then the local end (the server's
//       queue gets Kind::PeerClosed), and the link is counted out of stats().live.
#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <list>
#include <new>
#include <system_error>
#include <thread>
#include <utility>

#include "mbmq/msg_queue.h"
#include "mbmq/net_bridge.h"
#include "os/mutex.h"
#include "os/process.h"

namespace mbmq::net {
namespace detail {

namespace {

// What a forwarding step leaves the link in.
enum class Next : std::uint8_t { Go, End };

// The end of the link when the local channel's call/send/buffer failed with `code`: the local
// side is gone (PeerClosed, Protocol) or closed under us (InvalidArgument).
bool local_ended(Errc code) noexcept {
  return code == Errc::PeerClosed || code == Errc::Protocol || code == Errc::InvalidArgument;
}

}  // namespace

struct Link {
  // Set before the thread starts, then used by that thread only, except local.close() which
  // ~BridgeCore may call from its own thread (mbmq::Channel::close is safe then), holding
  // BridgeCore::mu_, which the thread holds to reset them as it ends.
  net::Channel remote;
  mbmq::Channel local;
  std::thread thread;
  // Written by the link's thread as it ends (release); read by reap() (acquire) before joining.
  std::atomic<bool> done{false};
};

class BridgeCore {
 public:
  BridgeCore(Listener&& l, const BridgeOptions& o)
      : listener_(std::move(l)), opt_(o), pid_(os::current_pid()) {}
  BridgeCore(const BridgeCore&) = delete;
  BridgeCore& operator=(const BridgeCore&) = delete;

  ~BridgeCore() {
    // Relaxed would do for the threads' next look (B1) at the flag; release pairs with their
    // acquire load so that nothing written here before is missed by them.
    stop_.store(true, std::memory_order_release);
    // In a forked child the links' threads do not exist (only the forking thread is copied),
    // and joining them is undefined (TSan's join hangs): the child leaves the links alone, as
    // mbmq::net leaves UCX alone there.
    if (os::current_pid() != pid_) {
      // Kept, never destroyed: a std::thread destroyed joinable terminates, and detaching one
      // that does not exist here is no better. Reachable from a static: not reported as a leak.
      static os::Mutex forked_mu;
      static auto* const forked_links = new (std::nothrow) std::list<Link>;
      os::LockGuard lock(mu_);
      os::LockGuard keep(forked_mu);
      if (forked_links != nullptr) {
        forked_links->splice(forked_links->end(), links_);
      } else {
        for (Link& k : links_) {  // out of memory: detached is the lesser evil than terminate
          if (k.thread.joinable()) k.thread.detach();
        }
      }
      return;
    }
    std::list<Link> links;
    {
      os::LockGuard lock(mu_);  // a link's thread drops its ends under it (end of run())
      links.swap(links_);
      // A thread inside a local call() or send() returns at once (InvalidArgument); one waiting
      // for its remote client returns within poll_interval (B1).
      for (Link& k : links) k.local.close();
    }
    for (Link& k : links) {
      if (k.thread.joinable()) k.thread.join();
    }
  }

  Result<mbmq::Channel> accept(Deadline deadline) {
    reap();
    net::Channel remote = MBMQ_TRY(listener_.accept(deadline));
    // Acquire pairs with the release decrement of an ending link: its slot is free.
    if (live_.load(std::memory_order_acquire) >= opt_.max_connections) {
      remote.close();
      refused_limit_.fetch_add(1, std::memory_order_relaxed);  // a counter: no ordering
      return fail(Errc::Busy,
                  "net::Bridge::accept: max_connections reached; the new connection was closed");
    }
    auto pair = mbmq::Channel::pair(opt_.channel);
    if (!pair) {
      remote.close();
      return fail(pair.error());
    }
    Link* k = nullptr;
    {
      os::LockGuard lock(mu_);
      k = &links_.emplace_back();
    }
    remote.set_wait_policy(opt_.remote_wait);
    k->remote = std::move(remote);
    k->local = std::move(pair->first);
    live_.fetch_add(1, std::memory_order_relaxed);  // only accept() adds: no ordering needed
    try {
      k->thread = std::thread([this, k] { run(*k); });
    } catch (const std::system_error& e) {  // out of threads (RLIMIT_NPROC, memory)
      drop_unstarted(k);
      return fail(Error::from_syscall("net::Bridge::accept: a thread for the connection",
                                      e.code().value()));
    } catch (...) {  // std::bad_alloc for the thread's state: a Result, never an exception
      drop_unstarted(k);
      return fail(Error::from_syscall("net::Bridge::accept: a thread for the connection", ENOMEM));
    }
    accepted_.fetch_add(1, std::memory_order_relaxed);  // a counter: no ordering
    return std::move(pair->second);
  }

  BridgeStats stats() const noexcept {
    BridgeStats s;
    s.accepted = accepted_.load(std::memory_order_relaxed);  // counters: no ordering
    s.refused_limit = refused_limit_.load(std::memory_order_relaxed);
    s.live = live_.load(std::memory_order_relaxed);
    s.calls = calls_.load(std::memory_order_relaxed);
    s.messages = messages_.load(std::memory_order_relaxed);
    s.no_reply = no_reply_.load(std::memory_order_relaxed);
    return s;
  }

  std::uint16_t port() const noexcept { return listener_.port(); }
  ListenerStats listener_stats() const noexcept { return listener_.stats(); }

 private:
  // Joins the threads of links that ended (from accept(): the thread that adds links).
  void reap() {
    std::list<Link> ended;
    {
      os::LockGuard lock(mu_);
      for (auto it = links_.begin(); it != links_.end();) {
        auto next = std::next(it);
        // Acquire pairs with the release store at the end of run().
        if (it->done.load(std::memory_order_acquire)) ended.splice(ended.end(), links_, it);
        it = next;
      }
    }
    for (Link& k : ended) {
      if (k.thread.joinable()) k.thread.join();
    }
  }

  // A link whose thread could not be started: its ends closed, its slot given back.
  void drop_unstarted(Link* k) {
    k->remote.close();
    k->local.close();
    live_.fetch_sub(1, std::memory_order_relaxed);
    os::LockGuard lock(mu_);
    links_.remove_if([k](const Link& l) { return &l == k; });
  }

  Deadline call_deadline() const noexcept { return Deadline::after(opt_.call_timeout); }

  void run(Link& k) {
    const auto poll = opt_.poll_interval;
    for (;;) {
      // Acquire pairs with ~BridgeCore's release store.
      if (stop_.load(std::memory_order_acquire)) break;
      // (B1) The remote client's next message, or a look at the local end.
      auto m = k.remote.receive(Deadline::after(poll));
      if (!m) {
        if (m.error().code != Errc::TimedOut) break;
        if (local_closed(k)) break;
        continue;
      }
      if (m->kind == Kind::PeerClosed) break;
      const Next next = m->kind == Kind::Request ? forward_call(k, *m) : forward_message(k, *m);
      if (next == Next::End) {
        // (B4) Closed while the request (m) is still held: its caller gets PeerClosed from the
        // Bye, not NoReply, which dropping m first would send.
        k.remote.close();
        break;
      }
      // (B1) After each message too: a remote client that keeps calling never lets receive()
      // time out, and what the server sent on its end (a request: NoReply) or its close must
      // still be seen.
      if (local_closed(k)) break;
    }
    // (B4) Remote first (if not done above), then local.
    k.remote.close();
    k.local.close();
    {
      // The ends' memory (the pair's segment mapping, the net channel) goes now, not when the
      // next accept() reaps the link. Under mu_: ~BridgeCore may be closing k.local.
      os::LockGuard lock(mu_);
      k.local = mbmq::Channel{};
      k.remote = net::Channel{};
    }
    // Release: the decrement pairs with accept()'s acquire load (a free slot).
    live_.fetch_sub(1, std::memory_order_release);
    // Release pairs with reap()'s acquire load: everything this thread did is before its join.
    k.done.store(true, std::memory_order_release);
  }

  // (B1) Whether the server closed its end. What else the server sent on it is dropped (the
  // header: the server's end can only answer).
  static bool local_closed(Link& k) {
    for (;;) {
      auto lm = k.local.receive(Deadline::immediate());
      if (!lm) return lm.error().code != Errc::TimedOut;
      if (lm->kind == Kind::PeerClosed) return true;
    }
  }

  // (B2)
  Next forward_call(Link& k, net::Message& m) {
    const Deadline d = call_deadline();  // one bound for the buffer and the call
    const std::size_t n = m.buffer.size();
    auto lb = k.local.buffer(n, d);
    if (!lb) return local_failed(lb.error().code);
    if (n != 0) std::memcpy(lb->data().data(), m.buffer.data().data(), n);  // copy in
    Status s = k.local.call(*lb, d);
    if (!s) return local_failed(s.error().code);
    const std::size_t r = lb->size();
    if (!m.buffer.resize(r)) {  // above the client's limit: it gets NoReply
      no_reply_.fetch_add(1, std::memory_order_relaxed);
      return Next::Go;
    }
    if (r != 0) std::memcpy(m.buffer.data().data(), lb->data().data(), r);  // copy out
    // A failure here is the remote client gone: (B1) sees it next.
    if (Channel::reply(std::move(m))) calls_.fetch_add(1, std::memory_order_relaxed);
    return Next::Go;
  }

  // A local step of (B2) failed with `code`: the link ends, or the remote request (dropped by
  // the caller) is answered NoReply.
  Next local_failed(Errc code) {
    if (local_ended(code)) return Next::End;
    no_reply_.fetch_add(1, std::memory_order_relaxed);  // a counter: no ordering
    return Next::Go;
  }

  // (B3)
  Next forward_message(Link& k, net::Message& m) {
    const Deadline d = call_deadline();
    const std::size_t n = m.buffer.size();
    auto lb = k.local.buffer(n, d);
    if (!lb) return local_ended(lb.error().code) ? Next::End : Next::Go;
    if (n != 0) std::memcpy(lb->data().data(), m.buffer.data().data(), n);
    // WouldBlock/Busy leave the buffer ours: try again, backing off from 20 us to 1 ms.
    std::int64_t pause_ns = 20'000;
    for (;;) {
      Status s = k.local.send(std::move(*lb));
      if (s) {
        messages_.fetch_add(1, std::memory_order_relaxed);  // a counter: no ordering
        return Next::Go;
      }
      const Errc code = s.error().code;
      if (local_ended(code)) return Next::End;
      if ((code != Errc::WouldBlock && code != Errc::Busy) || d.expired() ||
          stop_.load(std::memory_order_acquire))  // acquire: as in run()
        return Next::Go;                          // dropped
      os::sleep_ns(pause_ns);
      pause_ns = std::min<std::int64_t>(pause_ns * 2, 1'000'000);
    }
  }

  Listener listener_;
  const BridgeOptions opt_;
  const pid_t pid_;  // the process that made the bridge (and its threads)
  os::Mutex mu_;
  std::list<Link> links_ MBMQ_GUARDED_BY(mu_);  // a list: a Link never moves (its thread has it)
  std::atomic<bool> stop_{false};
  std::atomic<std::uint64_t> live_{0};
  std::atomic<std::uint64_t> accepted_{0}, refused_limit_{0}, calls_{0}, messages_{0}, no_reply_{0};
};

}  // namespace detail

Bridge::Bridge(std::unique_ptr<detail::BridgeCore> c) noexcept : core_(std::move(c)) {}
Bridge::Bridge() noexcept = default;
Bridge::Bridge(Bridge&&) noexcept = default;
Bridge& Bridge::operator=(Bridge&&) noexcept = default;
Bridge::~Bridge() = default;

Result<Bridge> Bridge::create(Listener&& listener, const BridgeOptions& options) {
  if (!listener.valid()) return fail(Errc::InvalidArgument, "net::Bridge::create: listener");
  if (options.max_connections < 1 || options.max_connections > 65536)
    return fail(Errc::InvalidArgument, "net::Bridge::create: max_connections not in 1-65536");
  if (options.poll_interval < std::chrono::milliseconds(1) ||
      options.poll_interval > std::chrono::seconds(1))
    return fail(Errc::InvalidArgument, "net::Bridge::create: poll_interval not in 1 ms - 1 s");
  if (options.call_timeout <= std::chrono::milliseconds(0))
    return fail(Errc::InvalidArgument, "net::Bridge::create: call_timeout not positive");
  return Bridge(std::make_unique<detail::BridgeCore>(std::move(listener), options));
}

Result<mbmq::Channel> Bridge::accept(Deadline deadline) {
  if (!core_) return fail(Errc::InvalidArgument, "net::Bridge::accept: invalid bridge");
  return core_->accept(deadline);
}

BridgeStats Bridge::stats() const noexcept { return core_ ? core_->stats() : BridgeStats{}; }
std::uint16_t Bridge::port() const noexcept { return core_ ? core_->port() : 0; }
ListenerStats Bridge::listener_stats() const noexcept {
  return core_ ? core_->listener_stats() : ListenerStats{};
}

}  // namespace mbmq::net
