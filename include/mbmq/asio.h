// mbmq/asio.h: mbmq on an asio event loop (standalone asio, Debian's libasio-dev; header-only,
// opt-in: CMake target mbmq::asio). Two types:
//   AsyncQueue    a MsgQueue served by an executor through its pollable fd (MsgQueue::fd()):
//                 async_wait() for requests, messages and connections, async replies
//   AsyncChannel  a Channel redirected to an AsyncQueue, with async_call(): many calls in flight
//                 on one channel, each reply routed back to the call whose buffer it came in
//
//   asio::io_context io;
//   mbmq::AsyncQueue q = MBMQ_TRY(mbmq::AsyncQueue::create(io.get_executor()));
//   MBMQ_TRY(listener.redirect(q.queue(), 0));                 // serving: requests, connections
//   asio::co_spawn(io, [&]() -> asio::awaitable<void> {
//     for (;;) {
//       mbmq::Result<mbmq::Message> m = co_await q.async_wait(asio::use_awaitable);
//       if (m && m->kind == mbmq::Kind::Request) (void)q.reply(std::move(*m));  // answer in place
//     }
//   }, asio::detached);
//
//   mbmq::AsyncChannel ch = MBMQ_TRY(mbmq::AsyncChannel::create(q, std::move(channel), 1));
//   mbmq::Buffer buf = MBMQ_TRY(ch.buffer(64));                 // calling: one per request
//   mbmq::Status s = co_await ch.async_call(buf, mbmq::Deadline::after(1s), asio::use_awaitable);
//   // s: the reply is in buf, as Channel::call() leaves it
//
// Completion signatures: async_wait void(Result<Message>), async_call void(Status). Any asio
// completion token works (tested: asio::use_awaitable and callbacks); nothing throws an mbmq
// error: errors are values, as in the blocking API. Handlers run on their associated executor (by
// default the queue's), never inside the initiating call: errors are posted; a message or reply
// is dispatched as the loop takes it (run at once when the handler's executor is the one running,
// as it is for a coroutine spawned on the queue's executor).
//
// Errors are those of the blocking API:
//   Errc::TimedOut        the deadline passed first. A cancelled operation (asio per-operation
//                         cancellation, e.g. a cancellation_signal bound to the handler or
//                         awaitable operator ||, or cancel()) ends the same way, as if its
//                         deadline had come now, with error().op == "cancelled" (cancelled()).
//   Errc::PeerClosed      async_call: the server's end closed or died (Errc::Protocol: it broke
//                         the protocol; error().op then says which rule, as Message::why)
//   Errc::NoReply         async_call: the server dropped the request; the buffer is back in buf
//   Errc::WouldBlock, Errc::Busy: async_call could not send (back-pressure, see below)
//   Errc::InvalidArgument the queue or channel is closed (as Channel::close() does to a call in
//                         progress), or a wrong call
//
// Nothing is lost to a cancellation or a deadline:
//  - async_wait takes a message from the queue only for an operation that is waiting for it, and
//    runs its handler in the same step; a cancelled or expired wait had taken nothing. So an
//    awaitable operator || whose other branch (a timer) wins drops no message: by the time it
//    cancels the wait, the wait either has its message delivered or has taken none. That needs the
//    handler's executor to be the queue's (the thread running it): a handler bound elsewhere gets
//    its message posted, and a cancellation emitted before it runs comes too late to stop it.
//    A message taken while no async_wait is pending (the queue is drained to route replies while
//    calls are in flight) is kept, in order, for the next async_wait.
//  - async_call's buffer, given up at its deadline or cancellation, is lost to the caller (`buf`
//    is left invalid, as Channel::call leaves it at TimedOut) until the late reply arrives; the
//    queue then releases that reply, so the buffer goes back to the channel's pool: nothing leaks.
//    The queue keeps watching its fd until every such late reply has come (or the channel ends).
//
// Deadlines are mbmq::Deadline (CLOCK_MONOTONIC, the clock of std::chrono::steady_clock on Linux);
// one asio timer per queue serves them all. As in the blocking API, a wait whose deadline has
// already passed still looks once: a message already there wins over the deadline.
//
// Back-pressure: async_call sends at once (Channel::send_request). If the channel cannot take the
// request (Errc::Busy: past max_in_flight; Errc::WouldBlock: the peer's ring or control socket is
// full) the call completes with that error, nothing sent and `buf` still the caller's, to retry
// later (after another call on the channel completes). ChannelOptions::slots_per_side (<= 64)
// and max_in_flight decide how many calls one channel carries; past its 64 extents, buffer()
// returns Errc::NoBuffers. For replies, AsyncQueue::reply keeps an answer its caller cannot take
// yet and retries it every millisecond, as MsgQueue::reply_and_wait does.
//
// Thread safety: as asio's own I/O objects. An AsyncQueue, its AsyncChannels and the operations
// on them are used from one thread at a time: the thread running their executor (an io_context
// run by one thread, or a strand). The Channel's peer is any process or thread.
//
// Lifetime: destroy AsyncChannels and AsyncQueues before their io_context. Destroying (or close())
// an AsyncQueue completes its pending operations with Errc::InvalidArgument and closes every
// channel redirected to its MsgQueue, as the MsgQueue's destructor does; destroying an
// AsyncChannel completes its calls the same way and closes the channel.
//
// Memory ordering: as the blocking API (mbmq/channel.h): what the peer wrote into a buffer before
// replying is visible when the handler runs.
#pragma once

