// net/channel.cc: ChannelCore, one UCX endpoint carrying an mbmq channel, and the WorkerCore it
// runs on (net/core.h; wire format and handshake in docs/design/net.md).
#include <arpa/inet.h>
#include <netinet/in.h>

#include <algorithm>
#include <array>
#include <climits>
#include <cstdio>
#include <cstring>
#include <new>

#include "net/core.h"
#include "os/futex.h"
#include "os/process.h"
#include "os/unix_socket.h"

namespace mbmq::net::detail {
namespace {

// An AM send in flight: UCX reads the header (and the payload) until it completes.
struct SendOp final : PendingOp {
  SendOp(WorkerCore* worker, ucp_ep_h e, WireHeader h, bool call, ChannelCore* call_owner,
         std::uint64_t channel_id)
      : w(worker), ep(e), hdr(h), is_call(call), owner(call_owner), ch_id(channel_id) {}
  WorkerCore* w;
  ucp_ep_h ep;
  WireHeader hdr;
  std::vector<std::byte> owned;  // a one-way message's bytes, or a timed-out call's
  bool is_call;
  // A call's channel while call() waits: call() always clears call_op_ (or detaches this) before
  // it returns, so the channel outlives the pointer. Not found through eps: a closed endpoint is
  // no longer there, and its cancelled sends complete later.
  ChannelCore* owner;
  std::uint64_t ch_id;    // the sending channel's ChannelCore::id_ (Spares' tag for `owned`)
  std::size_t bytes = 0;  // the payload's size: tx_bytes_ (F8)
};

// A rendezvous payload being received into `bytes`.
struct RecvOp final : PendingOp {
  RecvOp(WorkerCore* worker, ucp_ep_h e, WireHeader h, std::vector<std::byte>&& b, std::size_t len,
         std::uint64_t s)
      : w(worker), ep(e), hdr(h), bytes(std::move(b)), n(len), slot(s) {
    recv_ep = e;
  }
  WorkerCore* w;
  ucp_ep_h ep;
  WireHeader hdr;
  std::vector<std::byte> bytes;
  std::size_t n;
  std::uint64_t slot;  // its place in the channel's inbox, or kNoSlot
};

ChannelCore* find_locked(WorkerCore* w, ucp_ep_h ep) MBMQ_REQUIRES(w->mu) {
  auto it = w->eps.find(ep);
  return it == w->eps.end() ? nullptr : it->second;
}

// UCX's error callback of every endpoint (connect and accept): runs inside progress, under the
// worker's lock; the channel fails with PeerClosed (Refused for a rejected connection).
void on_ep_error(void* arg, ucp_ep_h e, ucs_status_t s) {
  auto* wk = static_cast<WorkerCore*>(arg);
  wk->assert_held();
  if (ChannelCore* c = find_locked(wk, e)) {
    c->assert_held();
    wk->news_locked(c);  // (W2)
    c->fail_locked(errc_of(s), "net: endpoint failed");
  }
}

// (F7) Marks the worker inside a request callback while it lives. Nested (a send finished inline,
// P1, by a poster inside another request's callback), the outer mark stays.
class InRequestCallback {
 public:
  explicit InRequestCallback(WorkerCore* w) MBMQ_REQUIRES(w->mu) : w_(w), outer_(w->in_request_cb) {
    w_->in_request_cb = true;
  }
  ~InRequestCallback() {
    w_->assert_held();
    w_->in_request_cb = outer_;
  }
  InRequestCallback(const InRequestCallback&) = delete;
  InRequestCallback& operator=(const InRequestCallback&) = delete;

