// Listener and connect(): the rendezvous handshake (R1)-(R4) of include/mbmq/rendezvous.h. The
// listener's side runs on the watcher thread (ListenCore::on_watch), never blocking.
#include "mbmq/rendezvous.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <new>
#include <string>

#include "ipc/endpoint.h"
#include "ipc/listener_core.h"
#include "ipc/queue_core.h"
#include "os/epoll.h"
#include "os/fault.h"
#include "os/fd.h"
#include "os/mutex.h"
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
  RefusedBusy = 5,  // handshake slots taken, or out of fds: the client may ask again
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

// The hello, if it has arrived (Errc::WouldBlock if not); Errc::Protocol if it is not one.
Result<Hello> read_hello(int conn) {
  Hello h = MBMQ_TRY(recv_now<Hello>(conn, "handshake: hello"));
  if (h.magic != kHelloMagic || (h.flags & ~kHelloUntrusted) != 0)
    return fail(Errc::Protocol, "handshake: hello");
  return h;
}

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
  if (budget < fixed + 2 * kFdsPerConnection) return 1;
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
    if (handshakes_.count(fd) > 0) {
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
    refuse(std::move(conn), Verdict::RefusedPolicy);
    return;
  }
  // The usual case: the hello came with the connection, and no slot is needed.
  auto hello = read_hello(conn.get());
  if (hello) {
    finish(std::move(conn), hello->version, hello->flags);
    return;
  }
  if (hello.error().code != Errc::WouldBlock) {  // garbage, or the client is gone
    c.failed.fetch_add(1, std::memory_order_relaxed);
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
  auto hello = read_hello(conn.get());
  if (!hello) {
    counters_->failed.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  finish(std::move(conn), hello->version, hello->flags);
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
  ChannelAccess::ep(ends->second)->set_lease(std::make_shared<ConnLease>(counters_));
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
  MBMQ_TRY(l.core_->bind(l.own_queue_, 0));
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
  MBMQ_TRY(core_->bind(queue.core_, key));
  own_queue_->remove_listener(core_.get());
  own_queue_.reset();
  queue.core_->add_listener(core_);
  queue.core_->poke();
  return {};
}

ListenerStats Listener::stats() const noexcept { return core_ ? core_->stats() : ListenerStats{}; }

std::uint64_t Listener::refused() const noexcept {
  ListenerStats s = stats();
  return s.refused_policy + s.refused_version + s.refused_limit + s.refused_busy;
}

std::uint32_t Listener::max_connections() const noexcept {
  return core_ ? core_->max_connections() : 0;
}

// ---- connect ---------------------------------------------------------------------------------

namespace {

// Error::op is a static string; the uid found is not known until run time. Each distinct message
// is made once and kept for the life of the process (so op stays valid on any thread, after any
// later refusal), in a fixed table filled without a lock (fork-safe): at most kNamedUids of them,
// then one message that does not name the uid.
constexpr std::size_t kNamedUids = 64;
std::array<std::atomic<const char*>, kNamedUids> g_untrusted_text{};

const char* untrusted_listener(unsigned uid) noexcept {
  char text[160];
  std::snprintf(text, sizeof text,
                "connect: the listener runs as uid %u, which this client does not trust "
                "(ConnectOptions::server)",
                uid);
  for (auto& slot : g_untrusted_text) {
    const char* have = slot.load(std::memory_order_acquire);  // pairs with the release CAS below
    if (have == nullptr) {
      const std::size_t n = std::strlen(text) + 1;
      char* mine = new (std::nothrow) char[n];
      if (mine == nullptr) break;
      std::memcpy(mine, text, n);
      // Release: the text is written before the pointer is seen.
      if (slot.compare_exchange_strong(have, mine, std::memory_order_acq_rel)) return mine;
      delete[] mine;  // another thread filled this slot first: compare with its text
    }
    if (std::strcmp(have, text) == 0) return have;
  }
  return "connect: the listener runs as a uid this client does not trust (ConnectOptions::server;"
         " too many distinct uids to name it)";
}

bool trusted(const ServerPolicy& p, const os::PeerCred& c) {
  if (p.check) return p.check(PeerIdentity{c.pid, c.uid, c.gid});
  if (p.allow_any) return true;
  if (p.expected_uids.empty())
    return c.uid == 0 || c.uid == os::current_uid() || c.uid == os::effective_uid();
  return std::find(p.expected_uids.begin(), p.expected_uids.end(), c.uid) != p.expected_uids.end();
}

constexpr const char* kBusy =
    "connect: the listener stayed busy until the deadline (handshake slots taken, or out of fds)";

// The verdict on `sock`, at most until the deadline. A listener that refused us at accept (R2)
// may have closed with our hello unread: the kernel then reports the reset once, ahead of the
// verdict still queued for us, so a reset is followed by one more read.
Result<VerdictMsg> read_verdict(int sock, Deadline deadline) {
  bool ready = MBMQ_TRY(os::wait_readable(sock, timeout_of(deadline)));
  if (!ready) return fail(Errc::TimedOut, "connect: no verdict from the listener");
  auto v = recv_now<VerdictMsg>(sock, "connect: the listener closed without a verdict");
  if (!v && v.error().code == Errc::PeerClosed)
    v = recv_now<VerdictMsg>(sock, "connect: the listener closed without a verdict");
  if (!v && v.error().code == Errc::WouldBlock)
    return fail(Errc::PeerClosed, "connect: the listener closed without a verdict");
  return v;
}

// One attempt; *busy says the listener answered "busy" (connect() asks again).
Result<Channel> connect_once(std::string_view name, Deadline deadline, const ConnectOptions& o,
                             bool* busy) {
  // (R1) connect(2): it waits while the listener's backlog is full, until the deadline.
  os::UniqueFd sock = MBMQ_TRY(os::connect_abstract(socket_name(name), timeout_of(deadline)));
  // Who listens? SO_PEERCRED of a connected socket names the listener (at its listen()). Checked
  // before anything is sent: a process squatting the name gets no hello, no data.
  const os::PeerCred cred = MBMQ_TRY(os::peer_cred(sock.get()));
  if (!trusted(o.server, cred)) return fail(Errc::Refused, untrusted_listener(cred.uid));
  auto sent = send_plain(sock.get(), Hello{kHelloMagic, kRendezvousVersion,
                                           o.trust == Trust::Untrusted ? kHelloUntrusted : 0u});
  // PeerClosed: the listener refused us at accept and closed; its verdict is still to be read.
  if (!sent && sent.error().code != Errc::PeerClosed) return fail(sent.error());
  MBMQ_CRASH_POINT("connect.sent_hello");
  auto v = MBMQ_TRY(read_verdict(sock.get(), deadline));
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
    case Verdict::RefusedBusy:
      *busy = true;
      return fail(Errc::Refused, kBusy);
    default:
      return fail(Errc::Protocol, "connect: verdict");
  }
  if (!sent) return fail(Errc::Protocol, "connect: accepted without a hello");
  auto received = Channel::receive_from(sock.get(), deadline);
  if (!received && received.error().code == Errc::PeerClosed)
    return fail(Errc::PeerClosed,
                "connect: the listener accepted, then closed without the channel");
  Channel ch = MBMQ_TRY(std::move(received));
  // A listener that ignored the request (or lied) does not get a cooperative end from us.
  if (o.trust == Trust::Untrusted && !detail::ChannelAccess::ep(ch)->untrusted())
    return fail(Errc::Refused, "connect: the listener did not make this end untrusted");
  ch.set_wait_policy(o.wait);
  return ch;
}

}  // namespace

Result<Channel> connect(std::string_view name, Deadline deadline, const ConnectOptions& options) {
  // "Busy" is the listener's word for "not now" (R2): ask again, pausing a little longer each
  // time, until the deadline.
  std::int64_t pause_ns = 1'000'000;
  for (;;) {
    bool busy = false;
    auto ch = connect_once(name, deadline, options, &busy);
    if (ch || !busy) return ch;
    const std::int64_t left = deadline.remaining_ns();
    if (left <= pause_ns) return ch;
    os::sleep_ns(pause_ns);
    pause_ns = std::min<std::int64_t>(2 * pause_ns, 50'000'000);
  }
}

Result<Channel> connect(std::string_view name, Deadline deadline, WaitPolicy wait, Trust trust) {
  ConnectOptions o;
  o.wait = wait;
  o.trust = trust;
  return connect(name, deadline, o);
}

}  // namespace mbmq