#include <asio/any_io_executor.hpp>
#include <asio/associated_cancellation_slot.hpp>
#include <asio/associated_executor.hpp>
#include <asio/async_result.hpp>
#include <asio/cancellation_type.hpp>
#include <asio/dispatch.hpp>
#include <asio/error.hpp>
#include <asio/execution/outstanding_work.hpp>
#include <asio/posix/stream_descriptor.hpp>
#include <asio/post.hpp>
#include <asio/prefer.hpp>
#include <asio/steady_timer.hpp>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "mbmq/buffer.h"
#include "mbmq/channel.h"
#include "mbmq/deadline.h"
#include "mbmq/msg_queue.h"
#include "mbmq/result.h"
#include "mbmq/wait_policy.h"

namespace mbmq {

// error().op of an operation ended by cancellation (its code is Errc::TimedOut).
inline constexpr const char* kCancelledOp = "cancelled";
inline bool cancelled(const Error& e) noexcept {
  return e.code == Errc::TimedOut && std::strcmp(e.op, kCancelledOp) == 0;
}

namespace detail {

class AsyncCore;
struct AsyncChannelCore;

// A pending async_wait or async_call, type-erased (asio 1.22 has no any_completion_handler).
// Owned by the AsyncCore's table from initiation until finish(), which deletes it.
class AsyncOp {
 public:
  enum class Type : std::uint8_t { Wait, Call };
  explicit AsyncOp(Type t) noexcept : type(t) {}
  AsyncOp(const AsyncOp&) = delete;
  AsyncOp& operator=(const AsyncOp&) = delete;
  virtual ~AsyncOp() = default;

  const Type type;
  std::uint64_t id = 0;
  bool timed = false;  // in AsyncCore::deadlines_, at deadline_at
  std::multimap<std::int64_t, AsyncOp*>::iterator deadline_at;
  // Type::Call only: its channel, where the reply goes, and the buffer's id (Buffer::id()).
  AsyncChannelCore* channel = nullptr;
  Buffer* buf = nullptr;
  std::uint32_t buffer_id = 0;
};

// How an operation's handler is run.
//   Post      later (an error, or anything from inside the initiating function)
//   Dispatch  now if we run on the handler's executor, else posted: for a message or reply just
//             taken from the queue. Run in the same step, it cannot be overtaken by a cancellation
//             (an awaitable operator || whose timer fired meanwhile would discard a completion
//             that arrives second, and the message with it).
//   Cancel    posted, from the handler's own cancellation slot (whose handler must not be
//             destroyed under it)
enum class Finish : std::uint8_t { Post, Dispatch, Cancel };

template <class R>
class TypedOp : public AsyncOp {
 public:
  using AsyncOp::AsyncOp;
  // Runs the handler with r (see Finish) and deletes this.
  virtual void finish(R&& r, Finish how) noexcept = 0;
};
using WaitOp = TypedOp<Result<Message>>;
using CallOp = TypedOp<Status>;

// The op of a concrete handler: keeps its associated executor busy (outstanding work) until it
// completes, and posts the handler there.
template <class R, class Handler>
class OpImpl final : public TypedOp<R> {
 public:
  OpImpl(AsyncOp::Type t, Handler&& h, const asio::any_io_executor& io_ex)
      : TypedOp<R>(t),
        handler_(std::move(h)),
        work_(asio::prefer(asio::get_associated_executor(handler_, io_ex),
                           asio::execution::outstanding_work.tracked)) {}

