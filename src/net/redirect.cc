// net/redirect.cc: a remote channel redirected to a MsgQueue (issue #19; docs/design/net.md,
// "Redirect to a MsgQueue", Q1-Q6): one server loop serves local and remote clients, with no
// thread per connection and no copy of the payload.
//
// Who does what:
//   - UCX's callbacks (inside WorkerCore::progress_locked, worker mu held) put messages into the
//     channel's inbox as for receive(), and note the channel (ChannelCore::note_tap_locked).
//   - At the end of that progress (flush_taps_locked, still under mu) each noted channel's inbox
//     moves to its NetSource (one per worker and queue), the end after everything (Q5), and the
//     queue is woken if it sleeps (QueueCore::wake: no system call while it spins).
//   - The queue's wait() asks the source (NetSource::take, queue lock held, then the source's
//     own lock only: never the worker's) for one message: an mbmq::Message whose Buffer is the
//     net::Buffer UCX received into (a foreign Buffer, Q1). A one-way message's credit is counted
//     then, and given back by the next flush (the pump is signalled when a batch is due, Q4).
//   - MsgQueue::reply() calls the foreign buffer's reply(): net::Channel::reply, from the same
//     vector (Q4). Dropping a request unanswered answers NoReply, as locally.
//   - A pump thread per worker with redirected channels (Q3) progresses it while the server
//     sleeps in the queue: it waits on the worker's event fd as any waiter does (W1-W3).
//
// Locks, in order: the queue's lock, then a worker's mu, then a source's mu_. take() holds the
// queue's and the source's only; nothing is destroyed under a source's mu_ that could take a
// worker's mu (a request's reply token does).
#include <algorithm>
#include <new>
#include <thread>
#include <unordered_map>
#include <utility>

#include "ipc/foreign_buffer.h"
#include "ipc/listener_core.h"
#include "ipc/queue_core.h"
#include "net/core.h"
#include "net/remote.h"

namespace mbmq::net {
namespace detail {

// (Q2) A worker's channels redirected to one queue.
class NetSource final : public mbmq::detail::QueueSource {
 public:
  NetSource(const std::shared_ptr<mbmq::detail::QueueCore>& q, std::weak_ptr<WorkerCore> w)
      : queue_(q), queue_id_(q.get()), w_(std::move(w)) {}
  NetSource(const NetSource&) = delete;
  NetSource& operator=(const NetSource&) = delete;
  ~NetSource() = default;

  const void* queue_id() const noexcept { return queue_id_; }

  bool maybe_ready() const noexcept override {
    // In a forked child: take() says Gone (below), and the child's queue lets the source go.
    return ready_.load(std::memory_order_acquire) || !ucx_usable();
  }

  Take take(mbmq::Message* out) noexcept override {
    // A forked child's copy of the queue: UCX cannot be used here, nor can what it received be
    // answered (net::Channel::reply says "forked child"); the child's queue lets the source go.
    if (!ucx_usable()) return Take::Gone;
    std::shared_ptr<Queued> q;
    std::shared_ptr<ChannelCore> keep;  // an adopted channel's, once its end is delivered
    bool credit = false;
    std::uint64_t key = 0;
    {
      os::LockGuard lock(mu_);
      if (!head_) {
        ready_.store(detached_, std::memory_order_relaxed);
        return detached_ && taps_.empty() ? Take::Gone : Take::Empty;
      }
      q = std::move(head_);
      head_ = std::move(q->next);
      if (!head_) tail_ = nullptr;
      if (q->kind == Kind::Connection) {  // (Q6) no tap: the listener's key
        key = listen_key_;
        if (conns_queued_ > 0) --conns_queued_;  // the application has it now
      }
      auto it = q->kind == Kind::Connection ? taps_.end() : taps_.find(q->ch_id);
      if (it != taps_.end()) {
        Tap& t = it->second;
        key = t.key;
        if (t.queued > 0) --t.queued;
        if (q->kind == Kind::Message) {
          // (Q4) Received by the application: its credit goes back, batched as receive()'s (F5):
          // at half the grant, or when nothing more of this channel is queued, whatever the last
          // message taken was (a request behind one-way messages kept their credit before:
          // review rev-redirect), including what a flush at half the grant left in the channel
          // (owed).
          ++t.ret_msgs;
          t.ret_bytes += q->buffer.size_;
        }
        if (!t.credit_listed && ((t.queued == 0 && (t.ret_msgs > 0 || t.owed)) ||
                                 t.ret_msgs >= t.half_msgs || t.ret_bytes >= t.half_bytes)) {
          t.credit_listed = true;
          credit_ids_.push_back(q->ch_id);  // at most one entry per tap: capacity reserved
          credit = true;
        }
        if (q->kind == Kind::PeerClosed) {
          keep = std::move(t.keep);
          if (t.credit_listed) std::erase(credit_ids_, q->ch_id);  // (closed: no credit to give)
          taps_.erase(it);
        }
      }
      if (!head_) ready_.store(detached_, std::memory_order_relaxed);
    }
    *out = mbmq::Message{};
    out->key = key;
    out->kind = q->kind;
    out->error = q->error;
    out->why = q->why;
    if (q->kind == Kind::Connection) {
      out->channel = mbmq::detail::ChannelAccess::make_remote(std::move(q->conn));
    } else if (q->kind != Kind::PeerClosed) {
      const std::uint32_t id = q->buffer_id();
      out->buffer = Queued::expose(std::move(q), id);
    }
    if (credit) signal_worker();
    return Take::Got;  // keep (an adopted channel) goes here, with the queue's lock only
  }