 private:
  WorkerCore* const w_;
  const bool outer_;
};

// A send completed (or was cancelled): its channel's counts, a call's or a HelloAck's state, its
// vector to the spares; op deleted.
void finish_send(SendOp* op, ucs_status_t status) {
  WorkerCore* w = op->w;
  w->assert_held();
  const InRequestCallback in_cb(w);
  w->untrack_locked(op);
  // Its channel: the caller's, or found through eps (not there once closed).
  if (ChannelCore* ch = op->owner != nullptr ? op->owner : find_locked(w, op->ep)) {
    ch->assert_held();
    ch->on_tx_done_locked(op->bytes);
  }
  if (op->owner != nullptr) {
    op->owner->assert_held();
    w->news_locked(op->owner);  // (W2) a call's send completed
    op->owner->on_send_done_locked(op->hdr.seq, op->is_call);
  }
  // (N4) A HelloAck that left late: its channel, found through eps (a closed one is not there,
  // and a cancelled send is not OK), may now be handed out by accept().
  if (static_cast<WireKind>(op->hdr.kind) == WireKind::HelloAck && status == UCS_OK) {
    if (ChannelCore* ch = find_locked(w, op->ep)) {
      ch->assert_held();
      w->news_locked(nullptr);  // (W2) for accept(): the listener is no longer known here
      ch->on_hello_ack_sent_locked();
    }
  }
  // UCX has read the payload: its vector may receive the worker's next one (its bytes went to
  // the peer of the channel that sent them).
  w->spares->give(std::move(op->owned), op->ch_id);
  delete op;
}

// (P1) Called inside the post itself: recorded, finished by the poster.
bool called_inline(PendingOp* op, ucs_status_t status, void* request) {
  if (op->posted) return false;
  op->done_inline = true;
  op->inline_status = status;
  op->inline_request = request;
  return true;
}

// (P1) The request to free after an inline callback: the callback's, else the one returned.
void* inline_request_of(const PendingOp* op, ucs_status_ptr_t r) {
  if (op->inline_request != nullptr) return op->inline_request;
  return r != nullptr && !UCS_PTR_IS_ERR(r) ? r : nullptr;
}

void send_done(void* request, ucs_status_t status, void* user) {
  auto* op = static_cast<SendOp*>(user);
  op->w->assert_held();
  if (called_inline(op, status, request)) return;  // the request is freed by the poster
  WorkerCore* w = op->w;
  finish_send(op, status);
  if (request != nullptr) w->u->ucp_request_free(request);
}

void recv_done(void* request, ucs_status_t status, std::size_t /*length*/, void* user) {
  auto* op = static_cast<RecvOp*>(user);
  WorkerCore* w = op->w;
  w->assert_held();
  if (called_inline(op, status, request)) return;  // the request is freed by the poster
  const InRequestCallback in_cb(w);
  w->untrack_locked(op);
  if (ChannelCore* ch = find_locked(w, op->ep)) {
    ch->assert_held();
    w->news_locked(ch);  // (W2)
    if (status == UCS_OK) {
      ch->on_recv_done_locked(op->hdr, std::move(op->bytes), op->n, op->slot);
      ch->rx_finished_locked();
    } else {
      ch->fail_locked(errc_of(status), "net: receiving a payload failed");
    }
  }
  delete op;
  if (request != nullptr) w->u->ucp_request_free(request);
}

// The one AM handler of a worker: finds the channel by its endpoint (we always send with
// UCP_AM_SEND_FLAG_REPLY, so UCX names it) and checks the header before anything else.
ucs_status_t on_am(void* arg, const void* header, std::size_t header_length, void* data,
                   std::size_t length, const ucp_am_recv_param_t* param) {
  auto* w = static_cast<WorkerCore*>(arg);
  w->assert_held();
  if ((param->recv_attr & UCP_AM_RECV_ATTR_FIELD_REPLY_EP) == 0) return UCS_OK;  // anonymous
  ChannelCore* ch = find_locked(w, param->reply_ep);
  if (ch == nullptr) return UCS_OK;  // a channel closed meanwhile
  ch->assert_held();
  w->news_locked(ch);  // (W2) whatever it is, it is this channel's
  WireHeader h{};
  if (header_length != sizeof h) {
    ch->fail_locked(Errc::Protocol, "net: header of the wrong length");
    return UCS_OK;
  }
  std::memcpy(&h, header, sizeof h);
  if (h.magic != kMagic) {
    ch->fail_locked(Errc::Protocol, "net: bad magic in a header");
    return UCS_OK;
  }
  if (h.version != kVersion) {
    // (N3) Another version's hello is answered (kBadVersion), another version's refusal is read;
    // anything else of another version closes the channel. Its payload is not looked at.
    ch->on_other_version_locked(h);
    return UCS_OK;
  }
  // A rendezvous payload whose vector is allocated outside the lock: UCX keeps the descriptor.
  return ch->on_am_locked(h, data, length, param) ? UCS_INPROGRESS : UCS_OK;
}

}  // namespace

Grant capped_grant(Grant peer, Grant own) noexcept {
  // (F1) What we send on the peer's word, at most what we grant it or the default grant,
  // whichever is larger: a peer that claims a huge grant and never reads cannot make us hold
  // more than that, and a small inbox of ours (to bound what each client may queue at us) does
  // not throttle what we send below the defaults.
  return Grant{std::min(peer.messages, std::max(own.messages, kDefaultInboxMessages)),
               std::min(peer.bytes, std::max(own.bytes, kDefaultInboxBytes))};
}

Errc errc_of(ucs_status_t s) noexcept {
  return s == UCS_ERR_REJECTED ? Errc::Refused : Errc::PeerClosed;
}

// ---- WorkerCore ----

Result<std::shared_ptr<WorkerCore>> WorkerCore::make(const Ucx* u) {
  std::shared_ptr<WorkerCore> w(new WorkerCore(u));
  w->self = w;
  ucp_worker_params_t wp{};
  wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  wp.thread_mode = UCS_THREAD_MODE_SINGLE;  // serialized by mu
  if (u->ucp_worker_create(u->context, &wp, &w->worker) != UCS_OK)
    return fail(Errc::System, "net: ucp_worker_create failed");
  if (u->ucp_worker_get_efd(w->worker, &w->efd) != UCS_OK)
    return fail(Errc::System, "net: ucp_worker_get_efd failed");
  ucp_am_handler_param_t hp{};
  hp.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB |
                  UCP_AM_HANDLER_PARAM_FIELD_ARG | UCP_AM_HANDLER_PARAM_FIELD_FLAGS;
  hp.id = kAmId;
  hp.cb = on_am;
  hp.arg = w.get();
  hp.flags = UCP_AM_FLAG_WHOLE_MSG;
  if (u->ucp_worker_set_am_recv_handler(w->worker, &hp) != UCS_OK)
    return fail(Errc::System, "net: ucp_worker_set_am_recv_handler failed");
  return w;
}

WorkerCore::~WorkerCore() {
  // In a forked child UCX must not be touched: the worker is left as it is.
  if (worker == nullptr || !ucx_usable()) return;
  // (Q3) The pump first: it uses this worker until it has seen pump_stop.
  std::thread pump;
  {
    os::LockGuard lock(mu);
    pump_stop = true;
    wake_waiters_locked(&pump_key);
    pump = std::move(pump_thread);
  }
  if (pump.joinable()) {
    if (pump.get_id() == std::this_thread::get_id())
      pump.detach();  // (its own last step dropped us: it returns right after)
    else
      pump.join();
  }
  {
    os::LockGuard lock(mu);
    for (const Deferred& d : deferred) u->ucp_am_data_release(worker, d.desc);
    deferred.clear();
    // Sends and receives still in UCX's hands (ops): a force-closed endpoint's are completed
    // (cancelled) by a later progress, which a worker destroyed with its last channel never got.
    // A little progress lets UCX call back (nothing is found through eps any more: every channel
    // of this worker is gone); at most 10 ms, then ucp_worker_destroy drops the rest. (mu is held
    // across the sleeps: nobody else can take it, this is the worker's last reference.)
    const std::int64_t until = monotonic_ns() + 10'000'000;
    while (ops != nullptr && monotonic_ns() < until)
      if (u->ucp_worker_progress(worker) == 0) os::sleep_ns(100'000);
  }
  u->ucp_worker_destroy(worker);
  // What UCX dropped without calling back: it no longer reads those vectors, they are freed here.
  os::LockGuard lock(mu);
  while (ops != nullptr) {
    PendingOp* op = ops;
    untrack_locked(op);
    delete op;
  }
}

bool WorkerCore::start_deferred_slow(const void* mine, bool ownerless, bool allocator) {
  for (;;) {
    Deferred d{};
    {
      os::LockGuard lock(mu);
      auto it = std::find_if(deferred.begin(), deferred.end(), [&](const Deferred& e) {
        assert_held();
        return allocator ? e.allocator : threads_take_locked(e, mine, ownerless);
      });
      if (it == deferred.end()) return false;
      d = *it;
      deferred.erase(it);
      recount_locked();
    }
    // The page faults and zeroing, unlocked (or a spare given back since). Destroyed unlocked
    // too, if not received into.
    std::vector<std::byte> bytes;
    bool no_memory = false;
    try {
      bytes = take_spare(d.n);
    } catch (const std::bad_alloc&) {  // (some callers are destructors: nothing may escape)
      no_memory = true;
    }
    os::LockGuard lock(mu);
    ChannelCore* ch = find_locked(this, d.ep);
    if (ch != nullptr && (ch != d.ch || ch->id_ != d.id)) ch = nullptr;  // another channel (ABA)
    if (ch == nullptr || no_memory) {  // closed meanwhile: the payload is dropped
      u->ucp_am_data_release(worker, d.desc);
      if (ch != nullptr && ch == d.ch) {
        ch->assert_held();
        ch->fail_locked(Errc::System, "net: no memory for a received payload");
      }
      if (allocator) return allocator_has_more_locked();  // one per turn (D1)
      continue;
    }
    ch->assert_held();
    // Done at once (not inside a progress): its waiter is woken here (W2 (d)).
    if (ch->start_recv_locked(d.hdr, d.desc, std::move(bytes), d.n, d.slot)) {
      wake_waiters_locked(ch);
      if (!tap_news.empty()) flush_taps_locked();  // (Q2) a redirected channel's: to its queue
    }
    if (allocator) return allocator_has_more_locked();  // one per turn (D1)
  }
}

void WorkerCore::fail_due_locked() const {
  fails_due = false;
  // fail_locked() takes the channel out of eps: look again from the start each time (no
  // allocation; rare).
  for (;;) {
    auto it = std::find_if(eps.begin(), eps.end(), [&](const auto& e) {
      assert_held();
      e.second->assert_held();
      return e.second->due_locked();
    });
    if (it == eps.end()) return;
    it->second->assert_held();
    (void)it->second->fail_due_locked();
  }
}

bool WorkerCore::progress_locked(const void* mine, bool* stopped_early) const {
  // Bounded: a large rendezvous keeps ucp_worker_progress returning non-zero for its whole
  // length, and other threads (other channels' callers) wait for mu meanwhile (net/core.h).
  poller_news = false;
  progress_for = mine;
  progress_news = false;
  others_news = false;
  unsigned events = 0;
  bool more = true;  // stopped before the transports ran dry: they may hold more (W2 (b))
  std::int64_t start = 0;
  for (int i = 0; i < 64; ++i) {
    const unsigned n = u->ucp_worker_progress(worker);
    if (fails_due) fail_due_locked();  // (F7) out of the request callbacks now
    if (n == 0) {
      more = false;
      break;
    }
    events += n;
    // News for the caller or for another waiter, or a thread waiting for the lock: stop now.
    if (progress_news || others_news || mu.contended()) break;
    const std::int64_t now = monotonic_ns();
    if (start == 0)
      start = now;
    else if (now - start >= 1'000'000)
      break;
  }
  progress_for = nullptr;
  // (Q2-Q4) What redirected channels received goes to their queues; released credit goes back.
  // (Q6) And a redirected listener's connections that became acceptable (ready_ is empty but
  // for those whose HelloAck has not left: a look at an empty deque per progress).
  if (!tap_news.empty() || credit_due.load(std::memory_order_relaxed) || listen_tap != nullptr)
    flush_taps_locked();
  if (stopped_early != nullptr) *stopped_early = more;
  if (events == 0) return false;
  if (gen_sleepers > 0) wake_gen_locked();  // (W1)
  // (W2) Only for news of what the poller waits on (net/core.h says why no wake-up is lost): a
  // busy channel beside an idle poller no longer costs a syscall (and the poller a futile wake)
  // per event.
  if (poller_asleep && !poller_waking && (poller_news || more)) (void)u->ucp_worker_signal(worker);
  return true;
}

void WorkerMutex::hand_over() noexcept {
  if (!contended()) return;
  handing_.fetch_add(1);
  const std::uint32_t seen = acquired_.load();
  if (contended()) (void)os::futex_wait(&acquired_, seen, 2'000'000);
  handing_.fetch_sub(1);
}

void WorkerMutex::wake_handing() noexcept { (void)os::futex_wake(&acquired_, INT_MAX); }

void WorkerCore::wake_waiters_locked(const void* what) const {
  if (gen_sleepers > 0) wake_gen_locked();
  if (poller_asleep && !poller_waking && (poller_for == nullptr || poller_for == what))
    (void)u->ucp_worker_signal(worker);
}

void WorkerCore::wake_gen_locked(int count) const {
  gen.fetch_add(1, std::memory_order_relaxed);
  (void)os::futex_wake(&gen, count);
}

void WorkerCore::wait_gen(std::uint32_t seen, Deadline deadline) const {
  // The same 20 ms cap as the event fd's, as a safety net.
  const std::int64_t cap = 20'000'000;
  const std::int64_t left = deadline.remaining_ns();
  (void)os::futex_wait(&gen, seen, left < 0 ? 0 : std::min(left, cap));
}

Status WorkerCore::wait_events(Deadline deadline) const {
  // Capped at 20 ms: a safety net, should another thread have taken the events our arm was for.
  const std::int64_t cap = 20'000'000;
  const std::int64_t left = deadline.remaining_ns();
  (void)MBMQ_TRY(os::wait_readable(efd, left < 0 ? 0 : std::min(left, cap)));
  return {};
}

// ---- ReplyToken ----

ReplyToken::~ReplyToken() {
  if (answered.load(std::memory_order_relaxed)) return;  // the last copy is gone: no race
  if (auto c = ch.lock()) (void)c->reply(seq, Buffer{}, kReplyNone, credit_bytes);
}

// ---- ChannelCore ----

Result<std::shared_ptr<ChannelCore>> ChannelCore::connect(
    const Ucx* u, const std::string& host, std::uint16_t port, const std::string& service,
    Deadline deadline, WaitPolicy policy, std::chrono::milliseconds peer_timeout, Grant grant) {
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_port = htons(port);
  if (inet_pton(AF_INET, host.c_str(), &sa.sin_addr) != 1)
    return fail(Errc::InvalidArgument, "net::connect: the host must be an IPv4 address literal");
  auto w = MBMQ_TRY(WorkerCore::make(u));
  auto ch = std::make_shared<ChannelCore>(w, State::Connecting);
  ch->policy_ = policy;
  {
    os::LockGuard lock(ch->w_->mu);
    ucp_ep_params_t ep{};
    ep.field_mask = UCP_EP_PARAM_FIELD_FLAGS | UCP_EP_PARAM_FIELD_SOCK_ADDR |
                    UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE | UCP_EP_PARAM_FIELD_ERR_HANDLER;
    ep.flags = UCP_EP_PARAMS_FLAGS_CLIENT_SERVER;
    ep.sockaddr.addr = reinterpret_cast<const sockaddr*>(&sa);
    ep.sockaddr.addrlen = sizeof sa;
    ep.err_mode = UCP_ERR_HANDLING_MODE_PEER;
    ep.err_handler.cb = on_ep_error;
    ep.err_handler.arg = w.get();
    ucp_ep_h h = nullptr;
    if (u->ucp_ep_create(w->worker, &ep, &h) != UCS_OK)
      return fail(Errc::System, "net::connect: ucp_ep_create failed");
    ch->ep_ = h;
    ch->w_->eps[h] = ch.get();
    // (N1) Hello{our limit, our peer_timeout; payload: our grant (F1), then the service}.
    ch->my_grant_ = grant;
    std::vector<std::byte> hello = hello_payload(grant, service);
    MBMQ_TRY(ch->send_locked(WireKind::Hello, 0, wire_timeout_ms(peer_timeout), ch->my_limit_,
                             nullptr, hello.size(), &hello, false));
  }
  const bool done = MBMQ_TRY(w->run_until(deadline, policy, ch.get(), [&] {
    ch->assert_held();
    return ch->state_ != State::Connecting;
  }));
  os::LockGuard lock(ch->w_->mu);
  if (!done) {
    ch->close_ep_locked(Close::Force);
    return fail(Errc::TimedOut, "net::connect: no answer to the hello before the deadline");
  }
  if (ch->state_ == State::Closed) {
    // The hello's answer first: a refused hello closes with Refused too.
    if (ch->hello_status_ == kNoService)
      return fail(Errc::Refused, "net::connect: the listener serves no such service");
    if (ch->hello_status_ == kBadVersion)
      return fail(Errc::Refused, "net::connect: the listener speaks another protocol version");
    if (ch->closed_code_ == Errc::Refused)
      return fail(Errc::Refused,
                  "net::connect: the listener rejected the connection (our address is not on its "
                  "allow-list, or it holds its backlog of connections not yet accepted)");
    return fail(Errc::PeerClosed, "net::connect: no listener there, or the connection failed");
  }
  return ch;
}

Status ChannelCore::accept_locked(ucp_conn_request_h req, ListenCore* listener) {
  ucp_ep_params_t ep{};
  ep.field_mask = UCP_EP_PARAM_FIELD_CONN_REQUEST | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                  UCP_EP_PARAM_FIELD_ERR_HANDLER;
  ep.conn_request = req;
  ep.err_mode = UCP_ERR_HANDLING_MODE_PEER;
  ep.err_handler.cb = on_ep_error;
  ep.err_handler.arg = w_.get();
  ucp_ep_h h = nullptr;
  if (w_->u->ucp_ep_create(w_->worker, &ep, &h) != UCS_OK)
    return fail(Errc::System, "net::Listener: ucp_ep_create failed");
  ep_ = h;
  w_->eps[h] = this;
  listener_ = listener;
  my_limit_ = listener->max_message();
  my_grant_ = listener->grant();
  pending_since_ns_ = monotonic_ns();
  return {};
}

ChannelCore::~ChannelCore() {
  if (!ucx_usable()) return;                // a forked child: leave UCX alone
  std::vector<std::shared_ptr<void>> drop;  // destroyed unlocked (reply tokens take mu)
  try {
    drop.reserve(8);
  } catch (const std::bad_alloc&) {  // (unredirect_locked pushes a few: rare, tiny)
  }
  os::LockGuard lock(w_->mu);
  close_ep_locked(Close::Force);
  unredirect_locked(drop);  // (Q5) after close_ep_locked(), which notes us
}

std::chrono::milliseconds ChannelCore::peer_timeout() noexcept {
  if (!ucx_usable()) return std::chrono::milliseconds(0);
  os::LockGuard lock(w_->mu);
  return std::chrono::milliseconds(peer_timeout_ms_);
}

std::uint32_t wire_timeout_ms(std::chrono::milliseconds t) noexcept {
  if (t.count() <= 0) return 0;
  return static_cast<std::uint32_t>(std::min<std::int64_t>(t.count(), 0xffffffff));
}

bool ChannelCore::open() noexcept {
  if (!ucx_usable()) return false;
  os::LockGuard lock(w_->mu);
  return usable_locked();
}

Error ChannelCore::closed_error_locked(const char* op) {
  if (closed_code_ == Errc::Protocol) return Error::make(Errc::Protocol, why_);
  return Error::make(closed_code_ == Errc::Refused ? Errc::PeerClosed : closed_code_, op);
}

void* ChannelCore::close_ep_locked(Close how) {
  if (ep_ == nullptr) return nullptr;
  w_->eps.erase(ep_);
  // Our payloads still waiting for a vector (WorkerCore::Deferred) are dropped, and the places
  // kept in the inbox for them and for those being received (no callback finds us any more):
  // what was received before them is still received.
  std::erase_if(w_->deferred, [&](const WorkerCore::Deferred& d) {
    if (d.ch != this) return false;
    w_->assert_held();
    w_->u->ucp_am_data_release(w_->worker, d.desc);
    return true;
  });
  w_->recount_locked();
  std::erase_if(inbox_, [](const Message& m) { return !m.buffer.valid(); });
  rx_pending_ = 0;
  requests_.clear();  // (R3) their replies never come: receive() ends with PeerClosed
  ucp_request_param_t p{};
  p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
  p.flags = how == Close::Force ? UCP_EP_CLOSE_FLAG_FORCE : 0;
  ucs_status_ptr_t r = w_->u->ucp_ep_close_nbx(ep_, &p);
  ep_ = nullptr;
  state_ = State::Closed;
  note_tap_locked();                       // (Q5) a redirected channel's end goes to its queue
  if (!UCS_PTR_IS_PTR(r)) return nullptr;  // done, or failed: nothing to wait for
  // Flush: the caller waits for it, unlocked, and frees it. Not from a callback: UCX's progress
  // does not nest.
  if (how == Close::Flush) return r;
  // Released now; an unfinished close finishes (or is cut short) as the worker progresses or is
  // destroyed. UCX asserts at ucp_worker_destroy on a request not released.
  w_->u->ucp_request_free(r);
  return nullptr;
}

void ChannelCore::fail_locked(Errc code, const char* why) {
  if (state_ == State::Closed && ep_ == nullptr) return;
  if (w_->in_request_cb) {  // (F7) closed once ucp_worker_progress has returned
    if (!due_) {
      due_ = true;
      due_code_ = code;
      due_why_ = why;
    }
    w_->fails_due = true;
    return;
  }
  // (W2) A failure is news for whoever waits on this worker (our receive() or call(), or accept()
  // for a channel not yet handed out), and it may happen outside any progress (the keeper's
  // peer_timeout or handshake expiry, a send failing on another thread): wake them here rather
  // than leave them to the 20 ms cap. Rare, so one signal too many costs nothing.
  w_->news_locked(nullptr);
  w_->wake_waiters_locked(w_->poller_for);
  if (state_ != State::Closed) {
    closed_code_ = code;
    why_ = why;
  }
  if (listener_ != nullptr) {
    listener_->w_->assert_held();          // the same worker as ours
    listener_->drop_pending_locked(this);  // may end our life later
  }
  listener_ = nullptr;
  close_ep_locked(Close::Force);
}

Status ChannelCore::send_locked(WireKind kind, std::uint16_t status, std::uint32_t seq,
                                std::uint32_t limit, const void* data, std::size_t n,
                                std::vector<std::byte>* owned, bool is_call) {
  if (ep_ == nullptr) return fail(closed_error_locked("net: send on a closed channel"));
  last_tx_ns_ = monotonic_ns();
  auto* op =
      new SendOp(w_.get(), ep_,
                 WireHeader{kMagic, kVersion, static_cast<std::uint8_t>(kind), status, seq, limit},
                 is_call, is_call ? this : nullptr, id_);
  if (owned != nullptr) {
    op->owned = std::move(*owned);
    data = op->owned.data();
  }
  ucp_request_param_t p{};
  p.op_attr_mask =
      UCP_OP_ATTR_FIELD_FLAGS | UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
  p.flags = UCP_AM_SEND_FLAG_REPLY;
  p.cb.send = send_done;
  p.user_data = op;
  op->bytes = n;
  ucs_status_ptr_t r = w_->u->ucp_am_send_nbx(ep_, kAmId, &op->hdr, sizeof op->hdr, data, n, &p);
  op->posted = true;
  if (op->done_inline) {
    // (P1) Completed (or cancelled) inside the call: counted as pending, then finished as
    // send_done would.
    if (void* req = inline_request_of(op, r)) w_->u->ucp_request_free(req);
    w_->track_locked(op);
    if (is_call) call_op_ = op;
    ++tx_pending_;
    tx_bytes_ += n;
    // Failed: UCX is done with the bytes; they go back to the caller (send_batch's unsent rest
    // must be untouched, mbmq/channel.h), not to the spares.
    if (UCS_PTR_IS_ERR(r) && owned != nullptr) *owned = std::move(op->owned);
    finish_send(op, op->inline_status);
    if (UCS_PTR_IS_ERR(r)) {
      fail_locked(errc_of(UCS_PTR_STATUS(r)), "net: ucp_am_send_nbx failed");
      return fail(closed_error_locked("net: send failed"));
    }
    return {};
  }
  if (r == nullptr) {  // done already: no callback comes
    if (is_call) call_sent_ = true;
    if (kind == WireKind::HelloAck) hello_ack_sent_ = true;
    delete op;
    return {};
  }
  if (UCS_PTR_IS_ERR(r)) {
    if (owned != nullptr) *owned = std::move(op->owned);  // not sent: the caller's again
    delete op;
    fail_locked(errc_of(UCS_PTR_STATUS(r)), "net: ucp_am_send_nbx failed");
    return fail(closed_error_locked("net: send failed"));
  }
  w_->track_locked(op);  // until send_done (or ~WorkerCore)
  if (is_call) call_op_ = op;
  ++tx_pending_;
  tx_bytes_ += n;
  return {};
}

// From this size on, a payload with no spare vector to land in has its vector allocated outside
// the worker's lock (WorkerCore::Deferred): 1 MiB is 256 page faults, some 0.3-1 ms here.
constexpr std::size_t kDeferMin = std::size_t{1} << 20;
// (D1) From this size on, the allocating thread allocates it (below: ~1-4 ms of page faults here,
// which the channel's own waiting thread, or whoever progresses next, pays).
constexpr std::size_t kAllocatorMin = std::size_t{4} << 20;

void Spares::give(std::vector<std::byte>&& v, std::uint64_t from) noexcept {
  const std::size_t cap = v.capacity();
  if (cap <= kMin) return;  // freed here: malloc's heap, nothing to save
  {
    os::LockGuard lock(mu_);
    if (v_.size() < kMaxVectors && bytes_ + cap <= kMaxBytes) {  // room: nothing to let go
      v_.push_back(std::move(v));  // within the reserved capacity: no allocation
      from_.push_back(from);
      missed_.push_back(0);
      bytes_ += cap;
      return;
    }
    // Full, and nothing smaller to let go (a stream's vectors, all of one size): v is freed by
    // the caller, after the lock (review rev-f8: each such give() sorted 256 sizes under it).
    // (Empty, it keeps one vector of any size: the slow path.)
    if (!v_.empty() &&
        std::none_of(v_.begin(), v_.end(), [&](const auto& x) { return x.capacity() < cap; }))
      return;
  }
  give_evicting(std::move(v), from);
}

void Spares::give_evicting(std::vector<std::byte>&& v, std::uint64_t from) noexcept {
  std::array<std::vector<std::byte>, kMaxVectors + 1> drop;  // freed after the lock is released
  std::size_t dropped = 0;
  const std::size_t cap = v.capacity();
  os::LockGuard lock(mu_);
  // Room is made by letting smaller vectors go, smallest first: a large one is the costlier to
  // make again (a 64 MiB call's reply landed in fresh pages each time when small spares filled
  // the bound). First whether that makes room at all (else nothing is let go for nothing).
  std::array<std::size_t, kMaxVectors> caps{};
  std::size_t n = 0;
  for (const auto& x : v_) caps[n++] = x.capacity();
  std::sort(caps.begin(), caps.begin() + static_cast<std::ptrdiff_t>(n));
  std::size_t keep = n, bytes = bytes_, evict = 0;
  while (keep > 0 && (keep >= kMaxVectors || bytes + cap > kMaxBytes) && caps[evict] < cap) {
    bytes -= caps[evict++];
    --keep;
  }
  if (!(keep == 0 || (keep < kMaxVectors && bytes + cap <= kMaxBytes))) return;  // v freed
  for (; evict > 0; --evict) {
    auto smallest = std::min_element(v_.begin(), v_.end(), [](const auto& a, const auto& b) {
      return a.capacity() < b.capacity();
    });
    remove_locked(static_cast<std::size_t>(smallest - v_.begin()), drop[dropped++]);
  }
  v_.push_back(std::move(v));  // within the reserved capacity: no allocation
  from_.push_back(from);
  missed_.push_back(0);
  bytes_ += cap;
}

std::vector<std::byte> Spares::take(std::size_t n, std::uint64_t prefer,
                                    std::uint64_t* from) noexcept {
  if (n <= kMin) return {};
  {
    os::LockGuard lock(mu_);
    // The smallest that fits, one of `prefer`'s first (one of exactly n bytes, `prefer`'s if
    // asked, is the best there is: the search ends there).
    std::size_t best = v_.size();
    for (std::size_t i = 0; i < v_.size(); ++i) {
      if (!fits(v_[i].capacity(), n)) continue;
      const bool mine = prefer != 0 && from_[i] == prefer;
      if (best == v_.size()) {
        best = i;
      } else {
        const bool best_mine = prefer != 0 && from_[best] == prefer;
        if ((mine && !best_mine) || (mine == best_mine && v_[i].capacity() < v_[best].capacity()))
          best = i;
      }
      if (v_[best].capacity() == n && (prefer == 0 || from_[best] == prefer)) break;
    }
    if (best != v_.size()) {
      if (from != nullptr) *from = from_[best];
      std::vector<std::byte> v;
      remove_locked(best, v);
      v.resize(n);  // within its capacity: no allocation; zeroes only what grows
      return v;
    }
    if (std::none_of(v_.begin(), v_.end(), [&](const auto& x) { return x.capacity() / 2 > n; }))
      return {};  // nothing too large to count a miss against
  }
  // Nothing fits: a kept vector too large for this take counts its bytes; once such takes have
  // asked for as much as it holds, it is let go (the sizes in use now may be kept again).
  std::array<std::vector<std::byte>, kMaxVectors> stale;  // freed after the lock is released
  std::size_t n_stale = 0;
  os::LockGuard lock(mu_);
  for (std::size_t i = v_.size(); i-- > 0;) {
    if (v_[i].capacity() / 2 <= n) continue;  // not too large
    missed_[i] += n;
    if (missed_[i] < v_[i].capacity()) continue;
    remove_locked(i, stale[n_stale++]);
  }
  return {};
}

bool Spares::has_for(std::size_t n) const noexcept {
  os::LockGuard lock(mu_);
  return std::any_of(v_.begin(), v_.end(), [&](const auto& v) { return fits(v.capacity(), n); });
}

std::vector<std::byte> WorkerCore::take_spare(std::size_t n) const {
  std::vector<std::byte> v = spares->take(n);
  if (v.capacity() == 0) v.resize(n);
  return v;
}

void ChannelCore::on_send_done_locked(std::uint32_t seq, bool was_call) {
  if (was_call && seq == call_seq_) {
    call_sent_ = true;
    call_op_ = nullptr;
  }
}

void ChannelCore::on_hello_ack_sent_locked() { hello_ack_sent_ = true; }

bool ChannelCore::acceptable_locked() const { return hello_ack_sent_ || state_ != State::Open; }

bool ChannelCore::on_am_locked(const WireHeader& h, void* data, std::size_t length,
                               const ucp_am_recv_param_t* param) {
  const auto kind = static_cast<WireKind>(h.kind);
  last_rx_ns_ = monotonic_ns();
  // Which kinds each state accepts (docs/design/net.md).
  const bool ok =
      state_ == State::Pending      ? kind == WireKind::Hello
      : state_ == State::Connecting ? kind == WireKind::HelloAck
      : state_ == State::Open
          ? (kind == WireKind::Request || kind == WireKind::Message || kind == WireKind::Reply ||
             kind == WireKind::Bye || kind == WireKind::Heartbeat || kind == WireKind::Credit)
          : false;
  if (!ok) {
    fail_locked(Errc::Protocol, "net: a message of a kind not allowed now");
    return false;
  }
  // After its Bye (held behind payloads still being fetched: bye_pending_) a peer sends nothing
  // that needs an answer or a place: a Request, Message or Reply then is a protocol error (it was
  // queued behind the Bye and delivered). A second Bye, a Heartbeat or Credit are harmless.
  if (bye_pending_ &&
      (kind == WireKind::Request || kind == WireKind::Message || kind == WireKind::Reply)) {
    fail_locked(Errc::Protocol, "net: a message after the peer's Bye");
    return false;
  }
  // Sizes, checked before anything is allocated (a rendezvous payload is not received yet): a
  // hello is a grant and a service name of 1-255 bytes (a client not yet accepted must not make
  // us allocate up to max_message), a HelloAck a grant, the control kinds nothing.
  switch (kind) {
    case WireKind::Hello:
      if (length < kMinHello || length > kMaxHello) {
        fail_locked(Errc::Protocol, "net: a hello is not a grant and a 1-255 byte name");
        return false;
      }
      break;
    case WireKind::HelloAck:
      if (length != sizeof(Grant)) {
        fail_locked(Errc::Protocol, "net: a hello's answer without its grant");
        return false;
      }
      break;
    case WireKind::Bye:
    case WireKind::Heartbeat:
    case WireKind::Credit:
      if (length != 0) {
        fail_locked(Errc::Protocol, "net: a control message with a payload");
        return false;
      }
      break;
    default:
      break;
  }
  if (length > my_limit_) {
    fail_locked(Errc::Protocol, "net: payload above our limit");
    return false;
  }
  bool to_request = false;  // (R2) a send_request()'s reply: it goes through the inbox
  if (kind == WireKind::Reply) {
    // (F4)/(R2) A reply answers exactly one request of ours, once: the call in flight, a timed-out
    // call's (late), or an outstanding send_request()'s. It gives back that request's credit: 1
    // message and `limit` bytes, exactly what the request took (less would keep the rest out for
    // ever: the channel wedged, review rev-req). Anything else is a protocol error (a second reply
    // to a request would give its credit back twice).
    bool late = false;
    if (call_seq_ != 0 && h.seq == call_seq_) {
      if (call_replied_) {
        fail_locked(Errc::Protocol, "net: a second reply to one call");
        return false;
      }
      if (h.limit != call_bytes_) {
        fail_locked(Errc::Protocol, "net: a reply gave back other credit than its request took");
        return false;
      }
      call_replied_ = true;
    } else if (Outstanding* r = find_request_locked(h.seq)) {
      if (r->replied) {
        fail_locked(Errc::Protocol, "net: a second reply to one request");
        return false;
      }
      if (h.limit != r->bytes) {
        fail_locked(Errc::Protocol, "net: a reply gave back other credit than its request took");
        return false;
      }
      if (r->late_call) {
        late = true;  // a timed-out call's: its credit back, the reply dropped
        unlist_request_locked(r);
      } else {
        r->replied = true;
        to_request = true;
      }
    } else {
      fail_locked(Errc::Protocol, "net: a reply to no request of ours");
      return false;
    }
    if (!take_back_locked(1, h.limit)) return false;
    if (late) return false;  // (a rendezvous payload is not fetched: UCX releases it)
  }
  if (kind == WireKind::Credit) {
    (void)take_back_locked(h.seq, h.limit);  // (F5) one-way messages received by the peer's app
    return false;
  }
  if (kind == WireKind::Bye) {
    // Sent after its messages: those whose header came before it are received first (the sender
    // keeps their payloads until we have fetched them: its close flushes), then it closes.
    if (rx_pending_ > 0) {
      bye_pending_ = true;
      return false;
    }
    fail_locked(Errc::PeerClosed, "net: the peer closed");
    return false;
  }
  if (kind == WireKind::Heartbeat) return false;
  if (kind == WireKind::Request || kind == WireKind::Message) {
    // (F3) Within what we granted, or the peer is closed here: before its payload is received (a
    // rendezvous one is never fetched) or copied (an eager one, which UCX has assembled already).
    // The "rx_bytes_ != 0" mirrors the sender's rule: one message alone may exceed the bytes.
    if (rx_msgs_ + 1 > my_grant_.messages ||
        (rx_bytes_ != 0 && rx_bytes_ + length > my_grant_.bytes)) {
      fail_locked(Errc::Protocol, "net: the peer sent beyond the credit we granted (flow control)");
      return false;
    }
    ++rx_msgs_;
    rx_bytes_ += length;
  }
  if ((param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) != 0) {
    // The receiver chooses where the payload lands: a buffer of ours, given to the application.
    // A message's place in the inbox is kept from now on: what comes after it is received after.
    std::uint64_t slot = kNoSlot;
    if (kind == WireKind::Request || kind == WireKind::Message || to_request) {
      slot = inbox_head_ + inbox_.size();
      inbox_.emplace_back();  // an invalid buffer: not received yet
    }
    ++rx_pending_;
    // A spare if one fits (taken now: buffer() may take it from another thread, unlocked);
    // else, for a large one, a vector allocated outside the lock (WorkerCore::Deferred).
    std::vector<std::byte> spare = w_->spares->take(length);
    if (spare.capacity() == 0 && length >= kDeferMin) {
      // (D1) From 4 MiB, the allocating thread's (it takes mu to look: after this push).
      bool to_allocator =
          length >= kAllocatorMin && !w_->alloc_fallback.load(std::memory_order_relaxed);
      if (to_allocator && !allocate_deferred_later(w_->self)) {
        w_->alloc_fallback.store(true, std::memory_order_relaxed);  // ours, from now on
        to_allocator = false;
      }
      w_->deferred.push_back({this, id_, ep_, h, data, length, slot, to_allocator});
      w_->recount_locked();
      return true;
    }
    if (spare.capacity() == 0) spare.resize(length);  // below 1 MiB: from malloc's heap
    start_recv_locked(h, data, std::move(spare), length, slot);
    return false;
  }
  // Eager: UCX's bounce buffer, valid during this callback only: one copy.
  std::vector<std::byte> bytes = w_->take_spare(length);
  if (length != 0) std::memcpy(bytes.data(), data, length);
  on_recv_done_locked(h, std::move(bytes), length);
  return false;
}

bool ChannelCore::start_recv_locked(const WireHeader& h, void* desc, std::vector<std::byte>&& bytes,
                                    std::size_t n, std::uint64_t slot) {
  auto* op = new RecvOp(w_.get(), ep_, h, std::move(bytes), n, slot);
  ucp_request_param_t p{};
  p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
  p.cb.recv_am = recv_done;
  p.user_data = op;
  ucs_status_ptr_t r = w_->u->ucp_am_recv_data_nbx(w_->worker, desc, op->bytes.data(), n, &p);
  op->posted = true;
  if (op->done_inline) {
    // (P1) recv_done ran inside the call (the peer gone: UCX purged the request) and UCX may
    // still return the request: before, it was then tracked after recv_done had deleted it, and
    // ~WorkerCore deleted it again (review rev-f8, ReviewF8.DestroyingAPairWithUnfetched...).
    if (void* req = inline_request_of(op, r)) w_->u->ucp_request_free(req);
    const ucs_status_t st = op->inline_status;
    if (st == UCS_OK) {
      on_recv_done_locked(op->hdr, std::move(op->bytes), op->n, op->slot);
      delete op;
      rx_finished_locked();
      return true;
    }
    delete op;
    fail_locked(errc_of(st), "net: receiving a payload failed");
    return false;
  }
  if (r == nullptr) {
    on_recv_done_locked(op->hdr, std::move(op->bytes), op->n, op->slot);
    delete op;
    rx_finished_locked();
    return true;
  }
  if (UCS_PTR_IS_ERR(r)) {
    delete op;
    fail_locked(errc_of(UCS_PTR_STATUS(r)), "net: ucp_am_recv_data_nbx failed");
    return false;
  }
  w_->track_locked(op);  // until recv_done (or ~WorkerCore)
  return false;
}

void ChannelCore::rx_finished_locked() {
  if (rx_pending_ > 0) --rx_pending_;
  if (rx_pending_ == 0 && bye_pending_ && state_ != State::Closed) {
    bye_pending_ = false;
    fail_locked(Errc::PeerClosed, "net: the peer closed");
  }
}

void ChannelCore::on_recv_done_locked(const WireHeader& h, std::vector<std::byte>&& bytes,
                                      std::size_t n, std::uint64_t slot) {
  switch (static_cast<WireKind>(h.kind)) {
    case WireKind::Hello:
      return on_hello_locked(h, bytes.data(), n);
    case WireKind::HelloAck: {
      hello_status_ = h.status;
      if (h.status != kHelloOk) return fail_locked(Errc::Refused, "net: hello refused");
      Grant g{};
      std::memcpy(&g, bytes.data(), sizeof g);  // n == sizeof g: checked in on_am_locked
      if (g.messages == 0 || g.bytes == 0)
        return fail_locked(Errc::Protocol, "net: the peer granted no credit");
      peer_grant_ = capped_grant(g, my_grant_);
      peer_limit_ = h.limit;
      peer_timeout_ms_ = h.seq;
      state_ = State::Open;
      return;
    }
    case WireKind::Reply:
      if (call_seq_ == 0 || h.seq != call_seq_) {
        // (R2) A send_request()'s (its header was checked and marked): to the inbox, in its
        // place. Else a timed-out call's, arriving late: dropped.
        Outstanding* r = find_request_locked(h.seq);
        if (r == nullptr || !r->replied) return;
        const std::uint32_t tag = r->tag;
        unlist_request_locked(r);
        return deliver_locked(h, std::move(bytes), n, slot, tag);
      }
      reply_bytes_ = std::move(bytes);
      reply_size_ = n;
      reply_status_ = h.status;
      reply_ready_ = true;
      return;
    default:
      return deliver_locked(h, std::move(bytes), n, slot);
  }
}

void ChannelCore::on_hello_locked(const WireHeader& h, const std::byte* data, std::size_t n) {
  if (listener_ == nullptr) return fail_locked(Errc::Protocol, "net: hello, not listening");
  Grant g{};
  std::memcpy(&g, data, sizeof g);  // kMinHello <= n: checked in on_am_locked
  if (g.messages == 0 || g.bytes == 0)
    return fail_locked(Errc::Protocol, "net: the peer granted no credit");
  peer_grant_ = capped_grant(g, my_grant_);
  peer_limit_ = h.limit;
  peer_timeout_ms_ = h.seq;
  ListenCore* l = listener_;
  const std::string_view asked(reinterpret_cast<const char*>(data + sizeof g), n - sizeof g);
  const std::uint16_t verdict = asked == l->service() ? kHelloOk : kNoService;
  // (N3)/(N4) The answer, with our grant (F1); a refused client is closed after it (flush: the
  // answer goes first).
  std::vector<std::byte> ack(sizeof my_grant_);
  std::memcpy(ack.data(), &my_grant_, sizeof my_grant_);
  (void)send_locked(WireKind::HelloAck, verdict, wire_timeout_ms(l->peer_timeout()), my_limit_,
                    nullptr, ack.size(), &ack, false);
  if (verdict == kHelloOk) state_ = State::Open;
  l->w_->assert_held();  // the same worker as ours
  l->on_hello_locked(this, verdict);
}

void ChannelCore::on_other_version_locked(const WireHeader& h) {
  last_rx_ns_ = monotonic_ns();
  const auto kind = static_cast<WireKind>(h.kind);
  if (state_ == State::Pending && kind == WireKind::Hello && listener_ != nullptr) {
    // (N3) HelloAck{kBadVersion}, in our version, with our grant (a HelloAck's payload), then the
    // listener closes the channel after it (flush) and counts it refused.
    std::vector<std::byte> ack(sizeof my_grant_);
    std::memcpy(ack.data(), &my_grant_, sizeof my_grant_);
    ListenCore* l = listener_;
    (void)send_locked(WireKind::HelloAck, kBadVersion, wire_timeout_ms(l->peer_timeout()),
                      my_limit_, nullptr, ack.size(), &ack, false);
    l->w_->assert_held();  // the same worker as ours
    return l->on_hello_locked(this, kBadVersion);
  }
  if (state_ == State::Connecting && kind == WireKind::HelloAck && h.status == kBadVersion) {
    // A listener of another version refused ours: connect() returns Refused saying so.
    hello_status_ = kBadVersion;
    return fail_locked(Errc::Refused, "net: the peer speaks another protocol version");
  }
  fail_locked(Errc::Protocol, "net: a header of another protocol version");
}

void ChannelCore::deliver_locked(const WireHeader& h, std::vector<std::byte>&& bytes, std::size_t n,
                                 std::uint64_t slot, std::uint32_t tag) {
  // Its place, kept since its header came (slots before it are not taken: the head is only taken
  // once filled), or the end. A place that is gone (the inbox was dropped by close() or a
  // lingering tick since its header came: slot < inbox_head_) or already filled is not ours: the
  // payload is dropped here, before a reply token exists (overwriting a request under mu
  // destroyed its token, whose NoReply took mu again: the keeper deadlocked, review rev-req).
  if (slot != kNoSlot && (slot < inbox_head_ || slot - inbox_head_ >= inbox_.size() ||
                          inbox_[slot - inbox_head_].buffer.valid()))
    return;
  Message m;
  const auto kind = static_cast<WireKind>(h.kind);
  m.kind = kind == WireKind::Request ? Kind::Request
           : kind == WireKind::Reply ? Kind::Reply
                                     : Kind::Message;
  if (m.kind == Kind::Reply && h.status == kReplyNone) m.error = Errc::NoReply;
  m.buffer.bytes_ = std::move(bytes);
  m.buffer.size_ = n;
  m.buffer.limit_ = peer_limit_;
  m.buffer.valid_ = true;
  m.buffer.channel_ = id_;
  m.buffer.tag_ = tag;
  if (n > Spares::kMin) m.buffer.home_ = w_->spares;  // its vector comes back when dropped (weak)
  if (m.kind == Kind::Request) {
    auto t = std::make_shared<ReplyToken>();
    t->ch = weak_from_this();
    t->seq = h.seq;
    t->credit_bytes = static_cast<std::uint32_t>(n);  // n <= my_limit_
    m.buffer.reply_ = std::move(t);
  }
  if (slot != kNoSlot)
    inbox_[slot - inbox_head_] = std::move(m);
  else
    inbox_.push_back(std::move(m));
  note_tap_locked();  // (Q2) redirected: to its queue at the end of this progress
}

Result<Buffer> ChannelCore::buffer(std::size_t size) {
  MBMQ_TRY(check_not_forked());  // before the lock: a forked child may have it held
  std::uint32_t limit = 0;
  {
    os::LockGuard lock(w_->mu);
    if (!usable_locked()) return fail(closed_error_locked("net::Channel::buffer: closed"));
    if (size > peer_limit_)
      return fail(Errc::InvalidArgument, "net::Channel::buffer: above the peer's limit");
    limit = peer_limit_;
  }
  Buffer b;
  // Unlocked: a fresh 64 MiB vector's page faults took 50-70 ms, which held up the worker's other
  // channels (a listener's). A spare saves them (and malloc's mmap/munmap of large vectors) but
  // holds an earlier payload's bytes: another channel's are zeroed here, as a fresh vector is;
  // this channel's stay, as a local pool slot's do (its peer sent or got them; the zeroing was
  // most of the CPU mbmq's one-way sender spent beyond raw UCX's, docs/design/net.md). Such a
  // buffer is sent on this channel only (made_, checked by call/send).
  std::uint64_t from = 0;
  if (size > Spares::kMin) b.bytes_ = w_->spares->take(size, id_, &from);
  if (b.bytes_.size() == size && size != 0) {
    if (from != id_) std::memset(b.bytes_.data(), 0, size);
  } else {
    b.bytes_.resize(size);
  }
  b.channel_ = id_;
  b.made_ = true;
  b.size_ = size;
  b.limit_ = limit;
  b.valid_ = true;
  if (size > Spares::kMin) b.home_ = w_->spares;
  return b;
}

Status ChannelCore::wait_for_credit(std::size_t n, Deadline deadline) {
  MBMQ_TRY(check_not_forked());  // before the lock: a forked child may have it held
  {
    const StartDeferredAfter after(*w_, this, true);  // deferred receives, unlocked
    os::LockGuard lock(w_->mu);
    if (!usable_locked()) return fail(closed_error_locked("Channel::buffer"));
    if (n > peer_limit_) return {};  // buffer() says why
    if (can_send_locked(n)) return {};
    w_->progress_locked(this);  // credit may be in the worker already, not yet taken in
    if (!usable_locked()) return fail(closed_error_locked("Channel::buffer"));
    if (can_send_locked(n)) return {};
  }
  const bool got = MBMQ_TRY(w_->run_until(deadline, policy_, this, [&] {
    w_->assert_held();
    return !usable_locked() || can_send_locked(n);
  }));
  os::LockGuard lock(w_->mu);
  if (!usable_locked()) return fail(closed_error_locked("Channel::buffer"));
  if (!got && !can_send_locked(n))
    return fail(Errc::TimedOut, "Channel::buffer: the remote peer gave no credit back in time");
  return {};
}

std::size_t ChannelCore::sendable(std::size_t n) const noexcept {
  if (!ucx_usable()) return 0;  // a forked child: the lock may have been held at the fork
  os::LockGuard lock(w_->mu);
  if (!usable_locked() || out_msgs_ >= peer_grant_.messages) return 0;
  const std::uint64_t msgs = peer_grant_.messages - out_msgs_;
  // (as can_send_locked: bytes out beyond the grant let nothing more out, even of 0 bytes)
  if (out_bytes_ != 0 && out_bytes_ > peer_grant_.bytes) return 0;
  if (n == 0) return static_cast<std::size_t>(msgs);
  // (F2) Bytes too, but one message alone may exceed the grant when nothing is out.
  const std::uint64_t room = out_bytes_ < peer_grant_.bytes ? peer_grant_.bytes - out_bytes_ : 0;
  std::uint64_t by_bytes = room / n;
  if (by_bytes == 0 && out_bytes_ == 0) by_bytes = 1;
  return static_cast<std::size_t>(std::min(msgs, by_bytes));
}

Status ChannelCore::receive_check() {
  MBMQ_TRY(check_not_forked());  // before the lock: a forked child may have it held
  os::LockGuard lock(w_->mu);
  if (source_)
    return fail(Errc::InvalidArgument,
                "Channel::receive_in_place: the channel is redirected to a queue (MsgQueue::wait)");
  if (peer_closed_delivered_) return fail(closed_error_locked("Channel::receive_in_place"));
  return {};
}

Status ChannelCore::own_buffer(Buffer& buf, const char* invalid, const char* foreign) const {
  if (!buf.valid() || buf.reply_) return fail(Errc::InvalidArgument, invalid);
  if (buf.channel_ == id_) return {};
  if (buf.made_) return fail(Errc::InvalidArgument, foreign);
  if (buf.bytes_.size() > buf.size_) buf.bytes_.resize(buf.size_);
  return {};
}

Status ChannelCore::call(Buffer& buf, Deadline deadline) {
  MBMQ_TRY(check_not_forked());  // before the locks: a forked child may have them held
  MBMQ_TRY(own_buffer(buf, "net::Channel::call: buffer",
                      "net::Channel::call: a buffer() of another channel"));
  os::LockGuard serial(call_mu_);
  const std::size_t n = buf.size_;
  for (;;) {
    {
      os::LockGuard lock(w_->mu);
      if (!usable_locked()) return fail(closed_error_locked("net::Channel::call"));
      if (can_send_locked(n)) {  // the credit checked and taken under one lock
        const std::uint32_t seq = next_seq_locked();
        call_seq_ = seq;
        call_bytes_ = static_cast<std::uint32_t>(n);
        call_replied_ = false;
        call_sent_ = false;
        reply_ready_ = false;
        ++out_msgs_;  // (F2) its reply gives it back
        out_bytes_ += n;
        // Out of memory (send_locked's SendOp): nothing sent, the credit back, buf the caller's
        // (as send_now_locked; before, the bad_alloc left the credit taken for good).
        try {
          MBMQ_TRY(send_locked(WireKind::Request, 0, seq, 0, buf.bytes_.data(), n, nullptr, true));
        } catch (const std::bad_alloc&) {
          give_back_reserved_locked(n);
          call_seq_ = 0;
          return fail(Errc::System, "net::Channel::call: no memory");
        }
        break;
      }
    }
    // (F2) Out of credit: wait for the peer to give some back, as a local call waits for a slot,
    // until the deadline (credit another thread's send() took meanwhile: wait again).
    const bool got = MBMQ_TRY(w_->run_until(deadline, policy_, this, [&] {
      w_->assert_held();
      return !usable_locked() || can_send_locked(n);
    }));
    if (!got) return fail(Errc::TimedOut, "net::Channel::call: no credit in time (nothing sent)");
  }
  const bool done = MBMQ_TRY(w_->run_until(deadline, policy_, this, [&] {
    w_->assert_held();
    return (reply_ready_ && call_sent_) || state_ == State::Closed || lingering_;
  }));
  // Ended with UCX maybe still reading the request's bytes: the caller keeps a copy (below),
  // made here without the worker's lock (a 64 MiB copy into fresh pages takes tens of ms, which
  // the worker's other channels would wait; review rev-remote2). Safe unlocked: UCX only reads
  // them, and they stay buf's (call_mu_ held) until handed to the send below. Destroyed after the
  // lock if not used.
  std::vector<std::byte> kept;
  bool copy = false;
  {
    os::LockGuard lock(w_->mu);
    copy = call_op_ != nullptr && !usable_locked();
  }
  if (copy) {
    try {
      kept.assign(buf.bytes_.begin(), buf.bytes_.end());
    } catch (const std::bad_alloc&) {  // given up below, as before
    }
  }
  os::LockGuard lock(w_->mu);
  // (R2) Timed out (or failed) with the request sent and its reply not come: its late reply, if
  // it comes, gives the credit back (and only one may come).
  if (!call_replied_ && usable_locked())
    requests_.push_back({call_seq_, call_bytes_, false, true, 0});
  call_seq_ = 0;
  if (done && reply_ready_ && call_sent_) {
    // The reply lands in the caller's buffer: the bytes UCX gave us become buf's.
    reply_ready_ = false;
    if (reply_status_ == kReplyNone) return fail(Errc::NoReply, "net::Channel::call");
    w_->spares->give(std::move(buf.bytes_), id_);  // the request's: UCX has sent it (call_sent_)
    buf.bytes_ = std::move(reply_bytes_);
    buf.channel_ = id_;  // its bytes are this channel's traffic now (Spares' tag when dropped)
    if (buf.bytes_.size() > Spares::kMin) buf.home_ = w_->spares;
    buf.size_ = reply_size_;
    return {};
  }
  if (call_op_ != nullptr) {
    // UCX may still read buf's bytes: they go with the send. At a deadline buf is given up; when
    // the channel has ended, the caller keeps the copy made above (PeerClosed leaves buf usable,
    // as locally: review rev-remote found it invalid after 10 of 12 calls of 48 MiB whose server
    // closed; a copy on this error path only; out of memory, or ended only after that look, buf
    // is given up after all).
    auto* op = static_cast<SendOp*>(call_op_);
    const bool keep = copy && !usable_locked() && kept.size() == buf.bytes_.size();
    op->owned = std::move(buf.bytes_);
    op->owner = nullptr;
    call_op_ = nullptr;
    if (keep) {
      buf.bytes_ = std::move(kept);
    } else {
      buf = Buffer{};
    }
  }
  if (!usable_locked()) return fail(closed_error_locked("net::Channel::call"));
  return fail(Errc::TimedOut, "net::Channel::call");
}

Status ChannelCore::send(Buffer&& buf, Deadline deadline, NoCredit how, WireKind kind) {
  MBMQ_TRY(check_not_forked());  // before the lock: a forked child may have it held
  MBMQ_TRY(own_buffer(buf, "net::Channel::send: buffer",
                      "net::Channel::send: a buffer() of another channel"));
  const bool request = kind == WireKind::Request;
  const std::size_t n = buf.size_;
  for (bool waited = false;; waited = true) {
    WindowWait wait;  // (F8) set: credit taken, the window full
    {
      const StartDeferredAfter after(*w_, this, true);  // deferred receives, unlocked
      os::LockGuard lock(w_->mu);
      if (!usable_locked()) return fail(closed_error_locked("net::Channel::send"));
      // Credit may be in the worker already, not yet taken in: progress once before failing.
      // (F8) And stalled with the window full: one look at the worker, so that a transport that
      // moves again (a completion) reopens the window (else a sender that no longer waits never
      // progresses, and queued its whole credit after one stall of a loaded machine). Before any
      // credit is taken: a failure it brings leaves buf the caller's (review rev-f8b).
      const bool stalled_full = how == NoCredit::Wait && tx_stalled_ && !tx_window_open_locked();
      if ((!can_send_locked(n) && !waited) || stalled_full) w_->progress_locked(this);
      if (!usable_locked()) return fail(closed_error_locked("net::Channel::send"));
      if (can_send_locked(n)) {
        if (how == NoCredit::Fail || tx_room_locked()) return send_now_locked(std::move(buf), kind);
        // (F8) The window is full: the credit is ours now (not the request's entry: listed when
        // it is sent, so that no reply can match a request not yet on the wire, review rev-f8b),
        // then waited for below, and sent.
        ++out_msgs_;
        out_bytes_ += n;
        ++tx_window_waiters_;
        wait.reserved = true;
        wait.seen = tx_completions_;
        wait.ahead = tx_pending_ - kTxWindowMessages + 1;  // full: tx_pending_ >= the window
      } else {
        // Out of credit: nothing sent, buf is still the caller's (a local channel's full ring).
        if (how == NoCredit::Fail)
          return fail(Errc::WouldBlock,
                      request ? "net::Channel::send_request: no credit"
                              : "net::Channel::send: the peer's inbox is full (no credit)");
        // Credit another thread took between our wake-up and this lock: wait again, until the
        // deadline.
        if (waited && deadline.expired())
          return fail(Errc::TimedOut, "net::Channel::send: no credit in time");
      }
    }
    if (wait.reserved) return send_after_window(std::move(buf), deadline, kind, wait);
    (void)MBMQ_TRY(w_->run_until(deadline, policy_, this, [&] {
      w_->assert_held();
      return !usable_locked() || can_send_locked(n);
    }));
  }
}

Status ChannelCore::send_now_locked(Buffer&& buf, WireKind kind, bool credit_taken) {
  // (F2) The peer gives it back once its application has received it (a request: with its reply,
  // R2).
  const std::size_t n = buf.size_;
  std::uint32_t seq = 0;
  if (!credit_taken) {
    ++out_msgs_;
    out_bytes_ += n;
  }
  // Out of memory (listing the request, or send_locked's SendOp): nothing sent, the credit goes
  // back, the request is unlisted, buf stays the caller's (review rev-f8c: the credit stayed
  // taken, one message of the grant lost for good per failure).
  try {
    if (kind == WireKind::Request) {
      // (R1) Outstanding until its reply reaches the inbox (or the channel ends).
      seq = next_seq_locked();
      requests_.push_back({seq, static_cast<std::uint32_t>(n), false, false, buf.tag_});
    }
    Status s = send_locked(kind, 0, seq, 0, nullptr, n, &buf.bytes_, false);
    if (s) {
      buf = Buffer{};
      return s;
    }
    // Not sent (send_locked gave the bytes back): buf stays the caller's, as on a full ring, so
    // that send_batch's unsent rest is untouched (mbmq/channel.h); the credit and the request's
    // entry go back (the channel has failed: nothing else will).
    give_back_reserved_locked(n);
    if (Outstanding* r = seq != 0 ? find_request_locked(seq) : nullptr) unlist_request_locked(r);
    return s;
  } catch (const std::bad_alloc&) {
    give_back_reserved_locked(n);
    if (Outstanding* r = seq != 0 ? find_request_locked(seq) : nullptr) unlist_request_locked(r);
    return fail(Errc::System, "net::Channel::send: no memory");
  }
}

Status ChannelCore::send_after_window(Buffer&& buf, Deadline deadline, WireKind kind,
                                      WindowWait wait) {
  // (F8) Until there is room, or as many of the channel's sends have completed as were beyond the
  // window when this one found it full (any of them: a soft bound; later sends of other threads,
  // or replies, which do not wait for the window, cannot keep it waiting: review rev-f8b), as
  // long as UCX completes some of ours in
  // each kTxStallNs, and within the deadline; then the message goes whether or not there is room:
  // the window never fails a send. A transport that completes nothing for kTxStallNs (the peer
  // fetches nothing) marks the channel stalled. Its credit was taken before the wait (review
  // rev-f8: a send(buf) by another thread meanwhile took the credit it had seen, and it timed
  // out waiting for more).
  const std::size_t n = buf.size_;
  std::uint64_t seen = wait.seen;
  Result<bool> room = false;
  for (;;) {
    const std::int64_t stall = monotonic_ns() + kTxStallNs;
    room = w_->run_until(Deadline::at_ns(std::min(deadline.ns(), stall)), policy_, this, [&] {
      w_->assert_held();
      return !usable_locked() || tx_room_locked() || tx_completions_ - wait.seen >= wait.ahead;
    });
    if (!room || *room || deadline.expired()) break;
    os::LockGuard lock(w_->mu);
    if (tx_completions_ == seen) {
      tx_stalled_ = true;  // nothing completed for kTxStallNs: the peer fetches nothing
      break;
    }
    seen = tx_completions_;  // slow, but moving (a loaded machine): wait on
  }
  const StartDeferredAfter after(*w_, this, true);  // deferred receives, unlocked
  os::LockGuard lock(w_->mu);
  --tx_window_waiters_;
  if (!room || !usable_locked()) {
    // Not sent: the credit goes back (a closed channel's ends with it anyway); buf stays.
    give_back_reserved_locked(n);
    if (!room) return fail(room.error());
    return fail(closed_error_locked("net::Channel::send"));
  }
  return send_now_locked(std::move(buf), kind, true);
}

Status ChannelCore::reply(std::uint32_t seq, Buffer&& buf, ReplyStatus status,
                          std::uint32_t credit_bytes) {
  MBMQ_TRY(check_not_forked());  // before the lock: a forked child may have it held
  os::LockGuard lock(w_->mu);
  if (!usable_locked()) return fail(closed_error_locked("net::Channel::reply"));
  const std::size_t n = buf.size_;
  // (F4) The reply carries its request's credit back (1 message, credit_bytes).
  if (rx_msgs_ > 0) --rx_msgs_;
  rx_bytes_ -= std::min<std::uint64_t>(rx_bytes_, credit_bytes);
  return send_locked(WireKind::Reply, status, seq, credit_bytes, nullptr, n, &buf.bytes_, false);
}

bool ChannelCore::can_send_locked(std::size_t n) const {
  // (F2) One more message within the peer's grant; its bytes too, unless nothing is out (so that
  // a message larger than the byte grant, up to the peer's limit, goes alone).
  return out_msgs_ < peer_grant_.messages &&
         (out_bytes_ == 0 || out_bytes_ + n <= peer_grant_.bytes);
}

bool ChannelCore::take_back_locked(std::uint32_t messages, std::uint32_t bytes) {
  if (messages > out_msgs_ || bytes > out_bytes_) {
    fail_locked(Errc::Protocol, "net: the peer gave back credit it was never given");
    return false;
  }
  out_msgs_ -= messages;
  out_bytes_ -= bytes;
  return true;
}

void ChannelCore::flush_credit_locked(Flush when) {
  if (ret_msgs_ == 0) return;  // every one-way message returns at least one message's credit
  if (when == Flush::IfHalf && ret_msgs_ < std::max<std::uint32_t>(1, my_grant_.messages / 2) &&
      ret_bytes_ < std::max<std::uint32_t>(1, my_grant_.bytes / 2))
    return;
  if (!usable_locked()) return;  // (nothing after our Bye)
  // (F5) Credit{seq: messages, limit: bytes}. ret_ <= rx_ <= the grant (bytes: at most
  // max(grant, my_limit_)), so both fit in 32 bits.
  const auto msgs = static_cast<std::uint32_t>(ret_msgs_);
  const auto bytes = static_cast<std::uint32_t>(ret_bytes_);
  rx_msgs_ -= ret_msgs_;
  rx_bytes_ -= ret_bytes_;
  ret_msgs_ = 0;
  ret_bytes_ = 0;
  (void)send_locked(WireKind::Credit, 0, msgs, bytes, nullptr, 0, nullptr, false);
}

Result<Message> ChannelCore::receive(Deadline deadline) {
  MBMQ_TRY(check_not_forked());  // before the lock: a forked child may have it held
  {
    os::LockGuard lock(w_->mu);
    if (source_)
      return fail(Errc::InvalidArgument,
                  "net::Channel::receive: the channel is redirected to a queue (MsgQueue::wait)");
    // (F5) About to wait with nothing queued: what the application took goes back now, so that a
    // sender waiting for it (or for bytes a large message needs) is never stuck on a batch.
    if (!head_ready_locked()) flush_credit_locked(Flush::IfAny);
  }
  const bool done = MBMQ_TRY(w_->run_until(deadline, policy_, this, [&] {
    w_->assert_held();
    return head_ready_locked() || state_ == State::Closed || lingering_ || source_;
  }));
  os::LockGuard lock(w_->mu);
  if (source_)  // redirected meanwhile (by another thread): the queue's now
    return fail(Errc::InvalidArgument,
                "net::Channel::receive: the channel was redirected to a queue (MsgQueue::wait)");
  if (head_ready_locked()) {  // (closed: the places of unreceived payloads are gone)
    Message m = take_head_locked();
    // With nothing more queued, at once: the application may now call() or send() and not come
    // back to receive() (a sender waiting for this credit would wait with it).
    flush_credit_locked(head_ready_locked() ? Flush::IfHalf : Flush::IfAny);
    return m;
  }
  if (!done) return fail(Errc::TimedOut, "net::Channel::receive");
  return end_message_locked();
}

Result<std::size_t> ChannelCore::receive_batch(std::span<Message> out, Deadline deadline) {
  out[0] = MBMQ_TRY(receive(deadline));
  if (out[0].kind == Kind::PeerClosed) return std::size_t{1};
  std::size_t n = 1;
  os::LockGuard lock(w_->mu);
  while (n < out.size() && head_ready_locked()) out[n++] = take_head_locked();
  flush_credit_locked(head_ready_locked() ? Flush::IfHalf : Flush::IfAny);  // (F5), as receive()
  // The end, last, once everything before it is taken.
  if (n < out.size() && inbox_.empty() && (state_ == State::Closed || lingering_) &&
      !peer_closed_delivered_) {
    if (Result<Message> end = end_message_locked()) out[n++] = std::move(*end);
  }
  return n;
}

Message ChannelCore::take_head_locked(bool count_credit) {
  Message m = std::move(inbox_.front());
  inbox_.pop_front();
  ++inbox_head_;
  if (count_credit && m.kind == Kind::Message) {
    // (F5) Received: its credit goes back, batched (flush_credit_locked; a request's goes with
    // its reply, a reply's came back with its header).
    ++ret_msgs_;
    ret_bytes_ += m.buffer.size_;
  }
  return m;
}

Result<Message> ChannelCore::end_message_locked() {
  if (peer_closed_delivered_) return fail(closed_error_locked("net::Channel::receive: closed"));
  peer_closed_delivered_ = true;
  Message m;
  m.kind = Kind::PeerClosed;
  m.error = closed_code_ == Errc::Protocol ? Errc::Protocol : Errc::PeerClosed;
  m.why = why_;
  return m;
}

void ChannelCore::close() noexcept {
  if (!ucx_usable()) return;
  std::deque<Message> drop;  // destroyed unlocked: their reply tokens take the lock
  std::vector<std::shared_ptr<void>> unqueued;  // (Q5) what our queue held of ours: the same
  try {
    unqueued.reserve(8);
  } catch (const std::bad_alloc&) {  // (unredirect_locked pushes a few: rare, tiny)
  }
  void* closing = nullptr;  // the close's request, waited on unlocked
  bool linger = false;      // (K5) left to the keeper
  // Linger: what we sent completes before the endpoint closes (a rendezvous send completes once
  // the peer has fetched its payload: a flush close alone did not keep it, the peer's endpoint
  // failed and the message was lost). One look at the worker here; sends the peer has not fetched
  // by then are not waited for (close() waited up to 100 ms for them, which held the queue or
  // event-loop thread that closed a slow peer's channel): the channel lingers on the keeper (K5),
  // which finishes them, and the exit handler gives lingering channels up to 100 ms (K7,
  // finish_kept), so that a process that sends, closes and exits loses nothing
  // its peer fetches in that time.
  {
    const StartDeferredAfter after(*w_, nullptr, true);  // deferred receives, unlocked
    os::LockGuard lock(w_->mu);
    if (usable_locked() && unfinished_locked()) w_->progress_locked();
  }
  const std::int64_t until = monotonic_ns() + 100'000'000;  // for the flush close below
  {
    const StartDeferredAfter after(*w_, nullptr, true);  // deferred receives, unlocked
    os::LockGuard lock(w_->mu);
    if (lingering_) return;  // closed already (another thread's close())
    if (state_ == State::Open) {
      (void)send_locked(WireKind::Bye, 0, 0, 0, nullptr, 0, nullptr, false);
      w_->progress_locked();
    }
    if (state_ != State::Closed) {
      closed_code_ = Errc::InvalidArgument;
      why_ = "net::Channel: closed";
    }
    if (listener_ != nullptr) {
      listener_->w_->assert_held();  // the same worker as ours
      listener_->drop_pending_locked(this);
    }
    listener_ = nullptr;
    // Sends the peer has not fetched yet (our Bye goes behind them: the peer holds it until it
    // has them, rx_pending_), or payloads of the peer's we are fetching: looked at after the Bye
    // and its progress (the allocating thread may have started a fetch meanwhile, D1).
    linger = state_ == State::Open && unfinished_locked();
    if (linger) {
      lingering_ = true;
      linger_until_ns_ = monotonic_ns() + kLingerMaxNs;
    } else {
      closing = close_ep_locked(Close::Flush);
    }
    w_->wake_waiters_locked(this);  // (W2 (d)) a thread waiting on this channel sees it closed
    drop_inbox_locked(drop);
    // (Q5) Closed by its owner: the queue delivers nothing more of it (as a local end closed by
    // its owner), and lets the source go with its last channel.
    unredirect_locked(unqueued);
  }
  if (linger) {
    try {
      keep_lingering(shared_from_this());
    } catch (...) {  // no memory or no thread for the keeper: closed now, as before K5
      os::LockGuard lock(w_->mu);
      lingering_ = false;
      close_ep_locked(Close::Force);
    }
    return;
  }
  if (closing == nullptr) return;
  // What we sent (a Bye, a reply) goes out before the close, within those 100 ms; the lock is taken
  // for each progress only (house rule: no lock held across a wait; the listener's other channels
  // share this worker), then released, unfinished or not (UCX asserts at ucp_worker_destroy on a
  // request not released; an unfinished close is cut short there).
  for (;;) {
    {
      const StartDeferredAfter after(*w_, nullptr, true);  // deferred receives, unlocked
      os::LockGuard lock(w_->mu);
      w_->progress_locked();  // with W1/W2: events for the worker's other waiters reach them
      if (w_->u->ucp_request_check_status(closing) != UCS_INPROGRESS) {
        w_->u->ucp_request_free(closing);
        return;
      }
    }
    if (monotonic_ns() >= until) break;
    os::sleep_ns(100'000);
  }
  // (K4) Unfinished (a send the peer has not fetched): the keeper finishes it, holding the worker
  // until then; destroying the worker now would abort in UCX.
  try {
    keep_closing(w_, closing);
  } catch (...) {  // no memory or no thread for the keeper: released now, as before K4
    os::LockGuard lock(w_->mu);
    w_->u->ucp_request_free(closing);
  }
}

}  // namespace mbmq::net::detail