  // Binds the handler's cancellation slot, if it has one, to AsyncCore::cancel_op(id).
  template <class Cancel>
  void bind_cancellation(Cancel&& cancel) {
    auto slot = asio::get_associated_cancellation_slot(handler_);
    if (slot.is_connected()) slot.assign(std::forward<Cancel>(cancel));
  }

  void finish(R&& r, Finish how) noexcept override {
    if (how != Finish::Cancel) {
      auto slot = asio::get_associated_cancellation_slot(handler_);
      if (slot.is_connected()) slot.clear();
    }
    asio::any_io_executor ex = std::move(work_);
    auto f = [h = std::move(handler_), r = std::move(r)]() mutable { std::move(h)(std::move(r)); };
    delete this;
    if (how == Finish::Dispatch)
      asio::dispatch(ex, std::move(f));
    else
      asio::post(ex, std::move(f));
  }

 private:
  Handler handler_;
  asio::any_io_executor work_;
};

// An AsyncChannel's state: the channel and its calls in flight, by buffer id.
struct AsyncChannelCore {
  Channel channel;
  std::uint64_t key = 0;
  std::shared_ptr<AsyncCore> core;
  std::unordered_map<std::uint32_t, CallOp*> calls;
  // Buffers of calls given up (deadline, cancellation) whose late replies are still to come.
  std::unordered_set<std::uint32_t> abandoned;
  bool ended = false;  // PeerClosed seen, or detached from its queue: end_error says how
  Error end_error{};
};

// The state of an AsyncQueue, shared with the handlers it has pending on its executor.
//
// How the fd is served (MsgQueue::fd(): readable while wait(Deadline::immediate()) could return a
// message, until a wait() finds nothing). asio watches descriptors edge-triggered (EPOLLET), so a
// readiness nobody is waiting for is not reported again. Hence the order in drain():
//  (1) start the fd wait first (arm_fd), then
//  (2) take messages with wait(immediate) until it says TimedOut, which re-arms the fd: from then
//      on a new message makes the fd readable again, an edge the pending wait of (1) sees.
// When draining stops for another reason (nobody wants messages, or the batch is done) the fd may
// stay readable with no new edge: every new operation therefore drains once more (post_pump).
class AsyncCore : public std::enable_shared_from_this<AsyncCore> {
 public:
  AsyncCore(const asio::any_io_executor& ex, MsgQueue&& q)
      : ex_(ex), queue_(std::move(q)), desc_(ex), timer_(ex), retry_timer_(ex) {}
  AsyncCore(const AsyncCore&) = delete;
  AsyncCore& operator=(const AsyncCore&) = delete;
  ~AsyncCore() { close(); }

  Status open() {
    if (!queue_.valid()) return fail(Errc::InvalidArgument, "AsyncQueue: invalid queue");
    const int fd = queue_.fd();
    if (fd < 0) return fail(Errc::InvalidArgument, "AsyncQueue: the queue has no fd");
    asio::error_code ec;
    desc_.assign(fd, ec);  // the queue keeps owning the fd: released, never closed, by close()
    if (ec) return fail(Error::from_syscall("AsyncQueue: epoll_ctl", ec.value()));
    return {};
  }

  const asio::any_io_executor& executor() const noexcept { return ex_; }
  MsgQueue& queue() noexcept { return queue_; }
  bool closed() const noexcept { return closed_; }

  // ---- operations ------------------------------------------------------------------------------
  // Before start_*(), which may finish (and delete) the op at once: its id, and its handler's
  // cancellation slot bound to cancel_op(id) (a no-op once the op has finished).
  template <class Op>
  void prepare(Op& op) {
    op.id = ++next_id_;
    op.bind_cancellation([w = weak_from_this(), id = op.id](asio::cancellation_type t) {
      if (t == asio::cancellation_type::none) return;
      if (auto c = w.lock()) c->cancel_op(id, Finish::Cancel);
    });
  }

  void start_wait(WaitOp* op, Deadline deadline) {
    if (closed_)
      return op->finish(fail(Errc::InvalidArgument, "async_wait: closed queue"), Finish::Post);
    // Even a message kept in the backlog is handed over by service(), not here: Finish::Dispatch.
    track(op, deadline);
    waits_.push_back(op);
    post_pump();
  }