  void close() noexcept override {
    if (!ucx_usable()) return;  // a forked child's copy: the parent's channels are not ours
    // The queue is being destroyed: every channel redirected here is closed (its peer's calls end
    // with PeerClosed), as the queue closes its local channel ends; so is every connection of a
    // redirected listener not yet taken (Q6), and push_connection() refuses from here on (the
    // listener's deliver_locked() then closes them: review rev-q6, which found them left open).
    std::vector<std::weak_ptr<ChannelCore>> chs;
    std::shared_ptr<Queued> conns;  // a chain, destroyed below with no lock held (closing takes mu)
    {
      os::LockGuard lock(mu_);
      closed_ = true;
      conns = take_if_locked([](const Queued& q) { return q.kind == Kind::Connection; });  // Q6
      conns_queued_ = 0;
      try {
        for (auto& [id, t] : taps_) chs.push_back(t.weak);
      } catch (const std::bad_alloc&) {  // closed by their handles, or at their end, instead
      }
    }
    conns.reset();
    for (auto& w : chs)
      if (auto ch = w.lock()) ch->close();
  }

  // ---- the worker's side (worker mu held) ----

  // half_*: the channel's grant halves (F5's batch).
  void add_tap(std::uint64_t id, ChannelCore* ch, std::uint64_t key,
               std::weak_ptr<ChannelCore> weak, std::shared_ptr<ChannelCore> keep,
               std::uint64_t half_msgs, std::uint64_t half_bytes) {
    os::LockGuard lock(mu_);
    credit_ids_.reserve(taps_.size() + 1);
    Tap t;
    t.ch = ch;
    t.key = key;
    t.weak = std::move(weak);
    t.keep = std::move(keep);
    t.half_msgs = std::max<std::uint64_t>(1, half_msgs);
    t.half_bytes = std::max<std::uint64_t>(1, half_bytes);
    taps_.emplace(id, std::move(t));
  }

  // Takes the channel out: its queued messages (one chain) and the adopter's reference go to
  // `drop` (two entries at most: the callers reserve room). Returns whether the source now has no
  // channel (the worker then lets go of it).
  bool remove_tap(std::uint64_t id, std::vector<std::shared_ptr<void>>& drop) {
    std::shared_ptr<ChannelCore> keep;
    std::shared_ptr<Queued> purged;  // a chain, freed by ~Queued one node at a time
    bool empty = false;
    {
      os::LockGuard lock(mu_);
      if (auto it = taps_.find(id); it != taps_.end()) {
        keep = std::move(it->second.keep);
        taps_.erase(it);
      }
      purged = take_if_locked([&](const Queued& q) { return q.ch_id == id; });
      std::erase(credit_ids_, id);
      empty = taps_.empty() && !listening_;
    }
    if (purged) drop.push_back(std::move(purged));
    if (keep) drop.push_back(std::move(keep));
    return empty;
  }

