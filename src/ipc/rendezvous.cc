// Listener and connect(): the rendezvous handshake (R1)-(R4) of include/mbmq/rendezvous.h. The
// listener's side runs on the watcher thread (ListenCore::on_watch), never blocking.
#include "mbmq/rendezvous.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <string>

#include "ipc/endpoint.h"
#include "ipc/listener_core.h"
#include "os/epoll.h"
#include "os/fault.h"
#include "os/fd.h"
#include "os/process.h"
#include "os/unix_socket.h"

namespace mbmq {

namespace {

constexpr std::uint64_t kHelloMagic = 0x4f4c'4548'514d'424dull;    // "MBMQHELO"
constexpr std::uint64_t kVerdictMagic = 0x5443'4944'514d'424dull;  // "MBMQDICT"
constexpr std::uint32_t kRendezvousVersion = 3;
constexpr std::uint32_t kHelloUntrusted = 1;  // the client's end is to be Trust::Untrusted

struct Hello {
  std::uint64_t magic;
  std::uint32_t version;
  std::uint32_t flags;  // kHelloUntrusted; other bits must be 0
};
enum class Verdict : std::uint32_t {
  Accepted = 1,
  RefusedPolicy = 2,
  RefusedVersion = 3,
  RefusedLimit = 4,
};
struct VerdictMsg {
  std::uint64_t magic;
  std::uint32_t verdict;  // Verdict
  std::uint32_t reserved;
};
static_assert(sizeof(Hello) == 16 && sizeof(VerdictMsg) == 16);

std::string socket_name(std::string_view name) { return "mbmq:" + std::string(name); }

std::int64_t timeout_of(Deadline d) {
  return d.is_never() ? -1 : std::max<std::int64_t>(d.remaining_ns(), 0);
}

// One message of exactly sizeof(T) bytes and no fds, already queued on `sock` (non-blocking).
template <class T>
Result<T> recv_now(int sock, const char* what) {
  T msg{};
  std::array<os::UniqueFd, 1> fds;  // any fd sent here is closed when this goes out of scope
  auto r = MBMQ_TRY(
      os::recv_msg(sock, {reinterpret_cast<std::byte*>(&msg), sizeof(msg)}, fds, os::Blocking::No));
  if (r.bytes == 0 && r.nfds == 0) return fail(Errc::PeerClosed, what);
  if (r.truncated || r.bytes != sizeof(T) || r.nfds != 0) return fail(Errc::Protocol, what);
  return msg;
}

template <class T>
Status send_plain(int sock, const T& msg) {
  return os::send_msg(sock, {reinterpret_cast<const std::byte*>(&msg), sizeof(msg)}, {});
}

bool allowed(const AccessPolicy& p, const os::PeerCred& c, unsigned my_uid) {
  if (p.allow_any || c.uid == my_uid) return true;
  return std::find(p.allow_uids.begin(), p.allow_uids.end(), c.uid) != p.allow_uids.end() ||
         std::find(p.allow_gids.begin(), p.allow_gids.end(), c.gid) != p.allow_gids.end();
}

// Held by the server's end of an accepted channel: counts it against max_connections until the
// end is destroyed.
struct ConnLease {
  explicit ConnLease(std::shared_ptr<detail::ListenCore::Counters> c) : counters(std::move(c)) {
    counters->live.fetch_add(1, std::memory_order_relaxed);
  }
  ConnLease(const ConnLease&) = delete;
  ConnLease& operator=(const ConnLease&) = delete;
  std::shared_ptr<detail::ListenCore::Counters> counters;
  ~ConnLease() { counters->live.fetch_sub(1, std::memory_order_relaxed); }
};

}  // namespace

namespace detail {

Result<std::shared_ptr<ListenCore>> ListenCore::make(std::string_view name, ListenOptions options) {
  os::UniqueFd fd = MBMQ_TRY(os::listen_abstract(socket_name(name), options.backlog));
  std::shared_ptr<ListenCore> core(new ListenCore());
  core->owner_pid_ = os::current_pid();
  core->name_ = std::string(name);
  core->options_ = std::move(options);
  core->listen_fd_ = std::move(fd);
  // Level-triggered: a connection left in the backlog (fd table full, say) is retried at the
  // next wake-up rather than forgotten.
  core->listen_watch_ = MBMQ_TRY(watch_fd(std::weak_ptr<Watched>(core), core->listen_fd_.get(),
                                          WatchSpec{os::kEpollIn, false, 0}));
  return core;
}

ListenCore::~ListenCore() { close(); }

void ListenCore::close() noexcept {
  if (os::current_pid() != owner_pid_) {
    // A forked child's copy: the parent's watcher owns the registrations, and mu_ may have been
    // copied locked. Close only our copy of the listening socket.
    listen_fd_.reset();
    return;
  }
  std::deque<Channel> drop;
  std::shared_ptr<QueueCore> q;
  {
    std::lock_guard lock(mu_);
    if (closed_) return;
    closed_ = true;
    if (listen_fd_) unwatch_fd(listen_watch_, listen_fd_.get());
    listen_fd_.reset();  // the name is free from here on
    for (auto& [fd, h] : handshakes_) unwatch_fd(h.watch_id, fd);
    handshakes_.clear();
    drop.swap(arrivals_);
    ready_.store(true, std::memory_order_release);  // the queue must see the close
    q = queue_.lock();
  }
  drop.clear();  // outside the lock: closing ends takes their locks
  if (q) q->poke();
}

Status ListenCore::bind(const std::shared_ptr<QueueCore>& queue, std::uint64_t key,
                        bool exclusive) {
  std::shared_ptr<QueueCore> q;
  {
    std::lock_guard lock(mu_);
    if (closed_) return fail(Errc::InvalidArgument, "Listener: closed");
    if (exclusive && !queue_.expired() && queue_.lock() != queue)
      return fail(Errc::Busy, "Listener::redirect: already redirected");
    queue_ = queue;
    key_ = key;
    if (!arrivals_.empty()) q = queue;
  }
  if (q) q->poke();
  return {};
}

ListenCore::Take ListenCore::take(Message* out) {
  std::lock_guard lock(mu_);
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
  return ListenerStats{c.accepted.load(),      c.refused_policy.load(), c.refused_version.load(),
                       c.refused_limit.load(), c.failed.load(),         c.live.load()};
}

std::shared_ptr<QueueCore> ListenCore::queue_to_poke_locked() noexcept {
  ready_.store(true, std::memory_order_release);
  return queue_.lock();
}

void ListenCore::on_watch(int fd, std::uint32_t events) noexcept {
  bool listening;
  {
    std::lock_guard lock(mu_);
    if (closed_) return;
    listening = listen_fd_ && fd == listen_fd_.get();
  }
  if (listening) {
    accept_pending();
  } else if (events == 0) {
    // (R2) No hello within the handshake deadline: drop the connection.
    std::lock_guard lock(mu_);
    if (handshakes_.erase(fd) > 0) counters_->failed.fetch_add(1, std::memory_order_relaxed);
  } else {
    handshake(fd);
  }
}

void ListenCore::accept_pending() noexcept {
  // Bounded per wake-up, so that a flood of connections cannot starve the other watched fds.
  for (int i = 0; i < 64; ++i) {
    std::lock_guard lock(mu_);
    if (closed_ || !listen_fd_) return;
    auto conn = os::accept_conn(listen_fd_.get());
    if (!conn) {
      // WouldBlock: none left. Otherwise (fd table full, ...): count it and retry on the next
      // wake-up; the connection stays in the kernel's backlog meanwhile.
      if (conn.error().code != Errc::WouldBlock)
        counters_->failed.fetch_add(1, std::memory_order_relaxed);
      return;
    }
    if (handshakes_.size() >= options_.max_handshakes) {
      counters_->failed.fetch_add(1, std::memory_order_relaxed);  // closed unanswered
      continue;
    }
    const int cfd = conn->get();
    std::int64_t deadline =
        monotonic_ns() +
        std::chrono::duration_cast<std::chrono::nanoseconds>(options_.handshake_timeout).count();
    auto id = watch_fd(
        std::weak_ptr<Watched>(weak_from_this()), cfd,
        WatchSpec{os::kEpollIn | os::kEpollHangup, true, std::max<std::int64_t>(deadline, 1)});
    if (!id) {
      counters_->failed.fetch_add(1, std::memory_order_relaxed);
      continue;
    }
    handshakes_.emplace(cfd, Handshake{std::move(*conn), *id});
  }
}

void ListenCore::handshake(int fd) noexcept {
  os::UniqueFd conn;
  {
    std::lock_guard lock(mu_);
    auto it = handshakes_.find(fd);
    if (it == handshakes_.end()) return;
    conn = std::move(it->second.conn);
    handshakes_.erase(it);
  }
  Counters& c = *counters_;
  // (R2) The hello is a single SEQPACKET message: readable means all of it is there.
  auto hello = recv_now<Hello>(conn.get(), "handshake: hello");
  if (!hello || hello->magic != kHelloMagic || (hello->flags & ~kHelloUntrusted) != 0) {
    c.failed.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  MBMQ_CRASH_POINT("listen.got_hello");
  // Who is it? The kernel recorded the peer's credentials at connect().
  auto cred = os::peer_cred(conn.get());
  Verdict verdict = Verdict::Accepted;
  if (!cred || !allowed(options_.access, *cred, os::current_uid())) {
    verdict = Verdict::RefusedPolicy;
    c.refused_policy.fetch_add(1, std::memory_order_relaxed);
  } else if (hello->version != kRendezvousVersion) {
    verdict = Verdict::RefusedVersion;
    c.refused_version.fetch_add(1, std::memory_order_relaxed);
  } else if (c.live.load(std::memory_order_relaxed) >= options_.max_connections) {
    verdict = Verdict::RefusedLimit;
    c.refused_limit.fetch_add(1, std::memory_order_relaxed);
  }
  if (verdict != Verdict::Accepted) {
    // (R3) Refused: a verdict, no fd, and the connection is closed.
    (void)send_plain(conn.get(), VerdictMsg{kVerdictMagic, static_cast<std::uint32_t>(verdict), 0});
    return;
  }
  // (R4) Accepted: a new channel; the client's end travels over this connection.
  // The client chooses its own end's trust mode (the receiving side chooses, P5b).
  ChannelOptions channel_options = options_.channel;
  if ((hello->flags & kHelloUntrusted) != 0) channel_options.trust[0] = Trust::Untrusted;
  auto ends = Channel::pair(channel_options);
  if (!ends ||
      !send_plain(conn.get(),
                  VerdictMsg{kVerdictMagic, static_cast<std::uint32_t>(Verdict::Accepted), 0}) ||
      !ends->first.send_over(conn.get())) {
    c.failed.fetch_add(1, std::memory_order_relaxed);  // the pair is dropped, nothing leaks
    return;
  }
  MBMQ_CRASH_POINT("listen.sent_verdict");
  ChannelAccess::ep(ends->second)->set_lease(std::make_shared<ConnLease>(counters_));
  c.accepted.fetch_add(1, std::memory_order_relaxed);
  std::shared_ptr<QueueCore> q;
  {
    std::lock_guard lock(mu_);
    if (closed_) return;  // the end closes on the way out
    arrivals_.push_back(std::move(ends->second));
    q = queue_to_poke_locked();
  }
  if (q) q->poke();
}

}  // namespace detail

// ---- Listener --------------------------------------------------------------------------------

Listener& Listener::operator=(Listener&& o) noexcept {
  if (this != &o) {
    if (core_) core_->close();
    core_ = std::move(o.core_);
    own_queue_ = std::move(o.own_queue_);
    name_ = std::move(o.name_);
  }
  return *this;
}

Listener::~Listener() {
  if (core_) core_->close();
}

Result<Listener> Listener::create(std::string_view name, ListenOptions options) {
  Listener l;
  l.core_ = MBMQ_TRY(detail::ListenCore::make(name, std::move(options)));
  l.own_queue_ = MBMQ_TRY(detail::QueueCore::make(WaitPolicy{WaitMode::Sleep}));
  MBMQ_TRY(l.core_->bind(l.own_queue_, 0, false));
  l.own_queue_->add_listener(l.core_);
  l.name_ = std::string(name);
  return l;
}

Result<Channel> Listener::accept(Deadline deadline) {
  if (!core_) return fail(Errc::InvalidArgument, "Listener::accept: invalid listener");
  if (!own_queue_) return fail(Errc::InvalidArgument, "Listener::accept: redirected to a queue");
  Message m = MBMQ_TRY(own_queue_->wait(deadline));
  if (m.kind != Kind::Connection) return fail(Errc::InvalidArgument, "Listener::accept: closed");
  return std::move(m.channel);
}

Status Listener::redirect(MsgQueue& queue, std::uint64_t key) {
  if (!core_ || !queue.core_) return fail(Errc::InvalidArgument, "Listener::redirect");
  if (!own_queue_) return fail(Errc::Busy, "Listener::redirect: already redirected");
  MBMQ_TRY(core_->bind(queue.core_, key, false));
  own_queue_->remove_listener(core_.get());
  own_queue_.reset();
  queue.core_->add_listener(core_);
  queue.core_->poke();
  return {};
}

ListenerStats Listener::stats() const noexcept { return core_ ? core_->stats() : ListenerStats{}; }

std::uint64_t Listener::refused() const noexcept {
  ListenerStats s = stats();
  return s.refused_policy + s.refused_version + s.refused_limit;
}

// ---- connect ---------------------------------------------------------------------------------

Result<Channel> connect(std::string_view name, Deadline deadline, WaitPolicy wait, Trust trust) {
  // (R1)
  os::UniqueFd sock = MBMQ_TRY(os::connect_abstract(socket_name(name)));
  MBMQ_TRY(send_plain(sock.get(), Hello{kHelloMagic, kRendezvousVersion,
                                        trust == Trust::Untrusted ? kHelloUntrusted : 0u}));
  MBMQ_CRASH_POINT("connect.sent_hello");
  bool ready = MBMQ_TRY(os::wait_readable(sock.get(), timeout_of(deadline)));
  if (!ready) return fail(Errc::TimedOut, "connect: no verdict from the listener");
  auto v = MBMQ_TRY(recv_now<VerdictMsg>(sock.get(), "connect: verdict"));
  MBMQ_CRASH_POINT("connect.got_verdict");
  if (v.magic != kVerdictMagic) return fail(Errc::Protocol, "connect: verdict");
  switch (static_cast<Verdict>(v.verdict)) {
    case Verdict::Accepted:
      break;
    case Verdict::RefusedPolicy:
      return fail(Errc::Refused, "connect: the listener's access policy refused this uid");
    case Verdict::RefusedVersion:
      return fail(Errc::Refused, "connect: protocol version not supported by the listener");
    case Verdict::RefusedLimit:
      return fail(Errc::Refused, "connect: the listener is at its connection limit");
    default:
      return fail(Errc::Protocol, "connect: verdict");
  }
  Channel ch = MBMQ_TRY(Channel::receive_from(sock.get(), deadline));
  // A listener that ignored the request (or lied) does not get a cooperative end from us.
  if (trust == Trust::Untrusted && !detail::ChannelAccess::ep(ch)->untrusted())
    return fail(Errc::Refused, "connect: the listener did not make this end untrusted");
  ch.set_wait_policy(wait);
  return ch;
}

}  // namespace mbmq