  void start_call(AsyncChannelCore& ch, Buffer& buf, Deadline deadline, CallOp* op) {
    if (closed_ || ch.core.get() != this)
      return op->finish(fail(Errc::InvalidArgument, "async_call: closed channel"), Finish::Post);
    if (ch.ended) return op->finish(fail(ch.end_error), Finish::Post);
    if (!buf.valid())
      return op->finish(fail(Errc::InvalidArgument, "async_call: invalid buffer"), Finish::Post);
    const std::uint32_t id = buf.id();
    if (ch.calls.count(id) != 0 || ch.abandoned.count(id) != 0)  // not ours, or a copy's id
      return op->finish(fail(Errc::InvalidArgument, "async_call: buffer already in flight"),
                        Finish::Post);
    // Back-pressure (Busy, WouldBlock) and a closed channel leave buf with the caller.
    if (Status s = ch.channel.send_request(std::move(buf)); !s)
      return op->finish(std::move(s), Finish::Post);
    op->channel = &ch;
    op->buf = &buf;
    op->buffer_id = id;
    ch.calls.emplace(id, op);
    ++calls_;
    track(op, deadline);
    post_pump();
  }

  // A cancellation slot fired, or cancel(): the operation ends as if its deadline had come.
  void cancel_op(std::uint64_t id, Finish how) {
    auto it = ops_.find(id);
    if (it == ops_.end()) return;  // completed already
    end_op(it->second, Error::make(Errc::TimedOut, kCancelledOp), how);
  }
  void cancel_all() {
    std::vector<std::uint64_t> ids;
    ids.reserve(ops_.size());
    for (const auto& [id, op] : ops_) ids.push_back(id);
    for (std::uint64_t id : ids) cancel_op(id, Finish::Post);
  }
  void cancel_channel(AsyncChannelCore& ch) {
    std::vector<std::uint64_t> ids;
    for (const auto& [bid, op] : ch.calls) ids.push_back(op->id);
    for (std::uint64_t id : ids) cancel_op(id, Finish::Post);
  }

  // Answers a request; an answer its caller cannot take yet (WouldBlock) is kept and retried.
  Status reply(Message&& msg) {
    if (closed_) return fail(Errc::InvalidArgument, "AsyncQueue::reply: closed queue");
    Status s = MsgQueue::reply(std::move(msg));
    // NOLINTNEXTLINE(bugprone-use-after-move): reply() leaves the answer in msg on WouldBlock.
    if (!s && s.error().code == Errc::WouldBlock && msg.buffer.valid()) {
      deferred_.push_back(std::move(msg));
      arm_retry();
      return {};
    }
    return s;
  }

  // ---- channels --------------------------------------------------------------------------------
  Status attach(AsyncChannelCore& ch) {
    if (closed_) return fail(Errc::InvalidArgument, "AsyncChannel: closed queue");
    if (channels_.count(ch.key) != 0)
      return fail(Errc::InvalidArgument, "AsyncChannel: key already in use on this queue");
    MBMQ_TRY(ch.channel.redirect(queue_, ch.key));
    channels_.emplace(ch.key, &ch);
    return {};
  }
  // The AsyncChannel goes: its calls end with `why`, its abandoned buffers are no longer awaited.
  void detach(AsyncChannelCore& ch, const Error& why) {
    end_channel(ch, why);
    auto it = channels_.find(ch.key);
    if (it != channels_.end() && it->second == &ch) channels_.erase(it);
  }

  void close() noexcept {
    if (closed_) return;
    closed_ = true;
    const Error e = Error::make(Errc::InvalidArgument, "closed");
    while (!waits_.empty()) end_op(waits_.front(), e, Finish::Post);
    for (auto& [key, ch] : channels_) end_channel(*ch, e);
    channels_.clear();
    backlog_.clear();   // requests among them are answered NoReply
    deferred_.clear();  // answers that could not go: their callers get NoReply
    timer_.cancel();
    retry_timer_.cancel();
    asio::error_code ec;
    desc_.cancel(ec);
    (void)desc_.release();  // the fd is the queue's
    // Closes every channel still redirected here: their peers see PeerClosed.
    queue_ = MsgQueue{};
  }

 private:
  static constexpr int kBatch = 128;  // messages per turn before other handlers get theirs

  bool wants_messages() const noexcept { return !waits_.empty() || calls_ != 0 || abandoned_ != 0; }

  void track(AsyncOp* op, Deadline deadline) {
    ops_.emplace(op->id, op);
    if (!deadline.is_never()) {
      op->timed = true;
      op->deadline_at = deadlines_.emplace(deadline.ns(), op);
      arm_timer();
    }
  }
  void untrack(AsyncOp* op) {
    ops_.erase(op->id);
    if (op->timed) deadlines_.erase(op->deadline_at);
    op->timed = false;
  }