  // (Q6) The worker's listener delivers its connections here, tagged `key`.
  void add_listener(std::uint64_t key) {
    os::LockGuard lock(mu_);
    listening_ = true;
    listen_key_ = key;
  }
  // Returns whether the source now has no user (the worker then lets go of it). Connections
  // already queued stay, to be delivered.
  bool remove_listener() {
    os::LockGuard lock(mu_);
    listening_ = false;
    return taps_.empty();
  }
  // False once the queue has closed the source, or is gone: nobody would take q. The caller
  // keeps q (and closes its channel).
  bool push_connection(std::shared_ptr<Queued>& q) {
    os::LockGuard lock(mu_);
    if (closed_ || queue_.expired()) return false;
    append_locked(std::move(q));
    ++conns_queued_;
    return true;
  }
  // (Q6) Connections pushed and not yet taken by the queue (ListenOptions::backlog counts them).
  std::size_t connections_queued() const {
    os::LockGuard lock(mu_);
    return conns_queued_;
  }

  std::size_t channel_count() const noexcept override {
    if (!ucx_usable()) return 0;  // a forked child's copy (its lock may have been held)
    os::LockGuard lock(mu_);
    return taps_.size();
  }

  // No more channels will come: the queue lets go of it at its next look.
  void detach() {
    {
      os::LockGuard lock(mu_);
      detached_ = true;
      ready_.store(true, std::memory_order_release);
    }
    wake_queue();
  }

  void push(std::shared_ptr<Queued> q) {
    os::LockGuard lock(mu_);
    auto it = taps_.find(q->ch_id);
    // Never: a channel pushes only while its tap is here (both under the worker's mu; take()
    // erases a tap only after its end, which is pushed last). Kept, not destroyed here: a
    // request's reply token takes the worker's mu, held by our caller.
    if (it == taps_.end()) {
      orphans_.push_back(std::move(q));  // (unreachable; freed with the source)
      return;
    }
    ++it->second.queued;
    append_locked(std::move(q));
  }

  void wake_queue() noexcept {
    if (auto q = queue_.lock()) q->wake();
  }

  // (Q4) The credit the queue's takes released: each channel's, once.
  struct Credit {
    ChannelCore* ch;
    std::uint64_t msgs, bytes;
    bool drained;  // nothing more of it queued (F5's "about to wait")
  };
  void take_credit(std::vector<Credit>& out) {
    os::LockGuard lock(mu_);
    out.reserve(out.size() + credit_ids_.size());  // may throw: before anything changes
    for (std::uint64_t id : credit_ids_) {
      auto it = taps_.find(id);
      if (it == taps_.end()) continue;
      Tap& t = it->second;
      out.push_back({t.ch, t.ret_msgs, t.ret_bytes, t.queued == 0});
      // Flushed at half the grant only (more of it queued): what stays in the channel goes when
      // the queue next drains it.
      t.owed = t.queued != 0;
      t.ret_msgs = t.ret_bytes = 0;
      t.credit_listed = false;
    }
    credit_ids_.clear();
  }

 private:
  struct Tap {
    ChannelCore* ch = nullptr;  // valid under the worker's mu (unredirect_locked removes it)
    std::uint64_t key = 0;
    std::weak_ptr<ChannelCore> weak;
    std::shared_ptr<ChannelCore> keep;          // net::adopt: until the end is delivered
    std::uint64_t queued = 0;                   // messages in the FIFO
    std::uint64_t ret_msgs = 0, ret_bytes = 0;  // delivered one-way messages, credit not yet back
    std::uint64_t half_msgs = 1, half_bytes = 1;
    bool credit_listed = false;  // in credit_ids_
    bool owed = false;           // the channel may hold released credit not yet sent (F5's IfHalf)
  };

  std::size_t conns_queued_ MBMQ_GUARDED_BY(mu_) = 0;  // (Q6) connections in the FIFO

  void append_locked(std::shared_ptr<Queued> q) MBMQ_REQUIRES(mu_) {
    Queued* raw = q.get();
    if (tail_ != nullptr) {
      tail_->next = std::move(q);
    } else {
      head_ = std::move(q);
    }
    tail_ = raw;
    ready_.store(true, std::memory_order_release);
  }

  // Takes the messages `out` picks out of the FIFO, in order, as one chain (freed by ~Queued one
  // node at a time); the rest stays, in order.
  template <class Pred>
  std::shared_ptr<Queued> take_if_locked(Pred out) MBMQ_REQUIRES(mu_) {
    std::shared_ptr<Queued> kept, taken;
    Queued* kept_tail = nullptr;
    Queued* taken_tail = nullptr;
    while (head_) {
      std::shared_ptr<Queued> q = std::move(head_);
      head_ = std::move(q->next);
      const bool picked = out(*q);
      Queued*& tail = picked ? taken_tail : kept_tail;
      std::shared_ptr<Queued>& link = tail != nullptr ? tail->next : (picked ? taken : kept);
      tail = q.get();
      link = std::move(q);
    }
    head_ = std::move(kept);
    tail_ = kept_tail;
    if (!head_) ready_.store(detached_, std::memory_order_relaxed);
    return taken;
  }

