// ListenCore: the listener's side of the rendezvous handshake (R2)-(R4) of
// include/mbmq/rendezvous.h. It runs on the watcher thread (ListenCore::on_watch), never blocking,
// and queues the server's end of each accepted channel for the queue the listener is bound to.
#include "ipc/listener_core.h"

#include <algorithm>
#include <cstring>
#include <memory>
#include <string>

#include "ipc/endpoint.h"
#include "ipc/queue_core.h"
#include "ipc/rendezvous_wire.h"
#include "ipc/stat_wire.h"
#include "mbmq/rendezvous.h"
#include "os/epoll.h"
#include "os/fault.h"
#include "os/fd.h"
#include "os/mutex.h"
#include "os/process.h"
#include "os/unix_socket.h"

namespace mbmq::detail {

namespace {

// (R3) Answers `conn` with a refusal, without fds, and closes it. Its hello is read first if it is
// there: closing a Unix socket with unread data resets the connection. One that arrives after we
// looked still resets it; the client then reads the reset, and the verdict after it (connect()).
void refuse(os::UniqueFd conn, Verdict v) noexcept {
  (void)recv_now<Hello>(conn.get(), "handshake: hello");  // any message; fds sent are closed
  (void)send_plain(conn.get(), VerdictMsg{kVerdictMagic, static_cast<std::uint32_t>(v), 0});
}

// How long accept4() pauses after EMFILE/ENFILE: doubling from the first to the last.
constexpr std::int64_t kFirstBackoffNs = 10'000'000;
constexpr std::int64_t kMaxBackoffNs = 200'000'000;
// The fds (R4) needs besides the connection: the pair's segment memfd, its duplicate, the two ends
// of its socketpair, and the two duplicates Channel::send_over() makes of the client's end
// (segment and control socket) to send them.
constexpr std::uint64_t kFdsForR4 = 6;

// The default max_connections (rendezvous.h, "File descriptors"): idle connections and silent
// handshakes together fit in three quarters of the fds free now.
std::uint32_t derived_max_connections(const ListenOptions& o) {
  const std::uint64_t soft = os::fd_limit();
  const std::uint64_t open = os::open_fd_count();
  const std::uint64_t free_fds = soft > open ? soft - open : 0;
  const std::uint64_t budget = free_fds - free_fds / 4;
  const std::uint64_t fixed = std::uint64_t{o.max_handshakes} + kFdsForR4;
  if (budget < fixed + 2 * std::uint64_t{kFdsPerConnection}) return 1;
  return static_cast<std::uint32_t>(
      std::min<std::uint64_t>(1024, (budget - fixed) / kFdsPerConnection));
}

bool allowed(const AccessPolicy& p, const os::PeerCred& c, unsigned my_uid) {
  if (p.allow_any || c.uid == my_uid) return true;
  return std::find(p.allow_uids.begin(), p.allow_uids.end(), c.uid) != p.allow_uids.end() ||
         std::find(p.allow_gids.begin(), p.allow_gids.end(), c.gid) != p.allow_gids.end();
}

// Held by the server's end of an accepted channel: counts it against max_connections until the
// end is destroyed.
struct ConnLease {
  explicit ConnLease(std::shared_ptr<ListenCore::Counters> c) : counters(std::move(c)) {
    counters->live.fetch_add(1, std::memory_order_relaxed);
  }
  ConnLease(const ConnLease&) = delete;
  ConnLease& operator=(const ConnLease&) = delete;
  std::shared_ptr<ListenCore::Counters> counters;
  ~ConnLease() { counters->live.fetch_sub(1, std::memory_order_relaxed); }
};

}  // namespace

Result<std::shared_ptr<ListenCore>> ListenCore::make(std::string_view name, ListenOptions options) {
  os::UniqueFd fd = MBMQ_TRY(os::listen_abstract(socket_name(name), options.backlog));
  std::shared_ptr<ListenCore> core(new ListenCore());
  core->owner_pid_ = os::current_pid();
  core->start_ns_ = monotonic_ns();
  core->name_ = std::string(name);
  core->max_connections_ =
      options.max_connections != 0 ? options.max_connections : derived_max_connections(options);
  core->max_handshakes_per_uid_ = options.max_handshakes_per_uid != 0
                                      ? options.max_handshakes_per_uid
                                      : std::max<std::uint32_t>(1, options.max_handshakes / 4);
  core->options_ = std::move(options);
  // Locked: once watched, the watcher thread may run on_watch() at once (accept4() failing sends
  // it to back_off_locked(), which writes listen_watch_ too).
  os::LockGuard lock(core->mu_);
  core->listen_fd_ = std::move(fd);
  // Level-triggered: a connection left in the backlog (fd table full, say) is retried at the
  // next wake-up rather than forgotten.
  core->listen_watch_ = MBMQ_TRY(watch_fd(std::weak_ptr<Watched>(core), core->listen_fd_.get(),
                                          WatchSpec{os::kEpollIn, false, 0}));
  return core;
}

ListenCore::~ListenCore() { close(); }

void ListenCore::close_in_child() noexcept { listen_fd_.reset(); }

void ListenCore::close() noexcept {
  if (os::current_pid() != owner_pid_) {
    // A forked child's copy: the parent's watcher owns the registrations, and mu_ may have been
    // copied locked. Close only our copy of the listening socket.
    close_in_child();
    return;
  }
  std::deque<Channel> drop;
  std::shared_ptr<QueueCore> q;
  {
    os::LockGuard lock(mu_);
    if (closed_) return;
    closed_ = true;
    if (listen_fd_) unwatch_fd(listen_watch_, listen_fd_.get());
    listen_fd_.reset();  // the name is free from here on
    for (auto& [fd, h] : handshakes_) unwatch_fd(h.watch_id, fd);
    handshakes_.clear();
    slots_of_.clear();
    drop.swap(arrivals_);
    ready_.store(true, std::memory_order_release);  // the queue must see the close
    q = queue_.lock();
  }
  drop.clear();  // outside the lock: closing ends takes their locks
  if (q) q->poke();
}

Status ListenCore::bind(const std::shared_ptr<QueueCore>& queue, std::uint64_t key) {
  std::shared_ptr<QueueCore> q;
  {
    os::LockGuard lock(mu_);
    if (closed_) return fail(Errc::InvalidArgument, "Listener: closed");
    queue_ = queue;
    key_ = key;
    if (!arrivals_.empty()) q = queue;
  }
  if (q) q->poke();
  return {};
}

ListenCore::Take ListenCore::take(Message* out) {
  os::LockGuard lock(mu_);
  if (!arrivals_.empty()) {
    out->buffer.reset();
    out->kind = Kind::Connection;
    out->key = key_;
    out->error = Errc::PeerClosed;
    out->channel = std::move(arrivals_.front());
    arrivals_.pop_front();
    if (arrivals_.empty() && !closed_) ready_.store(false, std::memory_order_relaxed);
    return Take::Got;
  }
  if (closed_) return Take::Gone;
  ready_.store(false, std::memory_order_relaxed);
  return Take::Empty;
}

ListenerStats ListenCore::stats() const noexcept {
  const Counters& c = *counters_;
  ListenerStats s;
  s.accepted = c.accepted.load();
  s.refused_policy = c.refused_policy.load();
  s.refused_version = c.refused_version.load();
  s.refused_limit = c.refused_limit.load();
  s.refused_busy = c.refused_busy.load();
  s.failed = c.failed.load();
  s.live = c.live.load();
  s.fd_backoffs = c.fd_backoffs.load();
  return s;
}

std::shared_ptr<QueueCore> ListenCore::queue_to_poke_locked() noexcept {
  ready_.store(true, std::memory_order_release);
  return queue_.lock();
}

void ListenCore::on_watch(int fd, std::uint32_t events) noexcept {
  bool listening;
  {
    os::LockGuard lock(mu_);
    if (closed_) return;
    listening = listen_fd_ && fd == listen_fd_.get();
    if (listening && backing_off_) {
      // The back-off timer (a oneshot: gone already). Watch the socket again, then try.
      backing_off_ = false;
      auto id =
          watch_fd(std::weak_ptr<Watched>(weak_from_this()), fd, WatchSpec{os::kEpollIn, false, 0});
      if (!id) {
        back_off_locked();
        return;
      }
      listen_watch_ = *id;
    }
  }
  if (listening) {
    accept_pending();
  } else if (events == 0) {
    // (R2) No hello within the handshake deadline: drop the connection.
    os::LockGuard lock(mu_);
    if (handshakes_.contains(fd)) {
      erase_handshake_locked(fd);
      counters_->failed.fetch_add(1, std::memory_order_relaxed);
    }
  } else {
    handshake(fd);
  }
}

void ListenCore::back_off_locked() noexcept {
  counters_->fd_backoffs.fetch_add(1, std::memory_order_relaxed);
  unwatch_fd(listen_watch_, listen_fd_.get());  // if still registered (a stale id is ignored)
  backoff_ns_ = backoff_ns_ == 0 ? kFirstBackoffNs : std::min(2 * backoff_ns_, kMaxBackoffNs);
  // No events, only the deadline: the socket stays readable (the connection that found no fd is
  // still in the backlog), and must not wake us before the delay is over.
  auto id = watch_fd(std::weak_ptr<Watched>(weak_from_this()), listen_fd_.get(),
                     WatchSpec{0, true, monotonic_ns() + backoff_ns_});
  if (id) {
    listen_watch_ = *id;
    backing_off_ = true;
    return;
  }
  // No timer (out of memory): keep listening, level-triggered, rather than never again.
  if (auto lv = watch_fd(std::weak_ptr<Watched>(weak_from_this()), listen_fd_.get(),
                         WatchSpec{os::kEpollIn, false, 0}))
    listen_watch_ = *lv;
}

void ListenCore::erase_handshake_locked(int fd) noexcept {
  auto it = handshakes_.find(fd);
  if (it == handshakes_.end()) return;
  auto n = slots_of_.find(it->second.uid);
  if (n != slots_of_.end() && --n->second == 0) slots_of_.erase(n);
  handshakes_.erase(it);
}

void ListenCore::accept_pending() noexcept {
  // Bounded per wake-up, so that a flood of connections cannot starve the other watched fds.
  for (int i = 0; i < 64; ++i) {
    os::UniqueFd conn;
    {
      os::LockGuard lock(mu_);
      if (closed_ || !listen_fd_ || backing_off_) return;
      // The handshake never waits on the connection: reads are MSG_DONTWAIT, and the sends (one
      // verdict, then at most the channel end) go into a fresh socket's empty send buffer, which
      // a client cannot shrink.
      auto r = os::accept_conn(listen_fd_.get());
      if (!r) {
        // WouldBlock: none left. Anything else (EMFILE/ENFILE: the fd table is full; ENOBUFS,
        // ENOMEM) leaves the connection in the backlog and the socket readable: pause.
        if (r.error().code != Errc::WouldBlock) back_off_locked();
        return;
      }
      backoff_ns_ = 0;
      conn = std::move(*r);
    }
    admit(std::move(conn));
  }
}

void ListenCore::admit(os::UniqueFd conn) noexcept {
  Counters& c = *counters_;
  // (R2) Who is it? The kernel recorded the peer's credentials at connect(). Asked before the
  // connection may hold anything here: a uid the policy refuses never takes a handshake slot.
  auto cred = os::peer_cred(conn.get());
  if (!cred || !allowed(options_.access, *cred, os::current_uid())) {
    c.refused_policy.fetch_add(1, std::memory_order_relaxed);
    if (cred) {  // (#18) who it was, for `mbmq stat`
      c.last_refused_uid.store(cred->uid, std::memory_order_relaxed);
      c.last_refused_pid.store(cred->pid, std::memory_order_relaxed);
    }
    refuse(std::move(conn), Verdict::RefusedPolicy);
    return;
  }
  // The usual case: the hello (or a stat query) came with the connection, and no slot is needed.
  Status got = dispatch(&conn);
  if (got || got.error().code != Errc::WouldBlock) {  // done, or garbage, or the client is gone
    if (!got) c.failed.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  // Silent so far: it waits for its hello in a slot, if the listener and its uid have one left.
  const int cfd = conn.get();
  {
    os::LockGuard lock(mu_);
    if (closed_) return;
    auto n = slots_of_.find(cred->uid);
    const std::uint32_t held = n == slots_of_.end() ? 0 : n->second;
    if (handshakes_.size() < options_.max_handshakes && held < max_handshakes_per_uid_) {
      // Saturating (Deadline::after): a handshake_timeout of any length neither wraps nor fires
      // at once.
      const std::int64_t deadline = Deadline::after(options_.handshake_timeout).ns();
      auto id = watch_fd(
          std::weak_ptr<Watched>(weak_from_this()), cfd,
          WatchSpec{os::kEpollIn | os::kEpollHangup, true, std::max<std::int64_t>(deadline, 1)});
      if (!id) {
        c.failed.fetch_add(1, std::memory_order_relaxed);
        return;
      }
      handshakes_.emplace(cfd, Handshake{std::move(conn), *id, cred->uid});
      ++slots_of_[cred->uid];
      return;
    }
  }
  c.refused_busy.fetch_add(1, std::memory_order_relaxed);
  refuse(std::move(conn), Verdict::RefusedBusy);
}

void ListenCore::handshake(int fd) noexcept {
  os::UniqueFd conn;
  {
    os::LockGuard lock(mu_);
    auto it = handshakes_.find(fd);
    if (it == handshakes_.end()) return;
    conn = std::move(it->second.conn);
    erase_handshake_locked(fd);
  }
  // (R2) The hello is a single SEQPACKET message: readable means all of it is there.
  if (!dispatch(&conn)) counters_->failed.fetch_add(1, std::memory_order_relaxed);
}

Status ListenCore::dispatch(os::UniqueFd* conn) noexcept {
  // A Hello and a StatQuery are both 16 bytes, told apart by their magic (rendezvous_wire.h,
  // stat_wire.h). Anything else closes only this connection.
  Hello h = MBMQ_TRY(recv_now<Hello>(conn->get(), "handshake: hello"));
  if (h.magic == kStatMagic) {
    StatQuery q{};
    static_assert(sizeof(q) == sizeof(h));
    std::memcpy(&q, &h, sizeof(q));
    if ((q.flags & ~kStatWantChannels) != 0) return fail(Errc::Protocol, "stat query: flags");
    answer_query(std::move(*conn), q);
    return {};
  }
  if (h.magic != kHelloMagic || (h.flags & ~kHelloUntrusted) != 0)
    return fail(Errc::Protocol, "handshake: hello");
  finish(std::move(*conn), h.version, h.flags);
  return {};
}

void ListenCore::finish(os::UniqueFd conn, std::uint32_t version, std::uint32_t flags) noexcept {
  Counters& c = *counters_;
  MBMQ_CRASH_POINT("listen.got_hello");
  Verdict verdict = Verdict::Accepted;
  if (version != kRendezvousVersion) {
    verdict = Verdict::RefusedVersion;
    c.refused_version.fetch_add(1, std::memory_order_relaxed);
  } else if (c.live.load(std::memory_order_relaxed) >= max_connections_) {
    verdict = Verdict::RefusedLimit;
    c.refused_limit.fetch_add(1, std::memory_order_relaxed);
  }
  if (verdict != Verdict::Accepted) {
    // (R3) Refused: a verdict, no fd, and the connection is closed (its hello was read).
    (void)send_plain(conn.get(), VerdictMsg{kVerdictMagic, static_cast<std::uint32_t>(verdict), 0});
    return;
  }
  // (R4) Accepted: a new channel; the client's end travels over this connection.
  // The client chooses its own end's trust mode (the receiving side chooses, P5b).
  ChannelOptions channel_options = options_.channel;
  if ((flags & kHelloUntrusted) != 0) channel_options.trust[0] = Trust::Untrusted;
  auto ends = Channel::pair(channel_options);
  if (!ends) {
    // Out of fds or memory (memfd_create, socketpair, mmap): the client may ask again.
    c.refused_busy.fetch_add(1, std::memory_order_relaxed);
    (void)send_plain(
        conn.get(), VerdictMsg{kVerdictMagic, static_cast<std::uint32_t>(Verdict::RefusedBusy), 0});
    return;
  }
  // send_over() duplicates the end's two fds: hold two fd numbers until then, so that a full fd
  // table is answered "busy" (the client asks again) rather than with a connection closed after
  // "accepted". (Another thread may still take the numbers in between: then it is the latter.)
  auto spare1 = os::dup_fd(conn.get());
  auto spare2 = os::dup_fd(conn.get());
  if (!spare1 || !spare2) {
    c.refused_busy.fetch_add(1, std::memory_order_relaxed);
    (void)send_plain(
        conn.get(), VerdictMsg{kVerdictMagic, static_cast<std::uint32_t>(Verdict::RefusedBusy), 0});
    return;
  }
  if (!send_plain(conn.get(),
                  VerdictMsg{kVerdictMagic, static_cast<std::uint32_t>(Verdict::Accepted), 0})) {
    c.failed.fetch_add(1, std::memory_order_relaxed);  // the pair is dropped, nothing leaks
    return;
  }
  spare1->reset();
  spare2->reset();
  if (!ends->first.send_over(conn.get())) {
    c.failed.fetch_add(1, std::memory_order_relaxed);  // the pair is dropped, nothing leaks
    return;
  }
  MBMQ_CRASH_POINT("listen.sent_verdict");
  const std::shared_ptr<Endpoint>& server_end = ChannelAccess::ep(ends->second);
  server_end->set_lease(std::make_shared<ConnLease>(counters_));
  // (#18) Its counters join the listener's totals when it goes; a stat query sees it till then.
  server_end->set_retire(std::shared_ptr<ListenTotals>(counters_, &counters_->totals));
  if (auto cred = os::peer_cred(conn.get()))
    register_end(server_end, cred->pid, cred->uid);
  else
    register_end(server_end, 0, ~0u);
  c.accepted.fetch_add(1, std::memory_order_relaxed);
  std::shared_ptr<QueueCore> q;
  {
    os::LockGuard lock(mu_);
    if (closed_) return;  // the end closes on the way out
    arrivals_.push_back(std::move(ends->second));
    q = queue_to_poke_locked();
  }
  if (q) q->poke();
}

}  // namespace mbmq::detail