  // Ends a pending operation with e (deadline, cancellation, close). A call's buffer stays lent
  // to the peer: its late reply is awaited and released (abandoned), unless the channel ended.
  void end_op(AsyncOp* op, const Error& e, Finish how) {
    untrack(op);
    if (op->type == AsyncOp::Type::Wait) {
      std::erase(waits_, op);
      static_cast<WaitOp*>(op)->finish(fail(e), how);
      return;
    }
    AsyncChannelCore& ch = *op->channel;
    ch.calls.erase(op->buffer_id);
    --calls_;
    if (!ch.ended && !closed_) {
      ch.abandoned.insert(op->buffer_id);
      ++abandoned_;
    }
    static_cast<CallOp*>(op)->finish(fail(e), how);
  }

  void end_channel(AsyncChannelCore& ch, const Error& e) {
    ch.ended = true;
    ch.end_error = e;
    abandoned_ -= ch.abandoned.size();
    ch.abandoned.clear();
    while (!ch.calls.empty()) end_op(ch.calls.begin()->second, e, Finish::Post);
  }

  // A message from the queue: to its call, or to the first async_wait, or kept for the next.
  void route(Message&& m) {
    auto it = channels_.find(m.key);
    if (it != channels_.end()) {
      AsyncChannelCore& ch = *it->second;
      if (m.kind == Kind::Reply) {
        const std::uint32_t id = m.buffer.id();
        if (auto c = ch.calls.find(id); c != ch.calls.end()) {
          CallOp* op = c->second;
          ch.calls.erase(c);
          --calls_;
          untrack(op);
          *op->buf = std::move(m.buffer);  // the reply is in the caller's buffer again
          op->finish(
              m.error == Errc::NoReply ? Status(fail(Errc::NoReply, "async_call")) : Status{},
              Finish::Dispatch);
          return;
        }
        if (ch.abandoned.erase(id) != 0) {  // the late reply of a call given up: the buffer
          --abandoned_;                     // goes back to the pool
          m.buffer.reset();
          return;
        }
        // A reply to a request sent with send_request() directly: the application's own.
      } else if (m.kind == Kind::PeerClosed) {
        // (PeerClosed) Every call in flight on the channel fails; its buffers went with it.
        end_channel(
            ch, Error::make(m.error,
                            m.error == Errc::Protocol && m.why[0] != '\0' ? m.why : "async_call"));
        channels_.erase(it);
        return;
      }
    }
    if (!waits_.empty()) {
      WaitOp* op = waits_.front();
      waits_.pop_front();
      untrack(op);
      op->finish(std::move(m), Finish::Dispatch);
      return;
    }
    backlog_.push_back(std::move(m));
  }

  // (1) and (2) above.
  void drain() {
    if (closed_ || !wants_messages()) return;
    arm_fd();
    for (int n = 0; wants_messages(); ++n) {
      if (n == kBatch) {
        post_pump();
        return;
      }
      Result<Message> r = queue_.wait(Deadline::immediate());
      if (!r) {
        if (r.error().code != Errc::TimedOut) fail_all(r.error());
        return;  // TimedOut: the fd is re-armed, and watched
      }
      route(std::move(*r));  // may run a handler, which may close us
      if (closed_) return;
    }
  }

  // Drain, then end what is overdue: an operation whose deadline passed has had its last look.
  void service() {
    // Messages kept earlier go first, in order, to the waits that came since.
    while (!backlog_.empty() && !waits_.empty() && !closed_) {
      WaitOp* op = waits_.front();
      waits_.pop_front();
      untrack(op);
      Message m = std::move(backlog_.front());
      backlog_.pop_front();
      op->finish(std::move(m), Finish::Dispatch);
    }
    drain();
    if (closed_) return;
    const std::int64_t now = monotonic_ns();
    while (!deadlines_.empty() && deadlines_.begin()->first <= now) {
      AsyncOp* op = deadlines_.begin()->second;
      end_op(op,
             Error::make(Errc::TimedOut,
                         op->type == AsyncOp::Type::Wait ? "async_wait" : "async_call"),
             Finish::Post);
    }
    arm_timer();
  }

  void fail_all(const Error& e) {
    while (!waits_.empty()) end_op(waits_.front(), e, Finish::Post);
    for (auto& [key, ch] : channels_)
      while (!ch->calls.empty()) end_op(ch->calls.begin()->second, e, Finish::Post);
  }

  void post_pump() {
    if (pump_posted_ || closed_) return;
    pump_posted_ = true;
    asio::post(ex_, [self = shared_from_this()] {
      self->pump_posted_ = false;
      if (!self->closed_) self->service();
    });
  }