  void signal_worker() noexcept {
    if (auto w = w_.lock()) {
      // UCX: "safe to use this routine from any thread" (ucp.h), whatever the worker's thread
      // mode: a write to the worker's wake-up fd, so no worker lock here.
      w->credit_due.store(true, std::memory_order_release);
      // The pump (or whoever polls the worker's fd) wakes and flushes (thread-safe in UCX).
      (void)w->u->ucp_worker_signal(w->worker);
    }
  }

  const std::weak_ptr<mbmq::detail::QueueCore> queue_;
  const void* const queue_id_;
  const std::weak_ptr<WorkerCore> w_;
  std::atomic<bool> ready_{false};
  mutable os::Mutex mu_;
  std::shared_ptr<Queued> head_ MBMQ_GUARDED_BY(mu_);
  Queued* tail_ MBMQ_GUARDED_BY(mu_) = nullptr;
  std::unordered_map<std::uint64_t, Tap> taps_ MBMQ_GUARDED_BY(mu_);
  std::vector<std::uint64_t> credit_ids_ MBMQ_GUARDED_BY(mu_);
  bool detached_ MBMQ_GUARDED_BY(mu_) = false;
  bool closed_ MBMQ_GUARDED_BY(mu_) = false;           // (Q6) by the queue: no more connections
  bool listening_ MBMQ_GUARDED_BY(mu_) = false;        // (Q6) the worker's listener delivers here
  std::uint64_t listen_key_ MBMQ_GUARDED_BY(mu_) = 0;  // its key (kept for queued connections)
  std::vector<std::shared_ptr<Queued>> orphans_ MBMQ_GUARDED_BY(mu_);  // push() without a tap
};

const std::byte* queued_vector(const mbmq::Buffer& b) noexcept {
  const auto* q = dynamic_cast<const Queued*>(mbmq::detail::ForeignAccess::of(b));
  return q != nullptr ? q->buffer.data().data() : nullptr;
}

namespace {

std::atomic<int> g_pumps{0};  // pump threads started and not yet ended (pumps_running())

}  // namespace

int pumps_running() noexcept { return g_pumps.load(std::memory_order_acquire); }

namespace {

// (Q3) Progresses a worker with redirected channels while their servers sleep in their queues.
// A waiter like any other (W1-W3), keyed by the worker's pump_key: whoever progresses the worker
// flushes what its events brought redirected channels (progress_locked), so only the pump's own
// end is news for it. It holds no reference to the worker (~WorkerCore stops and joins it).
void pump(WorkerCore* w) {
  WaitPolicy sleep;
  sleep.mode = WaitMode::Sleep;
  for (;;) {
    auto r = w->run_until(Deadline::after(std::chrono::seconds(1)), sleep, &w->pump_key, [&] {
      w->assert_held();
      // (Q6) A redirected listener's failed connections (nobody accept()s): freed below. Seen
      // within the 20 ms cap of the pump's sleep when they fail outside a progress (the keeper's
      // handshake expiry).
      if (w->redirected == 0 || w->pump_stop) return true;
      ListenCore* l = w->listen_tap;
      if (l == nullptr) return false;
      l->w_->assert_held();  // ours
      return l->graveyard_due_locked();
    });
    std::vector<std::shared_ptr<ChannelCore>> failed;  // destroyed unlocked (they take mu)
    {
      os::LockGuard lock(w->mu);
      if (w->redirected == 0 || w->pump_stop) {
        w->pump_running = false;
        g_pumps.fetch_sub(1, std::memory_order_release);
        return;
      }
      if (ListenCore* l = w->listen_tap) {
        l->w_->assert_held();  // ours
        l->take_graveyard_locked(failed);
      }
    }
    failed.clear();
    // Waiting failed (poll(): rare): the channels still need progress; a pause, not a spin.
    if (!r) os::sleep_ns(1'000'000);
  }
}

}  // namespace

void WorkerCore::flush_taps_locked() const {
  if (credit_due.load(std::memory_order_relaxed) &&
      credit_due.exchange(false, std::memory_order_acq_rel)) {
    std::vector<NetSource::Credit> credit;
    try {
      for (const auto& src : sources) src->take_credit(credit);
    } catch (const std::bad_alloc&) {
      credit_due.store(true, std::memory_order_relaxed);  // the next flush
    }
    for (const NetSource::Credit& c : credit) {
      c.ch->assert_held();
      c.ch->tap_credit_locked(c.msgs, c.bytes, c.drained);
    }
  }
  // A channel may be noted again while this runs (its flush fails it): until none is left.
  while (!tap_news.empty()) {
    ChannelCore* ch = tap_news.back();
    tap_news.pop_back();
    ch->assert_held();
    ch->tap_flush_locked();
  }
  if (listen_tap != nullptr) {      // (Q6)
    listen_tap->w_->assert_held();  // ours
    listen_tap->deliver_locked();
  }
}

std::shared_ptr<NetSource> WorkerCore::source_of_locked(const void* queue_id) const {
  for (const auto& s : sources)
    if (s->queue_id() == queue_id) return s;
  return nullptr;
}

bool WorkerCore::start_pump_locked(std::thread& ended) {
  if (pump_running) return true;
  try {
    g_pumps.fetch_add(1, std::memory_order_relaxed);
    // An earlier pump that ended (pump_running false: it only returns now) is joined unlocked,
    // by the caller; the new one waits for mu, then finds its reason to run.
    std::thread next(pump, this);
    ended = std::move(pump_thread);
    pump_thread = std::move(next);
  } catch (...) {
    g_pumps.fetch_sub(1, std::memory_order_relaxed);
    return false;
  }
  pump_running = true;
  return true;
}

void ChannelCore::tap_credit_locked(std::uint64_t msgs, std::uint64_t bytes, bool drained) {
  ret_msgs_ += msgs;
  ret_bytes_ += bytes;
  flush_credit_locked(drained ? Flush::IfAny : Flush::IfHalf);
}

void ChannelCore::tap_flush_locked() {
  tap_listed_ = false;
  if (!source_) return;
  bool pushed = false;
  while (head_ready_locked()) {
    std::shared_ptr<Queued> q;
    try {
      q = std::make_shared<Queued>();
    } catch (const std::bad_alloc&) {
      note_tap_locked();  // left in the inbox: the next flush
      break;
    }
    Message m = take_head_locked(false);  // (Q4) its credit: when the queue delivers it
    q->kind = m.kind;
    q->error = m.error;
    q->why = m.why;
    q->ch_id = id_;
    q->buffer = std::move(m.buffer);
    source_->push(std::move(q));
    pushed = true;
  }
  // (Q5) The end, after everything received before it.
  if (state_ == State::Closed && inbox_.empty() && !peer_closed_delivered_) {
    try {
      auto q = std::make_shared<Queued>();
      q->kind = Kind::PeerClosed;
      q->error = closed_code_ == Errc::Protocol ? Errc::Protocol : Errc::PeerClosed;
      q->why = why_;
      q->ch_id = id_;
      peer_closed_delivered_ = true;
      source_->push(std::move(q));
      pushed = true;
    } catch (const std::bad_alloc&) {
      note_tap_locked();
    }
  }
  if (pushed) source_->wake_queue();
}

namespace {

// What a redirect (a channel's or a listener's) leaves for after its lock: a pump thread that
// ended, to join; a source made unlocked and not used (another thread's came first, or the
// redirect failed), to detach (the queue then drops it at its next look).
struct Leftovers {
  std::thread ended;
  std::shared_ptr<NetSource> fresh;
  Leftovers() = default;
  Leftovers(const Leftovers&) = delete;
  Leftovers& operator=(const Leftovers&) = delete;
  ~Leftovers() {
    if (fresh) fresh->detach();
    if (ended.joinable()) ended.join();
  }
};

}  // namespace

void ChannelCore::unredirect_locked(std::vector<std::shared_ptr<void>>& drop) {
  if (!source_) return;
  std::erase(w_->tap_news, this);
  tap_listed_ = false;
  const bool empty = source_->remove_tap(id_, drop);
  if (empty) {
    std::erase(w_->sources, source_);
    source_->detach();
  }
  drop.push_back(std::move(source_));
  source_.reset();
  if (w_->redirected > 0 && --w_->redirected == 0) w_->wake_waiters_locked(&w_->pump_key);  // Q3
}

Status ChannelCore::redirect(const std::shared_ptr<mbmq::detail::QueueCore>& queue,
                             std::uint64_t key, bool adopt) {
  MBMQ_TRY(check_not_forked());  // before the lock: a forked child may have it held
  if (!queue) return fail(Errc::InvalidArgument, "net::Channel::redirect: invalid queue");
  // Made unlocked (it takes the queue's lock) if the worker has no source for this queue; let go
  // (detached: the queue drops it at its next look) on every way out that did not use it.
  Leftovers left;  // released after our lock (declared before it)
  std::thread& ended = left.ended;
  std::shared_ptr<NetSource>& fresh = left.fresh;
  for (;;) {
    {
      os::LockGuard lock(w_->mu);
      if (!usable_locked()) return fail(closed_error_locked("net::Channel::redirect: closed"));
      if (source_) return fail(Errc::InvalidArgument, "net::Channel::redirect: already redirected");
      std::shared_ptr<NetSource> src = w_->source_of_locked(queue.get());
      if (src || fresh) {
        const bool ours = !src;  // the source made above: the worker's from here
        try {
          w_->sources.reserve(w_->sources.size() + 1);
          w_->tap_news.reserve(w_->redirected + 1);
          if (ours) {
            src = std::move(fresh);
            w_->sources.push_back(src);
          }
          src->add_tap(id_, this, key, weak_from_this(), adopt ? shared_from_this() : nullptr,
                       my_grant_.messages / 2, my_grant_.bytes / 2);
        } catch (const std::bad_alloc&) {
          if (ours && src) {
            std::erase(w_->sources, src);
            src->detach();
          }
          return fail(Errc::System, "net::Channel::redirect: no memory");
        }
        // (Q3) The pump first, before anything is committed: if no thread can be had, the
        // channel is left as it was (its inbox not moved), and so is the worker's pump state.
        if (!w_->start_pump_locked(ended)) {
          std::vector<std::shared_ptr<void>> none;  // nothing queued of ours yet: stays empty
          try {
            none.reserve(2);
          } catch (...) {
          }
          if (src->remove_tap(id_, none) && ours) {
            std::erase(w_->sources, src);
            src->detach();
          }
          return fail(Errc::System, "net::Channel::redirect: cannot start the pump thread");
        }
        source_ = std::move(src);
        tap_key_ = key;
        ++w_->redirected;
        // A thread inside receive() on this channel returns (InvalidArgument: receive() stops
        // once source_ is set), as it would at a local end's redirect (there: Busy).
        w_->wake_waiters_locked(this);
        // What the application received before took credit that a flush at half the grant may
        // have kept back (F5): it goes now, or a request-only peer could stall on it for good
        // (second review of rev-redirect).
        flush_credit_locked(Flush::IfAny);
        // What already arrived goes to the queue now.
        note_tap_locked();
        w_->flush_taps_locked();
        return {};
      }
    }
    try {
      fresh = std::make_shared<NetSource>(queue, w_);
      queue->add_source(fresh);
    } catch (const std::bad_alloc&) {
      return fail(Errc::System, "net::Channel::redirect: no memory");
    }
  }
}

// ---- (Q6) a listener redirected to a queue ----

Status ListenCore::redirect(const std::shared_ptr<mbmq::detail::QueueCore>& queue,
                            std::uint64_t key) {
  MBMQ_TRY(check_not_forked());  // before the lock: a forked child may have it held
  if (!queue) return fail(Errc::InvalidArgument, "net::Listener::redirect: invalid queue");
  Leftovers left;  // released after our lock (declared before it)
  std::thread& ended = left.ended;
  std::shared_ptr<NetSource>& fresh = left.fresh;
  for (;;) {
    {
      os::LockGuard lock(w_->mu);
      if (source_ != nullptr)
        return fail(Errc::InvalidArgument, "net::Listener::redirect: already redirected");
      std::shared_ptr<NetSource> src = w_->source_of_locked(queue.get());
      if (src || fresh) {
        const bool ours = !src;
        try {
          w_->sources.reserve(w_->sources.size() + 1);
        } catch (const std::bad_alloc&) {
          return fail(Errc::System, "net::Listener::redirect: no memory");
        }
        // The pump first: without it nothing would progress the handshakes.
        if (!w_->start_pump_locked(ended))
          return fail(Errc::System, "net::Listener::redirect: cannot start the pump thread");
        if (ours) {
          src = std::move(fresh);
          w_->sources.push_back(src);
        }
        src->add_listener(key);
        source_ = std::move(src);
        w_->listen_tap = this;
        ++w_->redirected;
        w_->wake_waiters_locked(this);  // a thread inside accept() returns (InvalidArgument)
        deliver_locked();               // what accept() has not taken yet goes to the queue
        return {};
      }
    }
    try {
      fresh = std::make_shared<NetSource>(queue, w_);
      queue->add_source(fresh);
    } catch (const std::bad_alloc&) {
      return fail(Errc::System, "net::Listener::redirect: no memory");
    }
  }
}

void ListenCore::deliver_locked() {
  if (source_ == nullptr) return;
  bool pushed = false;
  for (auto it = ready_.begin(); it != ready_.end();) {
    (*it)->assert_held();  // our worker's
    // (N4) Once its HelloAck has left, as accept() hands it out.
    if (!(*it)->acceptable_locked()) {
      ++it;
      continue;
    }
    std::shared_ptr<Queued> q;
    try {
      // Room in the graveyard first: its two pushes below then never throw (a push that threw
      // with the core in q->conn would destroy that Channel here, closing it under mu: the
      // self-deadlock of review rev-q6 again, found by the second review).
      graveyard_.reserve(graveyard_.size() + 1);
      q = std::make_shared<Queued>();
      // An empty Channel first, then the core (which cannot throw): a Channel holding the core,
      // destroyed here by a failed allocation, would close it taking mu, which we hold (review
      // rev-q6: a self-deadlock).
      q->conn = std::make_shared<RemoteEnd>();
    } catch (const std::bad_alloc&) {
      break;  // left in ready_: the next flush
    }
    q->conn->ch.core_ = std::move(*it);
    q->kind = Kind::Connection;
    it = ready_.erase(it);
    if (!source_->push_connection(q)) {
      // The queue is gone or being destroyed: nobody will take it. Closed by the pump, unlocked;
      // the Channel handle lets go of its core first (not closed here, under mu).
      graveyard_.push_back(std::move(q->conn->ch.core_));
      continue;
    }
    pushed = true;
  }
  if (pushed) source_->wake_queue();
}

std::size_t ListenCore::held_locked() const {
  return pending_.size() + ready_.size() + (source_ ? source_->connections_queued() : 0);
}

void ListenCore::unredirect_locked(std::shared_ptr<NetSource>& out) {
  if (source_ == nullptr) return;
  if (source_->remove_listener()) {
    std::erase(w_->sources, source_);
    source_->detach();
  }
  out = std::move(source_);
  source_.reset();
  w_->listen_tap = nullptr;
  if (w_->redirected > 0 && --w_->redirected == 0) w_->wake_waiters_locked(&w_->pump_key);  // Q3
}

}  // namespace detail

Result<Channel> accepted(mbmq::Message& msg) {
  std::shared_ptr<mbmq::detail::ForeignChannel>& r =
      mbmq::detail::ChannelAccess::remote(msg.channel);
  // Only mbmq::net makes remote ends, and only RemoteEnds.
  auto* end = dynamic_cast<detail::RemoteEnd*>(r.get());
  if (end == nullptr) return fail(Errc::InvalidArgument, "net::accepted: not a remote connection");
  if (!end->ch.valid()) return fail(Errc::InvalidArgument, "net::accepted: taken already");
  Channel ch = std::move(end->ch);
  r.reset();  // an empty RemoteEnd: closes nothing
  return ch;
}

Status Listener::redirect(MsgQueue& queue, std::uint64_t key) {
  if (!core_) return fail(Errc::InvalidArgument, "net::Listener::redirect: invalid listener");
  return core_->redirect(mbmq::detail::QueueAccess::core(queue), key);
}

Status Channel::redirect(MsgQueue& queue, std::uint64_t key) {
  if (!valid()) return fail(Errc::InvalidArgument, "net::Channel::redirect: closed");
  return core_->redirect(mbmq::detail::QueueAccess::core(queue), key, false);
}

Status adopt(MsgQueue& queue, Channel&& channel, std::uint64_t key) {
  if (!channel.valid()) return fail(Errc::InvalidArgument, "net::adopt: closed channel");
  MBMQ_TRY(channel.core_->redirect(mbmq::detail::QueueAccess::core(queue), key, true));
  channel.core_.reset();  // the queue's reference keeps it open: not closed here
  return {};
}

}  // namespace mbmq::net
