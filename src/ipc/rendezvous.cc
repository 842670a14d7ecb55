// Listener and connect(): the handles of include/mbmq/rendezvous.h and the client's side of the
// rendezvous handshake (R1)-(R4). The listener's side is ListenCore (ipc/listener_core.cc); the
// messages both sides exchange are in ipc/rendezvous_wire.h.
#include "mbmq/rendezvous.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <new>
#include <string>

#include "ipc/endpoint.h"
#include "ipc/foreign_channel.h"
#include "ipc/listener_core.h"
#include "ipc/queue_core.h"
#include "ipc/rendezvous_wire.h"
#include "os/fault.h"
#include "os/fd.h"
#include "os/process.h"
#include "os/unix_socket.h"

namespace mbmq {

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

namespace detail {
namespace {
std::atomic<RemoteConnector> g_remote_connector{nullptr};
}  // namespace
void set_remote_connector(RemoteConnector c) noexcept {
  g_remote_connector.store(c, std::memory_order_release);
}
RemoteConnector remote_connector() noexcept {
  return g_remote_connector.load(std::memory_order_acquire);
}
}  // namespace detail

namespace {
// A URL of mbmq::net (include/mbmq/net.h): the core does not speak UCX and never links it.
bool is_net_url(std::string_view name) { return name.substr(0, 6) == "ucx://"; }
}  // namespace

Result<Listener> Listener::create(std::string_view name, ListenOptions options) {
  if (is_net_url(name))
    return fail(Errc::InvalidArgument,
                "Listener::create: ucx:// URLs need mbmq::net: link mbmq::net and call "
                "mbmq::net::listen (include/mbmq/net.h)");
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

using detail::Hello;
using detail::kHelloMagic;
using detail::kHelloUntrusted;
using detail::kRendezvousVersion;
using detail::kVerdictMagic;
using detail::recv_now;
using detail::send_plain;
using detail::socket_name;
using detail::Verdict;
using detail::VerdictMsg;

std::int64_t timeout_of(Deadline d) {
  return d.is_never() ? -1 : std::max<std::int64_t>(d.remaining_ns(), 0);
}

// Error::op is a static string; the uid found is not known until run time. Each distinct message
// is made once and kept for the life of the process (so op stays valid on any thread, after any
// later refusal), in a fixed table filled without a lock (fork-safe): at most kNamedUids of them,
// then one message that does not name the uid.
constexpr std::size_t kNamedUids = 64;
std::array<std::atomic<const char*>, kNamedUids> g_untrusted_text{};

const char* untrusted_listener(unsigned uid) noexcept {
  char text[160];
  (void)std::snprintf(text, sizeof text,
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
  if (is_net_url(name)) {
    // mbmq::net's connector, when it is linked (ipc/foreign_channel.h): a remote end.
    if (detail::RemoteConnector c = detail::remote_connector()) return c(name, deadline, options);
    return fail(Errc::InvalidArgument,
                "connect: ucx:// URLs need mbmq::net: link mbmq::net (include/mbmq/net.h)");
  }
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