  void arm_fd() {
    if (fd_armed_) return;
    fd_armed_ = true;
    desc_.async_wait(asio::posix::stream_descriptor::wait_read,
                     [self = shared_from_this()](const asio::error_code& ec) {
                       self->fd_armed_ = false;
                       if (ec == asio::error::operation_aborted || self->closed_) return;
                       self->service();
                     });
  }

  // One timer for every deadline, set to the earliest; a later one is set when it fires.
  void arm_timer() {
    if (closed_ || deadlines_.empty()) return;
    const std::int64_t first = deadlines_.begin()->first;
    if (timer_armed_ && timer_at_ <= first) return;
    timer_armed_ = true;
    timer_at_ = first;
    const std::uint64_t gen = ++timer_gen_;
    using Clock = std::chrono::steady_clock;  // CLOCK_MONOTONIC, the clock of Deadline
    timer_.expires_at(Clock::time_point(
        std::chrono::duration_cast<Clock::duration>(std::chrono::nanoseconds(first))));
    timer_.async_wait([self = shared_from_this(), gen](const asio::error_code&) {
      if (gen != self->timer_gen_ || self->closed_) return;  // replaced by an earlier deadline
      self->timer_armed_ = false;
      self->service();
    });
  }

  void arm_retry() {
    if (retry_armed_ || closed_) return;
    retry_armed_ = true;
    retry_timer_.expires_after(std::chrono::milliseconds(1));
    retry_timer_.async_wait([self = shared_from_this()](const asio::error_code& ec) {
      self->retry_armed_ = false;
      if (ec || self->closed_) return;
      std::erase_if(self->deferred_, [](Message& m) {
        Status s = MsgQueue::reply(std::move(m));
        // NOLINTNEXTLINE(bugprone-use-after-move): kept in m on WouldBlock
        return s || s.error().code != Errc::WouldBlock || !m.buffer.valid();
      });
      if (!self->deferred_.empty()) self->arm_retry();
    });
  }

  asio::any_io_executor ex_;
  MsgQueue queue_;
  asio::posix::stream_descriptor desc_;
  asio::steady_timer timer_;
  asio::steady_timer retry_timer_;
  bool closed_ = false;
  bool fd_armed_ = false;     // a wait on the fd is pending
  bool pump_posted_ = false;  // a service() is posted
  bool timer_armed_ = false;
  bool retry_armed_ = false;
  std::int64_t timer_at_ = 0;
  std::uint64_t timer_gen_ = 0;
  std::uint64_t next_id_ = 0;
  std::unordered_map<std::uint64_t, AsyncOp*> ops_;  // every pending operation, by id
  std::multimap<std::int64_t, AsyncOp*> deadlines_;  // the timed ones, by deadline
  std::deque<WaitOp*> waits_;                        // async_waits, first come first served
  std::deque<Message> backlog_;                      // taken with no async_wait pending
  std::vector<Message> deferred_;                    // answers held back by back-pressure
  std::unordered_map<std::uint64_t, AsyncChannelCore*> channels_;  // AsyncChannels, by key
  std::size_t calls_ = 0;                                          // calls in flight, all channels
  std::size_t abandoned_ = 0;  // late replies awaited, all channels
};

// Completes `handler` with `r` through a post: on the handler's associated executor, else on
// `ex` (the queue's, kept after close), else on asio's system executor (a default-constructed
// object that never had one).
template <class Handler, class R>
void post_failure(Handler&& handler, const asio::any_io_executor& ex, R r) {
  if (ex) {
    auto target = asio::get_associated_executor(handler, ex);
    asio::post(target, [h = std::forward<Handler>(handler), r = std::move(r)]() mutable {
      std::move(h)(std::move(r));
    });
  } else {
    auto target = asio::get_associated_executor(handler);
    asio::post(target, [h = std::forward<Handler>(handler), r = std::move(r)]() mutable {
      std::move(h)(std::move(r));
    });
  }
}

}  // namespace detail

class AsyncChannel;

// A MsgQueue served on an asio executor. Move-only; see the top of this file.
class AsyncQueue {
 public:
  using executor_type = asio::any_io_executor;

  AsyncQueue() noexcept = default;
  AsyncQueue(AsyncQueue&&) noexcept = default;
  AsyncQueue& operator=(AsyncQueue&& o) noexcept {
    if (this != &o) {
      close();
      core_ = std::move(o.core_);
      ex_ = o.ex_;
    }
    return *this;
  }
  AsyncQueue(const AsyncQueue&) = delete;
  AsyncQueue& operator=(const AsyncQueue&) = delete;
  ~AsyncQueue() { close(); }

