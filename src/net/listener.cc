// net/listener.cc: ListenCore (a UCX listener and the handshake (N2)-(N4) of docs/design/net.md)
// and the public classes of include/mbmq/net.h.
#include <arpa/inet.h>
#include <netinet/in.h>

#include <algorithm>
#include <charconv>
#include <cstring>

#include "net/core.h"
#include "os/fd.h"

namespace mbmq::net {
namespace detail {
namespace {

void on_conn_request(ucp_conn_request_h req, void* arg) {
  auto* l = static_cast<ListenCore*>(arg);
  l->w_->assert_held();
  l->on_conn_request_locked(req);
}

// The client's address as text ("10.0.0.2"), or "" if UCX cannot say.
std::string client_address(const Ucx* u, ucp_conn_request_h req) {
  ucp_conn_request_attr_t a{};
  a.field_mask = UCP_CONN_REQUEST_ATTR_FIELD_CLIENT_ADDR;
  if (u->ucp_conn_request_query(req, &a) != UCS_OK) return {};
  char text[INET6_ADDRSTRLEN] = {};
  if (a.client_address.ss_family == AF_INET) {
    sockaddr_in sa{};
    std::memcpy(&sa, &a.client_address, sizeof sa);
    if (inet_ntop(AF_INET, &sa.sin_addr, text, sizeof text) == nullptr) return {};
  } else if (a.client_address.ss_family == AF_INET6) {
    sockaddr_in6 sa{};
    std::memcpy(&sa, &a.client_address, sizeof sa);
    if (inet_ntop(AF_INET6, &sa.sin6_addr, text, sizeof text) == nullptr) return {};
  }
  return text;
}

}  // namespace

Result<std::shared_ptr<ListenCore>> ListenCore::make(const Ucx* u, const std::string& addr,
                                                     std::uint16_t port, std::string service,
                                                     const ListenOptions& options) {
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_port = htons(port);
  if (inet_pton(AF_INET, addr.c_str(), &sa.sin_addr) != 1)
    return fail(Errc::InvalidArgument, "net::listen: the address must be an IPv4 literal");
  auto w = MBMQ_TRY(WorkerCore::make(u));
  std::shared_ptr<ListenCore> l(new ListenCore(w, std::move(service), options));
  os::LockGuard lock(l->w_->mu);
  ucp_listener_params_t p{};
  p.field_mask = UCP_LISTENER_PARAM_FIELD_SOCK_ADDR | UCP_LISTENER_PARAM_FIELD_CONN_HANDLER;
  p.sockaddr.addr = reinterpret_cast<const sockaddr*>(&sa);
  p.sockaddr.addrlen = sizeof sa;
  p.conn_handler.cb = on_conn_request;
  p.conn_handler.arg = l.get();
  const ucs_status_t s = u->ucp_listener_create(w->worker, &p, &l->listener_);
  if (s == UCS_ERR_BUSY)
    return fail(Error::from_syscall("net::listen: address in use", EADDRINUSE));
  if (s != UCS_OK) return fail(Errc::System, "net::listen: ucp_listener_create failed");
  ucp_listener_attr_t a{};
  a.field_mask = UCP_LISTENER_ATTR_FIELD_SOCKADDR;
  if (u->ucp_listener_query(l->listener_, &a) == UCS_OK && a.sockaddr.ss_family == AF_INET) {
    sockaddr_in bound{};
    std::memcpy(&bound, &a.sockaddr, sizeof bound);
    l->port_ = ntohs(bound.sin_port);
  }
  return l;
}

ListenCore::~ListenCore() {
  if (!ucx_usable()) return;
  std::vector<std::shared_ptr<ChannelCore>> drop;  // destroyed unlocked (they take the lock)
  std::shared_ptr<NetSource> source;               // (Q6) the same (its connections would)
  os::LockGuard lock(w_->mu);
  if (listener_ != nullptr) w_->u->ucp_listener_destroy(listener_);
  listener_ = nullptr;
  unredirect_locked(source);
  for (auto& c : pending_) {
    c->assert_held();  // our worker's
    c->listener_ = nullptr;
    c->close_ep_locked(ChannelCore::Close::Force);
  }
  drop.swap(pending_);
  for (auto& c : ready_) drop.push_back(std::move(c));
  ready_.clear();
  for (auto& c : graveyard_) drop.push_back(std::move(c));
  graveyard_.clear();
  // `lock` is released before `drop` is destroyed (declared before it).
}

void ListenCore::on_conn_request_locked(ucp_conn_request_h req) {
  w_->news_locked(this);  // (W2) for accept() (a graveyard_ entry below, say)
  if (!options_.allow.empty()) {
    const std::string who = client_address(w_->u, req);
    if (std::find(options_.allow.begin(), options_.allow.end(), who) == options_.allow.end()) {
      // (N2) Not on the list: rejected before any endpoint exists; the client sees Refused.
      ++stats_.refused_address;
      (void)w_->u->ucp_listener_reject(listener_, req);
      return;
    }
  }
  if (held_locked() >= options_.backlog) {
    // (N6) As many connections held as the backlog allows, none taken by the application yet: a
    // client connecting in bulk cannot make us hold more (an endpoint and a socket each); it
    // sees Refused, as a full listen backlog refuses.
    ++stats_.refused_backlog;
    (void)w_->u->ucp_listener_reject(listener_, req);
    return;
  }
  auto ch = std::make_shared<ChannelCore>(w_, State::Pending);
  ch->assert_held();  // our worker's
  if (!ch->accept_locked(req, this)) {
    // (A client that gave up already, say.) Not destroyed here: ~ChannelCore takes the worker's
    // mutex, held in this callback. accept() (or ~ListenCore) destroys it unlocked.
    ++stats_.failed;
    graveyard_.push_back(std::move(ch));
    return;
  }
  // Expired by the keeper thread too: a server that no longer calls accept() must not keep silent
  // connections (an endpoint and a socket each) for ever.
  watch_handshake(ch, options_.handshake_timeout);
  pending_.push_back(std::move(ch));
}

void ListenCore::on_hello_locked(ChannelCore* ch, std::uint16_t verdict) {
  auto it = std::find_if(pending_.begin(), pending_.end(),
                         [&](const std::shared_ptr<ChannelCore>& c) { return c.get() == ch; });
  if (it == pending_.end()) return;
  w_->news_locked(this);  // (W2) ready_ or graveyard_ grows
  std::shared_ptr<ChannelCore> c = std::move(*it);
  pending_.erase(it);
  c->assert_held();  // our worker's
  c->listener_ = nullptr;
  if (verdict == kHelloOk) {
    ++stats_.accepted;
    keep_alive(c, options_.peer_timeout, std::chrono::milliseconds(c->peer_timeout_ms_));
    ready_.push_back(std::move(c));
    return;
  }
  ++stats_.refused_service;
  c->state_ = State::Closed;
  c->closed_code_ = Errc::Refused;
  c->close_ep_locked(ChannelCore::Close::FlushAsync);  // the HelloAck goes out first
  graveyard_.push_back(std::move(c));
}

void ListenCore::drop_pending_locked(ChannelCore* ch) {
  auto it = std::find_if(pending_.begin(), pending_.end(),
                         [&](const std::shared_ptr<ChannelCore>& c) { return c.get() == ch; });
  if (it == pending_.end()) return;
  w_->news_locked(this);  // (W2) graveyard_ grows
  ++stats_.failed;
  graveyard_.push_back(std::move(*it));
  pending_.erase(it);
}

void ListenCore::expire_pending_locked() {
  const std::int64_t now = monotonic_ns();
  const std::int64_t limit =
      std::chrono::duration_cast<std::chrono::nanoseconds>(options_.handshake_timeout).count();
  std::vector<ChannelCore*> late;
  for (auto& c : pending_)
    if (now - c->pending_since_ns_ > limit) late.push_back(c.get());
  for (ChannelCore* c : late) {
    c->assert_held();  // our worker's
    c->fail_locked(Errc::Protocol, "net: no hello in time");
  }
}

Result<std::shared_ptr<ChannelCore>> ListenCore::accept(Deadline deadline) {
  MBMQ_TRY(check_not_forked());
  std::vector<std::shared_ptr<ChannelCore>> drop;  // destroyed unlocked
  for (;;) {
    // Wake at least every 50 ms to expire silent handshakes.
    const Deadline tick = Deadline::after(std::chrono::milliseconds(50));
    const Deadline d = deadline.ns() < tick.ns() ? deadline : tick;
    // (N4) A channel is handed out once its HelloAck has left: returned earlier, with a server
    // that then does not progress the worker for a while (no keeper with peer_timeout 0), the
    // HelloAck stayed queued in UCX (the endpoint still wiring up) and the client's connect()
    // timed out.
    const auto first_acceptable = [&] {  // called with mu held
      w_->assert_held();
      return std::find_if(ready_.begin(), ready_.end(), [&](const auto& c) {
        c->assert_held();  // our worker's
        return c->acceptable_locked();
      });
    };
    const bool ready = MBMQ_TRY(w_->run_until(d, WaitPolicy{WaitMode::Sleep}, this, [&] {
      w_->assert_held();
      return first_acceptable() != ready_.end() || !graveyard_.empty() || source_ != nullptr;
    }));
    std::shared_ptr<ChannelCore> got;
    {
      os::LockGuard lock(w_->mu);
      if (source_ != nullptr)  // (Q6) connections go to the queue now
        return fail(Errc::InvalidArgument, "net::Listener::accept: redirected to a queue");
      expire_pending_locked();
      for (auto& c : graveyard_) drop.push_back(std::move(c));
      graveyard_.clear();
      if (auto it = first_acceptable(); it != ready_.end()) {
        got = std::move(*it);
        ready_.erase(it);
      }
    }
    drop.clear();
    if (got) return got;
    if (!ready && deadline.expired()) return fail(Errc::TimedOut, "net::Listener::accept");
  }
}

ListenerStats ListenCore::stats() noexcept {
  if (!ucx_usable()) return {};  // a forked child: the lock may be held for ever
  os::LockGuard lock(w_->mu);
  return stats_;
}

}  // namespace detail

// ---- URLs ----

namespace {

struct Url {
  std::string host;
  std::uint16_t port = 0;
  std::string service;
};

// "ucx://HOST:PORT/service".
Result<Url> parse(std::string_view url, const char* op) {
  constexpr std::string_view kScheme = "ucx://";
  if (url.substr(0, kScheme.size()) != kScheme) return fail(Errc::InvalidArgument, op);
  url.remove_prefix(kScheme.size());
  const auto slash = url.find('/');
  const auto colon = url.rfind(':', slash);
  if (slash == std::string_view::npos || colon == std::string_view::npos || colon == 0)
    return fail(Errc::InvalidArgument, op);
  Url u;
  u.host = std::string(url.substr(0, colon));
  const std::string_view port = url.substr(colon + 1, slash - colon - 1);
  unsigned value = 0;
  auto [end, ec] = std::from_chars(port.data(), port.data() + port.size(), value);
  if (ec != std::errc{} || end != port.data() + port.size() || value > 65535 || port.empty())
    return fail(Errc::InvalidArgument, op);
  u.port = static_cast<std::uint16_t>(value);
  u.service = std::string(url.substr(slash + 1));
  if (u.service.empty() || u.service.size() > 255) return fail(Errc::InvalidArgument, op);
  return u;
}

}  // namespace

Result<Listener> listen(std::string_view url, const ListenOptions& options) {
  Url u = MBMQ_TRY(parse(url, "net::listen: expected ucx://ADDR:PORT/service"));
  if (options.inbox_messages == 0 || options.inbox_bytes == 0)
    return fail(Errc::InvalidArgument, "net::listen: inbox_messages and inbox_bytes must be >= 1");
  if (options.backlog == 0) return fail(Errc::InvalidArgument, "net::listen: backlog must be >= 1");
  const detail::Ucx* x = MBMQ_TRY(detail::ucx());
  Listener l;
  l.core_ = MBMQ_TRY(detail::ListenCore::make(x, u.host, u.port, u.service, options));
  return l;
}

Result<Channel> connect(std::string_view url, Deadline deadline, const ConnectOptions& options) {
  Url u = MBMQ_TRY(parse(url, "net::connect: expected ucx://HOST:PORT/service"));
  if (options.inbox_messages == 0 || options.inbox_bytes == 0)
    return fail(Errc::InvalidArgument, "net::connect: inbox_messages and inbox_bytes must be >= 1");
  const detail::Ucx* x = MBMQ_TRY(detail::ucx());
  auto core = MBMQ_TRY(detail::ChannelCore::connect(
      x, u.host, u.port, u.service, deadline, options.wait, options.peer_timeout,
      detail::Grant{options.inbox_messages, options.inbox_bytes}));
  detail::keep_alive(core, options.peer_timeout, core->peer_timeout());
  return Channel(std::move(core));
}

// ---- Listener ----

Listener& Listener::operator=(Listener&& o) noexcept {
  core_ = std::move(o.core_);
  return *this;
}
Listener::~Listener() = default;

Result<Channel> Listener::accept(Deadline deadline) {
  if (!core_) return fail(Errc::InvalidArgument, "net::Listener::accept: invalid listener");
  return Channel(MBMQ_TRY(core_->accept(deadline)));
}
ListenerStats Listener::stats() const noexcept { return core_ ? core_->stats() : ListenerStats{}; }
std::uint16_t Listener::port() const noexcept { return core_ ? core_->port() : 0; }

// ---- Channel and Buffer ----

Channel& Channel::operator=(Channel&& o) noexcept {
  if (this != &o) {
    close();
    core_ = std::move(o.core_);
  }
  return *this;
}
Channel::~Channel() { close(); }

Result<Buffer> Channel::buffer(std::size_t size) {
  if (!valid()) return fail(Errc::InvalidArgument, "net::Channel::buffer: closed");
  return core_->buffer(size);
}
Status Channel::call(Buffer& buf, Deadline deadline) {
  if (!valid()) return fail(Errc::InvalidArgument, "net::Channel::call: closed");
  return core_->call(buf, deadline);
}
Status Channel::send(Buffer&& buf) {
  if (!valid()) return fail(Errc::InvalidArgument, "net::Channel::send: closed");
  return core_->send(std::move(buf), Deadline::immediate(), detail::ChannelCore::NoCredit::Fail);
}
Status Channel::send(Buffer&& buf, Deadline deadline) {
  if (!valid()) return fail(Errc::InvalidArgument, "net::Channel::send: closed");
  return core_->send(std::move(buf), deadline, detail::ChannelCore::NoCredit::Wait);
}
Status Channel::send_request(Buffer&& buf) {
  if (!valid()) return fail(Errc::InvalidArgument, "net::Channel::send_request: closed");
  return core_->send(std::move(buf), Deadline::immediate(), detail::ChannelCore::NoCredit::Fail,
                     detail::WireKind::Request);
}
Status Channel::send_request(Buffer&& buf, Deadline deadline) {
  if (!valid()) return fail(Errc::InvalidArgument, "net::Channel::send_request: closed");
  return core_->send(std::move(buf), deadline, detail::ChannelCore::NoCredit::Wait,
                     detail::WireKind::Request);
}
Result<Message> Channel::receive(Deadline deadline) {
  if (!valid()) return fail(Errc::InvalidArgument, "net::Channel::receive: closed");
  return core_->receive(deadline);
}
Result<std::size_t> Channel::receive_batch(std::span<Message> out, Deadline deadline) {
  if (!valid()) return fail(Errc::InvalidArgument, "net::Channel::receive_batch: closed");
  if (out.empty()) return fail(Errc::InvalidArgument, "net::Channel::receive_batch: empty span");
  // Dropped here, unlocked: an unanswered request's token answers NoReply, taking the lock.
  for (Message& m : out) m = Message{};
  return core_->receive_batch(out, deadline);
}
Status Channel::reply(Message&& msg) {
  if (msg.kind != Kind::Request || !msg.buffer.reply_)
    return fail(Errc::InvalidArgument, "net::Channel::reply: not a request");
  std::shared_ptr<detail::ReplyToken> t = std::move(msg.buffer.reply_);
  // A copy of the message (net::Buffer is copyable) shares the token: one reply only.
  if (t->answered.exchange(true, std::memory_order_acq_rel))
    return fail(Errc::InvalidArgument, "net::Channel::reply: this request was answered already");
  auto ch = t->ch.lock();
  // Closed by its owner (whose handle may still hold the core, and so keep it alive): the same
  // PeerClosed as when that handle is gone, not the InvalidArgument a call on it gets.
  if (!ch || ch->handle_closed.load(std::memory_order_acquire))
    return fail(Errc::PeerClosed, "net::Channel::reply: the channel is closed");
  return ch->reply(t->seq, std::move(msg.buffer), detail::kReplyOk, t->credit_bytes);
}
void Channel::set_wait_policy(WaitPolicy policy) {
  if (valid()) core_->set_policy(policy);
}
bool Channel::valid() const noexcept {
  return core_ != nullptr && !core_->handle_closed.load(std::memory_order_acquire);
}
void Channel::close() noexcept {
  // The core stays until the handle is destroyed or assigned: another thread may be inside a
  // call on it (it returns InvalidArgument or PeerClosed, as the channel has ended).
  if (core_ && !core_->handle_closed.exchange(true, std::memory_order_acq_rel)) core_->close();
}

Buffer::~Buffer() {
  // Not in a forked child: the Spares' lock may have been held by another thread at the fork.
  if (bytes_.capacity() <= detail::Spares::kMin || !detail::ucx_usable()) return;
  if (auto home = home_.lock()) home->give(std::move(bytes_), channel_);
}

Status Buffer::resize(std::size_t n) {
  if (!valid_) return fail(Errc::InvalidArgument, "net::Buffer::resize: invalid buffer");
  if (n > limit_) return fail(Errc::InvalidArgument, "net::Buffer::resize: above the peer's limit");
  if (n > bytes_.size()) bytes_.resize(n);
  size_ = n;
  return {};
}

// NOLINTNEXTLINE(readability-convert-member-functions-to-static): the API of mbmq::Buffer
Status Buffer::attach_fd(int fd) {
  os::UniqueFd owned(fd);  // closed here, as a local buffer closes a handle it cannot carry
  return fail(Errc::InvalidArgument, "net::Buffer::attach_fd: handles cannot cross hosts");
}

}  // namespace mbmq::net