  // A new MsgQueue with `policy`, served on `ex`. The policy is the queue's spin before it reports
  // "nothing" to the loop: keep the default (or Sleep), a loop must not spin.
  static Result<AsyncQueue> create(const executor_type& ex, WaitPolicy policy = {}) {
    return from(ex, MBMQ_TRY(MsgQueue::create(policy)));
  }
  // Serves an existing queue (with its channels and listeners) on `ex`; the AsyncQueue owns it.
  // Errc::InvalidArgument for an invalid queue; Errc::System if the fd cannot be watched.
  static Result<AsyncQueue> from(const executor_type& ex, MsgQueue&& queue) {
    auto core = std::make_shared<detail::AsyncCore>(ex, std::move(queue));
    MBMQ_TRY(core->open());
    AsyncQueue q;
    q.core_ = std::move(core);
    q.ex_ = ex;
    return q;
  }

  // The queue: redirect channels and listeners to it, adopt() channels. Do not wait() on it
  // directly while the AsyncQueue serves it (the message would bypass the routing).
  MsgQueue& queue() noexcept { return core_->queue(); }
  // The executor it was created with; it stays after close(), so that operations started on a
  // closed queue complete there (with InvalidArgument) rather than on asio's system executor.
  executor_type get_executor() const noexcept { return ex_; }
  bool valid() const noexcept { return core_ != nullptr && !core_->closed(); }

  // The next message for the application: requests, one-way messages, connections of a
  // redirected Listener, PeerClosed of channels that are not AsyncChannels, and replies to
  // send_request() calls of its own. Replies to async_call and their channels' PeerClosed go to
  // the calls instead. Completion: void(Result<Message>): Errc::TimedOut at the deadline or when
  // cancelled (cancelled(error)), Errc::InvalidArgument when the queue is closed. Waits are
  // served first come, first served.
  template <class Token>
  auto async_wait(Deadline deadline, Token&& token) {
    return asio::async_initiate<Token, void(Result<Message>)>(
        [](auto handler, std::shared_ptr<detail::AsyncCore> core, executor_type ex, Deadline d) {
          using H = std::decay_t<decltype(handler)>;
          if (!core) {
            return detail::post_failure(
                std::move(handler), ex,
                Result<Message>(fail(Errc::InvalidArgument, "async_wait: no queue")));
          }
          auto* op = new detail::OpImpl<Result<Message>, H>(detail::AsyncOp::Type::Wait,
                                                            std::move(handler), core->executor());
          core->prepare(*op);
          core->start_wait(op, d);
        },
        token, core_, ex_, deadline);
  }
  template <class Token>
  auto async_wait(Token&& token) {
    return async_wait(Deadline::never(), std::forward<Token>(token));
  }

  // Answers a request (MsgQueue::reply). An answer whose caller cannot take it yet (its control
  // socket is full) is kept and retried every millisecond: success. Other errors concern that one
  // caller (PeerClosed: it is gone; Protocol) or a wrong call (InvalidArgument); a server loop
  // goes on after them.
  Status reply(Message&& msg) {
    if (!core_) return fail(Errc::InvalidArgument, "AsyncQueue::reply: no queue");
    return core_->reply(std::move(msg));
  }

  // Ends every pending async_wait and async_call of this queue with Errc::TimedOut, "cancelled".
  void cancel() {
    if (core_) core_->cancel_all();
  }
  // Ends every pending operation with Errc::InvalidArgument ("closed") and closes the queue and
  // every channel redirected to it. The destructor does this.
  void close() noexcept {
    if (core_) core_->close();
    core_.reset();
  }

 private:
  friend class AsyncChannel;
  std::shared_ptr<detail::AsyncCore> core_;
  executor_type ex_;  // kept by close(): see get_executor()
};

// A Channel redirected to an AsyncQueue, for async_call(): any number of calls in flight on the
// one channel (up to its buffers and max_in_flight), each reply routed back to its own call by
// the buffer it came in (Buffer::id()). Every request on the channel must go through async_call.
// Requests and one-way messages the peer sends on it reach the queue's async_wait, with the key.
// Move-only; see the top of this file.
class AsyncChannel {
 public:
  AsyncChannel() noexcept = default;
  AsyncChannel(AsyncChannel&&) noexcept = default;
  AsyncChannel& operator=(AsyncChannel&& o) noexcept {
    if (this != &o) {
      close();
      core_ = std::move(o.core_);
      ex_ = o.ex_;
    }
    return *this;
  }
  AsyncChannel(const AsyncChannel&) = delete;
  AsyncChannel& operator=(const AsyncChannel&) = delete;
  ~AsyncChannel() { close(); }

  // Takes `channel` and redirects it to `queue` with `key`, which no other AsyncChannel of that
  // queue may use (nor, to be told apart, any other channel redirected there). Errors:
  // InvalidArgument (a closed queue or channel, a key in use), those of Channel::redirect. On
  // error the channel is closed. A remote end (ucx://, mbmq/channel.h) is served too: its replies
  // carry their request's Buffer::id().
  static Result<AsyncChannel> create(AsyncQueue& queue, Channel&& channel, std::uint64_t key) {
    if (!queue.valid()) {
      channel.close();  // as on any error here
      return fail(Errc::InvalidArgument, "AsyncChannel: invalid queue");
    }
    auto ch = std::make_shared<detail::AsyncChannelCore>();
    ch->channel = std::move(channel);
    ch->key = key;
    ch->core = queue.core_;
    MBMQ_TRY(ch->core->attach(*ch));
    AsyncChannel c;
    c.core_ = std::move(ch);
    c.ex_ = queue.ex_;
    return c;
  }

  // A buffer for a request (Channel::buffer).
  Result<Buffer> buffer(std::size_t size) {
    if (!core_) return fail(Errc::InvalidArgument, "AsyncChannel::buffer: no channel");
    return core_->channel.buffer(size);
  }
  Channel& channel() noexcept { return core_->channel; }
  std::uint64_t key() const noexcept { return core_->key; }
  bool valid() const noexcept { return core_ != nullptr && !core_->ended; }
  // Calls in flight; late replies of calls given up that are still awaited.
  std::size_t in_flight() const noexcept { return core_ ? core_->calls.size() : 0; }
  std::size_t abandoned() const noexcept { return core_ ? core_->abandoned.size() : 0; }

  // Sends `buf` as a request now and completes when its reply is back in `buf` (as
  // Channel::call). `buf` must stay alive, at its address and untouched, until then (as asio's
  // buffers for async_read; mind a std::vector<Buffer> that grows). Completion: void(Status):
  //   success          the reply is in buf
  //   NoReply          the server dropped the request; buf is ours again
  //   TimedOut         at the deadline, or cancelled (cancelled(error)): buf is left invalid; its
  //                    buffer comes back to the pool when the late reply arrives
  //   PeerClosed, Protocol  the channel ended: buf is left invalid if it had been sent (the
  //                    buffer went with it), else still the caller's; every later call fails
  //                    the same way at once
  //   Busy, WouldBlock back-pressure: nothing sent, buf is still the caller's; retry later
  //   InvalidArgument  the channel or its queue was closed (buf invalid if it had been sent), or
  //                    buf is invalid or not a buffer of this channel
  template <class Token>
  auto async_call(Buffer& buf, Deadline deadline, Token&& token) {
    return asio::async_initiate<Token, void(Status)>(
        [](auto handler, std::shared_ptr<detail::AsyncChannelCore> ch, asio::any_io_executor ex,
           Buffer* b, Deadline d) {
          using H = std::decay_t<decltype(handler)>;
          if (!ch) {
            return detail::post_failure(
                std::move(handler), ex,
                Status(fail(Errc::InvalidArgument, "async_call: no channel")));
          }
          auto* op = new detail::OpImpl<Status, H>(detail::AsyncOp::Type::Call, std::move(handler),
                                                   ch->core->executor());
          ch->core->prepare(*op);
          ch->core->start_call(*ch, *b, d, op);
        },
        token, core_, ex_, &buf, deadline);
  }
  template <class Token>
  auto async_call(Buffer& buf, Token&& token) {
    return async_call(buf, Deadline::never(), std::forward<Token>(token));
  }

  // Ends every call in flight with Errc::TimedOut, "cancelled" (their buffers come back with the
  // late replies).
  void cancel() {
    if (core_ && !core_->core->closed()) core_->core->cancel_channel(*core_);
  }
  // Ends every call in flight with Errc::InvalidArgument ("closed") and closes the channel (its
  // lent buffers come back to this end). The destructor does this.
  void close() noexcept {
    if (!core_) return;
    core_->core->detach(*core_, Error::make(Errc::InvalidArgument, "closed"));
    core_->channel.close();
    core_.reset();
  }

 private:
  std::shared_ptr<detail::AsyncChannelCore> core_;
  asio::any_io_executor ex_;  // the queue's, kept by close()
};

}  // namespace mbmq
