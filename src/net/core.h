// net/core.h: the internals of mbmq::net (include/mbmq/net.h): the wire header, WorkerCore (a UCX
// worker behind a mutex), ChannelCore (one UCX endpoint) and ListenCore. docs/design/net.md has
// the wire format and the handshake (N1)-(N4).
//
// Locking: every UCX call on a worker, and every callback UCX makes (they run inside
// ucp_worker_progress), happens with WorkerCore::mu held. Callbacks therefore find channels
// through WorkerCore::eps (raw pointers, registered and unregistered under mu) and never drop the
// last strong reference to a ChannelCore (its destructor takes mu).
#pragma once

#include <ucp/api/ucp.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstdint>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <vector>

#include "mbmq/net.h"
#include "net/ucx.h"
#include "os/mutex.h"

namespace mbmq::net::detail {

// ---- wire (docs/design/net.md, "Wire format") ----
inline constexpr unsigned kAmId = 0x6d;
inline constexpr std::uint32_t kMagic = 0x716d626d;
// 2: flow control (credits, kind 8); a version-1 hello is answered HelloAck{kBadVersion} (N3).
inline constexpr std::uint8_t kVersion = 2;
inline constexpr std::size_t kMaxServiceName = 255;  // a hello's name: 1-255 bytes
enum class WireKind : std::uint8_t {
  Hello = 1,
  HelloAck = 2,
  Request = 3,
  Reply = 4,
  Message = 5,
  Bye = 6,
  Heartbeat = 7,
  Credit = 8,
};
enum HelloStatus : std::uint16_t { kHelloOk = 0, kNoService = 1, kBadVersion = 2 };
enum ReplyStatus : std::uint16_t { kReplyOk = 0, kReplyNone = 1 };
struct WireHeader {
  std::uint32_t magic;
  std::uint8_t version;
  std::uint8_t kind;
  std::uint16_t status;
  std::uint32_t seq;
  std::uint32_t limit;
};
static_assert(sizeof(WireHeader) == 16 && std::is_standard_layout_v<WireHeader>);
// What a receiver grants its peer (docs/design/net.md, "Flow control"): the payload of a HelloAck,
// and the first 8 bytes of a Hello's (the service name follows).
struct Grant {
  std::uint32_t messages;  // Requests and Messages the peer may have unreturned at once (>= 1)
  std::uint32_t bytes;     // their payload bytes (>= 1); one message alone may exceed it
};
static_assert(sizeof(Grant) == 8 && std::is_standard_layout_v<Grant>);
inline constexpr std::size_t kMinHello = sizeof(Grant) + 1;
inline constexpr std::size_t kMaxHello = sizeof(Grant) + kMaxServiceName;
// A payload that takes no place in a channel's inbox (ChannelCore::inbox_) before it is received.
inline constexpr std::uint64_t kNoSlot = ~std::uint64_t{0};
// A hello's payload: the grant, then the service name.
inline std::vector<std::byte> hello_payload(Grant grant, std::string_view service) {
  std::vector<std::byte> p(sizeof grant + service.size());
  std::memcpy(p.data(), &grant, sizeof grant);
  std::memcpy(p.data() + sizeof grant, service.data(), service.size());
  return p;
}

class ChannelCore;
class ListenCore;
class NetSource;
// (Q3) Pump threads started and not yet ended in this process.
int pumps_running() noexcept;
// (Q1) For tests: the start of the net vector a queue-delivered remote message's Buffer is over
// (nullptr if it is not one): the same as Buffer::data() when nothing was copied.
const std::byte* queued_vector(const mbmq::Buffer& b) noexcept;

// A send or a receive handed to UCX whose callback has not come yet (net/channel.cc's SendOp and
// RecvOp, which own its payload vector): listed by its worker (WorkerCore::ops) until then.
struct PendingOp {
  PendingOp() = default;
  PendingOp(const PendingOp&) = delete;
  PendingOp& operator=(const PendingOp&) = delete;
  virtual ~PendingOp() = default;
  PendingOp* prev = nullptr;  // WorkerCore::ops, under its mu
  PendingOp* next = nullptr;
  // A rendezvous receive (RecvOp) on this endpoint: ChannelCore::rx_in_flight_locked().
  ucp_ep_h recv_ep = nullptr;
  // (P1) UCX may call an op's callback inside the very call that posts it (ucp_am_recv_data_nbx
  // on an endpoint being purged: the peer gone) and still return the request. Until `posted`,
  // the callback only records that and its status; the poster finishes the op, once.
  bool posted = false;
  bool done_inline = false;
  ucs_status_t inline_status = UCS_OK;
  void* inline_request = nullptr;  // the callback's request (freed by the poster, once)
};

// WorkerCore's lock: a mutex that knows whether a thread is waiting for it. The worker's
// progress loop stops early for such a thread, and hands the lock to it (WorkerCore::
// progress_locked, hand_over): a std::mutex released and retaken at once by a thread in a loop
// is mostly retaken by that thread (measured: a listener's thread progressing a 64 MiB transfer
// took it back 6 times in a row, one 1-4 ms progress step each, while a sibling channel's
// thread waited 21 ms for it).
class MBMQ_CAPABILITY("mutex") WorkerMutex {
 public:
  // t_held_ counts before the lock is taken and after it is let go: a signal between the two
  // steps finds it counted (the exit handler then leaves the workers alone), never the reverse.
  void lock() MBMQ_ACQUIRE() {
    ++t_held_;
    if (!mu_.try_lock()) {
      waiting_.fetch_add(1, std::memory_order_relaxed);
      mu_.lock();
      waiting_.fetch_sub(1, std::memory_order_relaxed);
    }
    // Written by the holder only; seq_cst against hand_over()'s (handing_, then acquired_).
    acquired_.store(acquired_.load(std::memory_order_relaxed) + 1);
    if (handing_.load() != 0) wake_handing();
  }
  void unlock() MBMQ_RELEASE() {
    mu_.unlock();
    --t_held_;
  }
  // How many worker locks the calling thread holds: the exit handler, which may run on a thread
  // a signal interrupted inside a progress, must not take one (net/keeper.cc, K7).
  static int held_by_this_thread() noexcept { return t_held_; }
  // Threads blocked in lock() (a hint: it may change at once).
  bool contended() const noexcept { return waiting_.load(std::memory_order_relaxed) != 0; }
  // Called unlocked: if a thread is blocked in lock(), sleeps until some thread has taken the
  // lock since (at most 2 ms: a safety net). Sleeping, not yielding in a loop: on two busy vCPUs
  // a yielding thread kept the CPU that the woken waiter needed.
  void hand_over() noexcept;

 private:
  void wake_handing() noexcept;
  std::mutex mu_;
  std::atomic<int> waiting_{0};
  std::atomic<std::uint32_t> acquired_{0};  // a futex word: bumped by each lock()
  std::atomic<int> handing_{0};             // threads inside hand_over()
  static inline thread_local int t_held_ = 0;
};

// (D1) Whether mbmq::net's allocating thread runs (net/keeper.cc; a forked child has none).
bool allocator_running() noexcept;
// Tests: how many keeper passes touched UCX so far (none once exit began: net/ucx.h, exiting()).
std::uint64_t keeper_passes_for_test() noexcept;
// Tests: the closes (K4) and lingering channels (K5) the keeper holds now (each may hold a worker).
std::size_t keeper_holds_for_test() noexcept;

// Payload vectors done with, kept for a worker's next received payloads: a fresh 1 MiB vector
// costs 256 page faults and its zeroing on this VM (a fresh 64 MiB one 66-100 ms), more than the
// transfer. Given: a sent one-way message's or reply's vector once UCX has read it, a call's old
// buffer, a net::Buffer above kMin when destroyed (a received message the application dropped).
// kMin is 32 KiB: 64 KiB vectors, once left to malloc ("already mapped"), were not: a receiver of
// a 64 KiB one-way stream took 1.1 page faults and 0.03 brk() per message (glibc trimmed the heap
// and grew it again), half its payloads landing in fresh pages (counted in mbmq-net-bench).
// kMaxVectors (256) holds the default grant's worth of 64 KiB payloads: a receiver behind its
// sender has up to that many in its inbox, and with room for 16 half its payloads missed.
// Taken as the target of a received payload, which overwrites all of it (so no channel's bytes
// reach another's application), or by buffer(), which zeroes it; of at least half its capacity
// (so a small message in an inbox holds at most twice its bytes).
// Bound: kMaxVectors vectors of kMaxBytes together, or one vector of any size (up to the largest
// payload its channels accept); smaller ones make room for a larger one. A kept vector too large
// for the takes that find nothing (a 64 MiB message's, say, when the worker's traffic has become
// 16 MiB payloads) is let go once those takes together asked for as many bytes as it holds: the
// fresh vectors it made them allocate then cost as much as making it again would (before, one
// 64 MiB vector kept every smaller payload's vector out of the spares for good: a 16 MiB one-way
// stream after a 64 MiB call ran at 1.7x raw UCX, fresh vectors each message;
// NetSpares.ALargeVectorNoLongerUsedMakesRoomForTheSizesInUse). A leaf lock: taken under
// the worker's mu, or with no lock held (a Buffer's destructor); never the other way round.
// (Before, kMaxVectors was 16, the default grant's worth of 1 MiB payloads; with room for 8, the
// vectors of a one-way 1 MiB stream, which come back in bursts, were partly freed and 6-29 % of
// the sender's buffer() calls and 6-26 % of the receiver's payloads got a fresh vector.) give()
// takes the lock once when there is room; take() stops at a vector of exactly n bytes.
class Spares {
 public:
  static constexpr std::size_t kMaxVectors = 256;
  static constexpr std::size_t kMaxBytes = std::size_t{16} << 20;
  // Vectors of at most this many bytes are not kept (see above).
  static constexpr std::size_t kMin = std::size_t{32} << 10;

  Spares() {
    v_.reserve(kMaxVectors);
    from_.reserve(kMaxVectors);
    missed_.reserve(kMaxVectors);
  }
  // Keeps v, letting smaller vectors go if the bound needs it, unless every kept one is at least
  // as large (then v is freed). Frees outside the lock; never allocates. `from`: the channel
  // (ChannelCore::id_) whose traffic its bytes are (0: none known).
  void give(std::vector<std::byte>&& v, std::uint64_t from = 0) noexcept;
  // A kept vector of capacity in [n, 2n], resized to n (zeroing only what grows), or an empty one;
  // one from channel `prefer` if there is one. *from: the channel its bytes came from.
  std::vector<std::byte> take(std::size_t n, std::uint64_t prefer = 0,
                              std::uint64_t* from = nullptr) noexcept;
  bool has_for(std::size_t n) const noexcept;

 private:
  static bool fits(std::size_t cap, std::size_t n) noexcept {
    return n > kMin && n <= cap && n >= cap / 2;
  }
  // give() when the bound is reached: makes room, or frees v.
  void give_evicting(std::vector<std::byte>&& v, std::uint64_t from) noexcept;
  mutable os::Mutex mu_;
  std::vector<std::vector<std::byte>> v_ MBMQ_GUARDED_BY(mu_);  // capacity kMaxVectors
  std::vector<std::uint64_t> from_ MBMQ_GUARDED_BY(mu_);        // v_[i]'s channel (give's from)
  // v_[i]: the bytes asked for by takes that found nothing and that it was too large for.
  std::vector<std::size_t> missed_ MBMQ_GUARDED_BY(mu_);
  // Removes v_[i] (and its tag and count) into `out`.
  void remove_locked(std::size_t i, std::vector<std::byte>& out) MBMQ_REQUIRES(mu_) {
    bytes_ -= v_[i].capacity();
    out = std::move(v_[i]);
    v_[i] = std::move(v_.back());
    v_.pop_back();
    from_[i] = from_.back();
    from_.pop_back();
    missed_[i] = missed_.back();
    missed_.pop_back();
  }
  std::size_t bytes_ MBMQ_GUARDED_BY(mu_) = 0;  // their capacities
};

class WorkerCore {
 public:
  static Result<std::shared_ptr<WorkerCore>> make(const Ucx* u);
  ~WorkerCore();
  WorkerCore(const WorkerCore&) = delete;
  WorkerCore& operator=(const WorkerCore&) = delete;

  // Progresses the worker until done() (called with mu held) is true: true; or until the
  // deadline: false. Spins per `policy`, then sleeps (unlocked).
  //
  // Several threads may wait on one worker (a listener's accepted channels share it). Only one
  // of them, the poller, sleeps on the worker's event fd; the others sleep on `gen`. Whoever
  // progresses the worker and gets events (W1) bumps `gen` and wakes the gen sleepers, who look
  // at what the events brought them, and (W2) if that thread is not the poller while the poller
  // sleeps, signals the event fd (ucp_worker_signal) when the events may have been the
  // poller's: progress_locked() below says when, and why no wake-up is lost. (W3) A thread that
  // leaves run_until while nobody polls and gen sleepers wait wakes one of them, which polls
  // next (one, not all: idle sleepers would churn). Without this, the events one thread took for
  // another left that one asleep on a drained fd until the 20 ms cap (two threads: accept() and
  // a call).
  //
  // `waiter` is what done() looks at: the ChannelCore or ListenCore whose state it reads (W2).
  template <class Done>
  Result<bool> run_until(Deadline deadline, WaitPolicy policy, const void* waiter, Done done);
  template <class Done>
  Result<bool> run_until_counted(Deadline deadline, WaitPolicy policy, const void* waiter,
                                 Done done);
  // Progresses the worker (bounded), then (W1) wakes the gen sleepers if events came and (W2)
  // signals a sleeping poller if they may have been its own:
  //
  // The poller P armed the event fd with mu held, after its own progress found nothing and its
  // done() was false, and set poller_asleep and poller_for (what its done() reads). Another
  // thread T progresses only with mu held, so either before P's arm (P's own done() check comes
  // after it and sees what T's events brought) or while P is asleep or waking. In the latter
  // case, per interleaving:
  //  (a) T's progress runs a callback that changes what P's done() reads (a message, a reply, a
  //      send completed, credit, a close, a listener's new or dropped connection): the callback
  //      calls news_locked(P's channel or listener), T signals, P wakes and sees it. These are
  //      the only places such state changes in a progress; a callback that cannot say whose
  //      state it changed passes nullptr (anyone's), and so does a poller with no key.
  //  (b) T's events were all for others: P's done() is still false, so waking P would only make
  //      it progress (nothing) and re-arm. What T took off the transports is gone; what T did
  //      not take is still there: T stops only when ucp_worker_progress returns 0 (nothing
  //      left), or after 64 steps with events each (a large rendezvous), and then T signals as
  //      before (`more`). Anything that arrives after T's last progress makes the event fd
  //      readable as it would have for P alone (TCP: the iface's epoll set; shared memory: the
  //      signal datagram, drained only by the next arm; UCX's async thread: ucp_worker_signal).
  //  (c) P has woken (poll returned) but not yet taken mu: poller_asleep is still set, so T may
  //      signal for (a); the signal is then read by P's next arm (UCS_ERR_BUSY: P progresses
  //      again), a spurious turn, as before. Once P holds mu, poller_waking stops T's signals.
  //  (d) State changed outside any progress (close() from another thread; a failure: the
  //      keeper's peer_timeout or handshake expiry, a send failing on another thread, a
  //      force-close's purge): that caller wakes the waiters itself (wake_waiters_locked; every
  //      failure goes through ChannelCore::fail_locked, which does).
  // The 20 ms caps of both sleeps stay as a safety net.
  //
  // The loop also stops (with `more`) as soon as a step brought news for `mine` (the caller's
  // channel or listener: it returns at once), news for another waiter (so that W1/W2 wake it
  // now, not after the loop), a thread waiting for mu (hand_over() below), or after 1 ms of
  // steps. On TCP one step of a large rendezvous moves megabytes (recv()/sendmsg() of up to
  // 4 MiB: 1-15 ms on this VM): 64 of them under the lock held every other channel of the worker
  // up for 20-30 ms.
  // Returns whether it had events (the caller then hands the lock over, if wanted, before it
  // takes it again: hand_over()); *stopped_early: it stopped before the transports ran dry (the
  // caller progresses again before it arms the event fd: arming a worker with work left was
  // never done before these stops, and UCX 1.13's tcp wireup to a vanished client then
  // asserted in 3 of 349 runs of Review19.ClientsGivingUpAtOnceInAnotherProcess...).
  bool progress_locked(const void* mine = nullptr, bool* stopped_early = nullptr) const
      MBMQ_REQUIRES(mu);
  // Called unlocked by a thread that progressed the worker and is about to take mu again: if a
  // thread waits for mu, lets it take mu first (WorkerMutex::hand_over).
  void hand_over() MBMQ_EXCLUDES(mu) { mu.hand_over(); }
  // (W2) Called by UCX's callbacks (inside progress_locked) when they change what a waiter on
  // `what` reads in its done(): a channel's inbox, reply, send, credit or state (`what`: that
  // ChannelCore), a listener's ready or dropped connections (the ListenCore); nullptr: unknown.
  void news_locked(const void* what) const MBMQ_REQUIRES(mu) {
    if (what == nullptr || poller_for == nullptr || what == poller_for) poller_news = true;
    if (what == nullptr || what == progress_for)
      progress_news = true;
    else
      others_news = true;
  }
  // (W2 (d)) State a waiter on `what` reads changed outside a progress: wakes the gen sleepers
  // and, if it may be waiting on `what`, the poller.
  void wake_waiters_locked(const void* what) const MBMQ_REQUIRES(mu);
  // In UCX's callbacks, which run inside progress_locked(): mu is held.
  void assert_held() const MBMQ_ASSERT_CAPABILITY(mu) {}

  const Ucx* const u;
  WorkerMutex mu;
  ucp_worker_h worker = nullptr;  // set in make(), then used under mu only
  int efd = -1;
  std::unordered_map<ucp_ep_h, ChannelCore*> eps MBMQ_GUARDED_BY(mu);
  // Payload vectors done with, for this worker's next received payloads (Spares). The large
  // net::Buffers of its channels point to it (weakly) and give their vector back when destroyed.
  const std::shared_ptr<Spares> spares = std::make_shared<Spares>();
  // A vector for a received payload of n bytes (which overwrites all of it): a spare, else fresh.
  std::vector<std::byte> take_spare(std::size_t n) const;
  // A rendezvous payload whose vector is not allocated yet (UCX keeps its descriptor: the AM
  // callback returned UCS_INPROGRESS). A fresh 64 MiB vector costs 50-130 ms of page faults and
  // zeroing on this VM: allocated inside the callback, under mu, it held up every other channel
  // of the worker (a listener's) for as long. start_deferred() allocates it unlocked, then
  // relocks and receives into it; a channel gone meanwhile (ch no longer the one at ep) has the
  // descriptor released instead (close_ep_locked releases a closed channel's own).
  //
  // Who (D1): from kAllocatorMin (4 MiB) on, mbmq::net's allocating thread
  // (allocate_deferred_later(), net/keeper.cc), posted by the callback: no application thread
  // pays for it, so no receive(), call() or send() deadline waits on a sibling's (or its own
  // channel's) page faults (a 5 ms receive() took 38-336 ms); once started, the receive's waiter
  // is woken (wake_waiters_locked). That thread takes one payload per worker in turn (a worker
  // receiving a stream of them does not starve the others). Below 4 MiB (at most ~1-4 ms of page
  // faults), and for every size if that thread cannot be had (no memory, no thread:
  // alloc_fallback): the channel's own thread if one waits on it (run_until with the channel as
  // its waiter), else whoever progresses next (any run_until, send(), close(), the keeper). (All
  // sizes on the one thread made a 1 MiB payload wait behind three other workers' 64 MiB ones:
  // 212-1175 ms, ReviewS6b.ASmallDeferredPayload...)
  struct Deferred {
    ChannelCore* ch;
    std::uint64_t id;  // ch's ChannelCore::id_: a new channel at a freed one's address is not it
    ucp_ep_h ep;
    WireHeader hdr;
    void* desc;
    std::size_t n;
    std::uint64_t slot;  // its place in ch's inbox (a one-way message or request), or kNoSlot
    bool allocator;      // (D1) the allocating thread's (posted to it), not an application thread's
  };
  std::deque<Deferred> deferred MBMQ_GUARDED_BY(mu);
  // Of `deferred`, those that are not the allocating thread's, read unlocked (recount_locked()).
  std::atomic<std::size_t> deferred_count{0};
  void recount_locked() MBMQ_REQUIRES(mu) {
    deferred_count.store(
        static_cast<std::size_t>(std::count_if(deferred.begin(), deferred.end(),
                                               [](const Deferred& d) { return !d.allocator; })),
        std::memory_order_relaxed);
  }
  // Sends and receives UCX has not called back for (PendingOp). ucp_worker_destroy() drops the
  // requests left without calling back (UCX 1.13: "object ... was not returned to mpool
  // ucp_requests"), so ~WorkerCore progresses the worker a little for them, then frees what is
  // left. Left, say: a force close (a failure: a Bye, the transport's error, peer_timeout)
  // completes its endpoint's sends, cancelled, only at a later progress; a channel destroyed at
  // once destroyed its worker before that, and each such send leaked its SendOp and payload (64 MiB
  // a round in ReviewNetSib.DeferredPayloadOfAClosedChannel..., whose peer never fetches it).
  PendingOp* ops MBMQ_GUARDED_BY(mu) = nullptr;
  void track_locked(PendingOp* op) MBMQ_REQUIRES(mu) {
    op->prev = nullptr;
    op->next = ops;
    if (ops != nullptr) ops->prev = op;
    ops = op;
  }
  void untrack_locked(PendingOp* op) MBMQ_REQUIRES(mu) {
    if (op->prev != nullptr)
      op->prev->next = op->next;
    else if (ops == op)
      ops = op->next;
    if (op->next != nullptr) op->next->prev = op->prev;
    op->prev = op->next = nullptr;
  }
  // Called without mu by a thread that progressed the worker: starts the deferred receives of
  // channel `mine` and, if `ownerless`, those of channels no thread waits on (waiting_on). None
  // at all: one relaxed load.
  void start_deferred(const void* mine, bool ownerless) MBMQ_EXCLUDES(mu) {
    if (deferred_count.load(std::memory_order_relaxed) != 0) start_deferred_slow(mine, ownerless);
  }
  // (D1) The allocating thread's turn at this worker: one of its deferred receives. True: more of
  // its own remain (the worker goes back in its queue).
  bool start_allocator_deferred() MBMQ_EXCLUDES(mu) {
    return start_deferred_slow(nullptr, false, true);
  }
  // Set by a callback that could not post to the allocating thread: this worker's deferred
  // receives are started by its own threads from then on (the fallback above).
  std::atomic<bool> alloc_fallback{false};
  // Ourselves, for the allocating thread (set by make()).
  std::weak_ptr<WorkerCore> self;
  // Whether start_deferred(mine, ownerless) would start one.
  bool takes_deferred_locked(const void* mine, bool ownerless) const MBMQ_REQUIRES(mu) {
    return std::any_of(deferred.begin(), deferred.end(), [&](const Deferred& e) {
      assert_held();
      return threads_take_locked(e, mine, ownerless);
    });
  }
  bool allocator_has_more_locked() const MBMQ_REQUIRES(mu) {
    return std::any_of(deferred.begin(), deferred.end(),
                       [](const Deferred& e) { return e.allocator; });
  }
  bool threads_take_locked(const Deferred& e, const void* mine, bool ownerless) const
      MBMQ_REQUIRES(mu) {
    return !e.allocator && (e.ch == mine || (ownerless && !waited_on_locked(e.ch)));
  }
  // What the threads inside run_until wait on (their `waiter`s), for the first 32 of them: no
  // allocation (tests count accept()'s). Beyond, a channel counts as nobody's (anyone starts
  // its deferred receives).
  std::array<const void*, 32> waiting_on MBMQ_GUARDED_BY(mu){};
  std::size_t n_waiting_on MBMQ_GUARDED_BY(mu) = 0;
  bool waited_on_locked(const void* what) const MBMQ_REQUIRES(mu) {
    return std::find(waiting_on.begin(), waiting_on.begin() + n_waiting_on, what) !=
           waiting_on.begin() + n_waiting_on;
  }
  int waiters MBMQ_GUARDED_BY(mu) = 0;  // threads inside run_until (they progress the worker)
  // (W1-W3) above. gen: bumped (under mu) after events, futex-waited on unlocked.
  mutable std::atomic<std::uint32_t> gen{0};
  mutable int gen_sleepers MBMQ_GUARDED_BY(mu) = 0;
  mutable bool poller_asleep MBMQ_GUARDED_BY(mu) = false;
  // The poller, between its wake-up and taking mu: its own progress is not a theft (W2).
  mutable bool poller_waking MBMQ_GUARDED_BY(mu) = false;
  // (W2) What the sleeping poller's done() reads (nullptr: not known, any news is its), and
  // whether the progress under way brought it news (news_locked).
  const void* poller_for MBMQ_GUARDED_BY(mu) = nullptr;
  mutable bool poller_news MBMQ_GUARDED_BY(mu) = false;
  // The progress under way: whose it is (progress_locked's `mine`), and whether a step brought
  // news for it, or for anyone else.
  mutable const void* progress_for MBMQ_GUARDED_BY(mu) = nullptr;
  mutable bool progress_news MBMQ_GUARDED_BY(mu) = false;
  mutable bool others_news MBMQ_GUARDED_BY(mu) = false;
  // (F7) Inside a UCX request callback (send_done, recv_done): a channel failed there is closed
  // only once ucp_worker_progress has returned (ChannelCore::fail_locked defers it; fails_due
  // says some are due; fail_due_locked() applies them). Force-closing an endpoint from the
  // completion callback of one of its own requests made UCX 1.13 abort at ucp_ep.c:437
  // (proto_reqs not empty): a held Bye released when the last payload's fetch completed, 6 of 6
  // (ReviewS6a.DestroyingAPairWithLargeTransfersInFlight...).
  mutable bool in_request_cb MBMQ_GUARDED_BY(mu) = false;
  mutable bool fails_due MBMQ_GUARDED_BY(mu) = false;

  // (Q1-Q6) Channels redirected to a MsgQueue (net/redirect.cc; docs/design/net.md, "Redirect to
  // a MsgQueue"). One source per queue: the queue asks it, not each channel, so a queue's cost
  // per look does not grow with the remote channels behind it.
  std::vector<std::shared_ptr<NetSource>> sources MBMQ_GUARDED_BY(mu);
  // (Q2) Redirected channels whose inbox or state changed since the last flush_taps_locked():
  // their capacity is reserved at redirect, so a callback never allocates here.
  mutable std::vector<ChannelCore*> tap_news MBMQ_GUARDED_BY(mu);
  // (Q4) A queue's take() released one-way messages: their credit goes back at the next flush.
  mutable std::atomic<bool> credit_due{false};
  // (Q3) Redirected channels; the pump thread runs while there are any.
  std::size_t redirected MBMQ_GUARDED_BY(mu) = 0;
  bool pump_running MBMQ_GUARDED_BY(mu) = false;
  // The pump's waiter key (W2): news of a redirected channel taken by another thread's progress
  // is flushed by that thread, so the pump is signalled only for its own (its end: redirected
  // drops to 0), not for every event of the worker's other channels (a keyless pump cost them a
  // ucp_worker_signal per event: review rev-redirect).
  const char pump_key = 0;
  // The pump thread (joinable): it holds no reference to us, so the worker is destroyed by its
  // last owner, synchronously; ~WorkerCore stops and joins the pump first. (A pump holding the
  // last reference destroyed the worker on its own thread after its owners were gone, racing
  // UCX's exit-time cleanup when the program exited right after: "vfs_obj.c:365 Assertion", CI
  // 2026-12-02.) A pump that ended is joined by the next redirect that starts one.
  std::thread pump_thread MBMQ_GUARDED_BY(mu);
  bool pump_stop MBMQ_GUARDED_BY(mu) = false;
  // (Q6) The worker's listener, while it is redirected to a queue (Listener::redirect): each
  // flush delivers its acceptable connections (ListenCore::deliver_locked); the pump frees its
  // failed ones. Counted in `redirected`. Cleared by ~ListenCore.
  ListenCore* listen_tap MBMQ_GUARDED_BY(mu) = nullptr;
  // (Q2) The worker's source for the queue `queue_id` (a QueueCore*), or nullptr.
  std::shared_ptr<NetSource> source_of_locked(const void* queue_id) const MBMQ_REQUIRES(mu);
  // (Q3) Starts the pump thread if it does not run: false if no thread can be had. A pump that
  // ended is moved to `ended`, for the caller to join once mu is released.
  bool start_pump_locked(std::thread& ended) MBMQ_REQUIRES(mu);
  // (Q2-Q4) Moves what tap_news' channels received (and their ends) to their sources, gives back
  // the credit the queues' takes released, and wakes the queues. At the end of progress_locked().
  void flush_taps_locked() const MBMQ_REQUIRES(mu);
  void fail_due_locked() const MBMQ_REQUIRES(mu);

 private:
  explicit WorkerCore(const Ucx* ucx) : u(ucx) {}
  // allocator: one of the allocating thread's entries, returning whether more remain; else
  // (application threads) those of `mine` and, if `ownerless`, of channels nobody waits on.
  bool start_deferred_slow(const void* mine, bool ownerless, bool allocator = false)
      MBMQ_EXCLUDES(mu);
  Status wait_events(Deadline deadline) const;
  // A gen sleeper's sleep: until gen moves from `seen`, the deadline or the 20 ms cap.
  void wait_gen(std::uint32_t seen, Deadline deadline) const;
  // count: INT_MAX after events (W1), 1 to hand the poller's role on (W3).
  void wake_gen_locked(int count = INT_MAX) const MBMQ_REQUIRES(mu);
};

// Declared before a LockGuard on w.mu under which the worker is progressed: starts what that
// progress deferred (WorkerCore::Deferred) once the lock is released (destroyed after the guard).
class StartDeferredAfter {
 public:
  // Those of channel `mine`, and if `ownerless` those of channels nobody waits on.
  StartDeferredAfter(WorkerCore& w, const void* mine, bool ownerless)
      : w_(w), mine_(mine), ownerless_(ownerless) {}
  ~StartDeferredAfter() { w_.start_deferred(mine_, ownerless_); }
  StartDeferredAfter(const StartDeferredAfter&) = delete;
  StartDeferredAfter& operator=(const StartDeferredAfter&) = delete;

 private:
  WorkerCore& w_;
  const void* const mine_;
  const bool ownerless_;
};

// Held by a received request's Buffer: destroyed unanswered, it answers NoReply.
struct ReplyToken {
  std::weak_ptr<ChannelCore> ch;
  std::uint32_t seq = 0;
  std::uint32_t credit_bytes = 0;  // the request's size: its reply gives that credit back
  // Set by the first reply (exchange): net::Buffer copies share the token, and a second reply
  // would give the request's credit back twice.
  std::atomic<bool> answered{false};
  ~ReplyToken();
  ReplyToken() = default;
  ReplyToken(const ReplyToken&) = delete;
  ReplyToken& operator=(const ReplyToken&) = delete;
};

enum class State : std::uint8_t { Connecting, Pending, Open, Closed };

class ChannelCore : public std::enable_shared_from_this<ChannelCore> {
 public:
  ChannelCore(std::shared_ptr<WorkerCore> w, State s) : w_(std::move(w)), state_(s) {}
  ~ChannelCore();
  ChannelCore(const ChannelCore&) = delete;
  ChannelCore& operator=(const ChannelCore&) = delete;

  // net::Channel::close() was called on the handle: valid() is false and its calls return
  // InvalidArgument. The handle keeps the core until it is destroyed or assigned (as a local
  // Channel keeps its end): another thread may be inside a call on it (review rev-q6: close()
  // resetting the handle's pointer freed the core under a concurrent redirect()).
  std::atomic<bool> handle_closed{false};

  // Client side: creates the endpoint, sends Hello and waits for HelloAck (N1, N4).
  static Result<std::shared_ptr<ChannelCore>> connect(
      const Ucx* u, const std::string& host, std::uint16_t port, const std::string& service,
      Deadline deadline, WaitPolicy policy, std::chrono::milliseconds peer_timeout, Grant grant);
  // Server side: the endpoint for an accepted connection request (N2).
  Status accept_locked(ucp_conn_request_h req, ListenCore* listener) MBMQ_REQUIRES(w_->mu);

  Result<Buffer> buffer(std::size_t size);
  // (F2) Until the peer's grant has room for one message of n bytes, the channel ends
  // (PeerClosed, Protocol) or `deadline` passes (TimedOut): mbmq::Channel::buffer(size, deadline)
  // on a remote end (net/remote.cc), the back-pressure a local pool gives. Takes no credit: a
  // send from another thread may use the room first (the send then says WouldBlock).
  Status wait_for_credit(std::size_t n, Deadline deadline);
  // How many messages of n bytes the peer's grant lets out now (0 once the channel has ended).
  std::size_t sendable(std::size_t n) const noexcept;
  // The error receive() would give at once (forked child, redirected, the end delivered), or
  // none: mbmq::Channel::receive_in_place() on a remote end.
  Status receive_check();
  Status call(Buffer& buf, Deadline deadline);
  // Out of credit: WouldBlock at once (Fail), or wait until the deadline (Wait: TimedOut).
  enum class NoCredit : std::uint8_t { Fail, Wait };
  // One-way (WireKind::Message), or a request whose reply comes through receive() (WireKind::
  // Request: net::Channel::send_request).
  Status send(Buffer&& buf, Deadline deadline, NoCredit how, WireKind kind = WireKind::Message);
  // (F8) A send that found the window full: its credit taken; the completion count then, and how
  // many completions put it within the window (the sends ahead of it).
  struct WindowWait {
    bool reserved = false;
    std::uint64_t seen = 0;
    std::uint64_t ahead = 0;
  };
  Status send_after_window(Buffer&& buf, Deadline deadline, WireKind kind, WindowWait wait);
  // Lists a request (R1), takes the credit unless taken already (F2), sends; buf given up (or,
  // a request's listing failing, still the caller's).
  Status send_now_locked(Buffer&& buf, WireKind kind, bool credit_taken = false)
      MBMQ_REQUIRES(w_->mu);
  // The credit of a message not sent after all, back. Saturating: a peer that gave back credit
  // for a message still waiting for the window (it never received it: a protocol breach
  // take_back_locked cannot tell while the message is counted out) must not make the counts
  // wrap (review rev-f8c).
  void give_back_reserved_locked(std::size_t n) MBMQ_REQUIRES(w_->mu) {
    out_msgs_ -= std::min<std::uint64_t>(out_msgs_, 1);
    out_bytes_ -= std::min<std::uint64_t>(out_bytes_, n);
  }
  Result<Message> receive(Deadline deadline);
  // out non-empty, its old messages dropped by the caller (their reply tokens take the lock).
  Result<std::size_t> receive_batch(std::span<Message> out, Deadline deadline);
  // Answers request `seq`, giving back its credit (1 message, `credit_bytes`, the request's size).
  Status reply(std::uint32_t seq, Buffer&& buf, ReplyStatus status, std::uint32_t credit_bytes);
  void close() noexcept;
  bool open() noexcept;
  void set_policy(WaitPolicy p) noexcept { policy_ = p; }
  // (Q2) net::Channel::redirect / net::adopt (net/redirect.cc). adopt: the queue keeps this
  // channel alive until it has delivered its end.
  Status redirect(const std::shared_ptr<mbmq::detail::QueueCore>& queue, std::uint64_t key,
                  bool adopt);
  // (Q2) Moves what the inbox holds to the source, then the end once closed; (Q5).
  void tap_flush_locked() MBMQ_REQUIRES(w_->mu);
  // (Q4) One-way messages the queue delivered: their credit goes back (batched, F5).
  void tap_credit_locked(std::uint64_t msgs, std::uint64_t bytes, bool drained)
      MBMQ_REQUIRES(w_->mu);
  // For the thread-safety analysis: w_->mu is held (the caller holds it under another name).
  void assert_held() const MBMQ_ASSERT_CAPABILITY(w_->mu) {}
  // The keeper's tick (net/keeper.cc): progresses the worker if no thread waits on it, ends the
  // channel after peer_timeout of silence, and sends a heartbeat after peer_timeout / 4 of ours.
  void keep_alive_tick(std::int64_t now_ns, std::int64_t timeout_ns, std::int64_t heartbeat_ns);
  // The peer's peer_timeout, from its hello (0: it watches nothing, or an older peer).
  std::chrono::milliseconds peer_timeout() noexcept;
  // The keeper's tick for a listener's pending connection: dropped after handshake_timeout with
  // no hello, whether or not anyone calls Listener::accept().
  void handshake_tick(std::int64_t now_ns, std::int64_t timeout_ns);
  // (K5) The keeper's tick for a channel close() left lingering (its sends not all fetched by the
  // peer within close()'s 100 ms; its Bye sent behind them): progresses the worker; once they
  // completed, or the channel failed, or kLingerMax passed, closes the endpoint. True: done.
  bool linger_tick(std::int64_t now_ns);

  // Callbacks (worker mu held).
  // True: a rendezvous payload left to WorkerCore::start_deferred() (the callback returns
  // UCS_INPROGRESS: UCX keeps the descriptor).
  bool on_am_locked(const WireHeader& h, void* data, std::size_t length,
                    const ucp_am_recv_param_t* param) MBMQ_REQUIRES(w_->mu);
  // Receives rendezvous payload `desc` (n bytes) into `bytes` (n bytes). True: received at once
  // (delivered already, outside any progress if not called from a callback). `slot`: its place
  // in the inbox, kept since its header arrived (or kNoSlot).
  bool start_recv_locked(const WireHeader& h, void* desc, std::vector<std::byte>&& bytes,
                         std::size_t n, std::uint64_t slot) MBMQ_REQUIRES(w_->mu);
  void on_recv_done_locked(const WireHeader& h, std::vector<std::byte>&& bytes, std::size_t n,
                           std::uint64_t slot = kNoSlot) MBMQ_REQUIRES(w_->mu);
  // A rendezvous payload received (or given up): a Bye that came behind the last one closes now.
  void rx_finished_locked() MBMQ_REQUIRES(w_->mu);
  // (N3) A header whose version is not ours (magic checked): a pending channel's Hello is answered
  // HelloAck{kBadVersion} and refused; a connecting channel's HelloAck{kBadVersion} ends connect()
  // with Refused; anything else closes the channel (Protocol).
  void on_other_version_locked(const WireHeader& h) MBMQ_REQUIRES(w_->mu);
  void on_send_done_locked(std::uint32_t seq, bool was_call) MBMQ_REQUIRES(w_->mu);
  void on_hello_ack_sent_locked() MBMQ_REQUIRES(w_->mu);
  // One of our sends of n payload bytes completed (or was cancelled).
  void on_tx_done_locked(std::size_t n) MBMQ_REQUIRES(w_->mu) {
    if (tx_pending_ > 0) --tx_pending_;
    tx_bytes_ -= std::min<std::uint64_t>(tx_bytes_, n);
    tx_stalled_ = false;  // (F8) the transport moves
    ++tx_completions_;
    if (tx_window_waiters_ > 0) w_->news_locked(this);  // (W2) a send() waits for the window
  }
  // (F8) The transport window, a soft bound: send() and send_request() with a deadline wait while
  // kTxWindowMessages or more of this channel's sends, of kTxWindowBytes or more, are with UCX and
  // not completed, until as many of the channel's sends complete as were beyond the window when
  // they found it full (any of them: UCX completes rendezvous sends as the peer fetches them, not
  // in order; so a send may go while as many are still pending), as long as some complete in each
  // kTxStallNs (else the channel is stalled: sends go at once until the next completion), and at
  // most until the deadline (then they send). Several threads waiting at once may each pass on
  // one free place (net::Channel is one thread at a time, close() aside).
  static constexpr std::uint32_t kTxWindowMessages = 8;
  static constexpr std::uint64_t kTxWindowBytes = std::uint64_t{512} << 10;
  static constexpr std::int64_t kTxStallNs = 1'000'000;
  bool tx_window_open_locked() const MBMQ_REQUIRES(w_->mu) {
    return tx_pending_ < kTxWindowMessages || tx_bytes_ < kTxWindowBytes;
  }
  bool tx_room_locked() const MBMQ_REQUIRES(w_->mu) {
    return tx_stalled_ || tx_window_open_locked();
  }
  // Server side, (N4): accept() may hand the channel out: its HelloAck has been handed to the
  // transport (else the client's connect() would wait on a server that may not progress the
  // worker for a while), or the channel is closed already.
  bool acceptable_locked() const MBMQ_REQUIRES(w_->mu);
  void fail_locked(Errc code, const char* why) MBMQ_REQUIRES(w_->mu);
  // (F7) A failure deferred out of a request callback: applied by WorkerCore::fail_due_locked().
  bool fail_due_locked() MBMQ_REQUIRES(w_->mu) {
    if (!due_) return false;
    due_ = false;
    fail_locked(due_code_, due_why_);
    return true;
  }
  bool due_locked() const MBMQ_REQUIRES(w_->mu) { return due_; }
  // (F7) A payload of ours being fetched (ucp_am_recv_data_nbx in flight). Closing the endpoint
  // meanwhile, flush or force, made UCX 1.13 abort when it destroyed it (ucp_ep.c:437: the
  // receive still on the endpoint's proto_reqs): close() and the K5 linger wait for these too.
  // Sends not completed or payloads being fetched: what close() and the K5 linger wait for.
  bool unfinished_locked() const MBMQ_REQUIRES(w_->mu) {
    return tx_pending_ > 0 || rx_in_flight_locked();
  }
  bool rx_in_flight_locked() const MBMQ_REQUIRES(w_->mu) {
    for (const PendingOp* op = w_->ops; op != nullptr; op = op->next)
      if (op->recv_ep != nullptr && op->recv_ep == ep_) return true;
    return false;
  }

  const std::shared_ptr<WorkerCore> w_;
  // Unique in the process (a counter): names this channel where its address could be reused.
  const std::uint64_t id_ = next_id();

 private:
  friend class ListenCore;
  static std::uint64_t next_id() noexcept {
    static std::atomic<std::uint64_t> n{0};
    return n.fetch_add(1, std::memory_order_relaxed) + 1;
  }
  // Force: at once, dropping what is queued (failures, callbacks). Flush: what was sent goes out
  // first: the close's UCX request is returned, for the caller to wait on WITHOUT the lock (the
  // worker is shared by every channel of a listener) and free (close()). FlushAsync: the same as
  // the worker progresses later (from a callback). Returns nullptr but for an unfinished Flush.
  enum class Close : std::uint8_t { Force, Flush, FlushAsync };
  void* close_ep_locked(Close how) MBMQ_REQUIRES(w_->mu);
  Status send_locked(WireKind kind, std::uint16_t status, std::uint32_t seq, std::uint32_t limit,
                     const void* data, std::size_t n, std::vector<std::byte>* owned, bool is_call)
      MBMQ_REQUIRES(w_->mu);
  // `tag`: a send_request()'s reply's, its request's tag_ (net.h).
  void deliver_locked(const WireHeader& h, std::vector<std::byte>&& bytes, std::size_t n,
                      std::uint64_t slot, std::uint32_t tag = 0) MBMQ_REQUIRES(w_->mu);
  // The inbox's head may be received: a message, not the place of one still being received.
  bool head_ready_locked() const MBMQ_REQUIRES(w_->mu) {
    return !inbox_.empty() && inbox_.front().buffer.valid();
  }
  // Moves the inbox to `out` (to be destroyed unlocked: reply tokens take mu). The slot numbers
  // move on past it, so that a payload whose place was kept in it finds it gone (deliver_locked).
  void drop_inbox_locked(std::deque<Message>& out) MBMQ_REQUIRES(w_->mu) {
    inbox_head_ += inbox_.size();
    out.swap(inbox_);
  }
  // A request number not in use: not 0, not the call's, not an outstanding request's (after
  // 2^32 requests the counter wraps; a long-held request's number must not be given twice).
  std::uint32_t next_seq_locked() MBMQ_REQUIRES(w_->mu) {
    for (;;) {
      const std::uint32_t seq = ++next_seq_;
      if (seq != 0 && seq != call_seq_ && find_request_locked(seq) == nullptr) return seq;
    }
  }
  // Takes the inbox's head (head_ready_locked()): a one-way message's credit is counted for the
  // next Credit (the caller then calls flush_credit_locked()); not with count_credit false (a
  // redirected channel's: counted when the queue delivers it, Q4).
  Message take_head_locked(bool count_credit = true) MBMQ_REQUIRES(w_->mu);
  // The channel's end as a message, once (else the error a closed channel's receive() returns).
  Result<Message> end_message_locked() MBMQ_REQUIRES(w_->mu);
  // (R1-R3) A request of ours whose reply has not been taken: a send_request()'s, or a timed-out
  // call's (late_call: its reply, if it comes, is dropped and gives the credit back).
  struct Outstanding {
    std::uint32_t seq;
    std::uint32_t bytes;  // the request's size: its reply gives back at most these
    bool replied;         // its reply's header came (its payload may still be fetched)
    bool late_call;
    std::uint32_t tag;  // the request buffer's tag_, given to its reply (net.h)
  };
  // Unlists r (a pointer from find_request_locked).
  void unlist_request_locked(Outstanding* r) MBMQ_REQUIRES(w_->mu) {
    *r = requests_.back();
    requests_.pop_back();
  }
  // What call()/send() check of the buffer they are given: InvalidArgument (`invalid`) for an
  // invalid buffer or a received request's, and (`foreign`) for a buffer() of another channel; a
  // received buffer of another channel is cut to its size() (its vector, back in the spares as
  // ours, then holds only what our peer got: the rest was that channel's, review rev-zero).
  Status own_buffer(Buffer& buf, const char* invalid, const char* foreign) const;
  Outstanding* find_request_locked(std::uint32_t seq) MBMQ_REQUIRES(w_->mu) {
    for (Outstanding& r : requests_)
      if (r.seq == seq) return &r;
    return nullptr;
  }
  void on_hello_locked(const WireHeader& h, const std::byte* data, std::size_t n)
      MBMQ_REQUIRES(w_->mu);
  Error closed_error_locked(const char* op) MBMQ_REQUIRES(w_->mu);
  // Flow control (docs/design/net.md, (F1)-(F6)).
  bool can_send_locked(std::size_t n) const MBMQ_REQUIRES(w_->mu);
  // (F4) A Reply or Credit gives back credit: false (and the channel closed) if more than is out.
  bool take_back_locked(std::uint32_t messages, std::uint32_t bytes) MBMQ_REQUIRES(w_->mu);
  // (F5) Sends what the application released, if any (or only past half the grant: kIfHalf).
  enum class Flush : std::uint8_t { IfAny, IfHalf };
  void flush_credit_locked(Flush when) MBMQ_REQUIRES(w_->mu);

  ucp_ep_h ep_ MBMQ_GUARDED_BY(w_->mu) = nullptr;
  State state_ MBMQ_GUARDED_BY(w_->mu);
  Errc closed_code_ MBMQ_GUARDED_BY(w_->mu) = Errc::PeerClosed;
  const char* why_ MBMQ_GUARDED_BY(w_->mu) = "";
  bool peer_closed_delivered_ MBMQ_GUARDED_BY(w_->mu) = false;
  // In arrival order: a rendezvous message's place (an invalid buffer) is kept from its header on,
  // filled when its payload is received; receive() takes the head only once it is filled, so a
  // small message never overtakes a large one. inbox_head_: the slot number of inbox_.front().
  std::deque<Message> inbox_ MBMQ_GUARDED_BY(w_->mu);
  std::uint64_t inbox_head_ MBMQ_GUARDED_BY(w_->mu) = 0;
  // Rendezvous payloads whose header arrived and which are not received yet (deferred or being
  // received); a Bye behind them (bye_pending_) closes the channel once they are all in.
  std::uint32_t rx_pending_ MBMQ_GUARDED_BY(w_->mu) = 0;
  bool bye_pending_ MBMQ_GUARDED_BY(w_->mu) = false;
  // Our sends UCX has not completed yet (a rendezvous one until the peer has fetched its payload):
  // close() lingers for them before its Bye.
  std::uint32_t tx_pending_ MBMQ_GUARDED_BY(w_->mu) = 0;
  std::uint64_t tx_bytes_ MBMQ_GUARDED_BY(w_->mu) = 0;  // their payload bytes
  // (F8) A window wait found no completion for kTxStallNs; cleared by the next completion.
  bool tx_stalled_ MBMQ_GUARDED_BY(w_->mu) = false;
  std::uint64_t tx_completions_ MBMQ_GUARDED_BY(w_->mu) = 0;     // (F8) sends completed, ever
  std::uint32_t tx_window_waiters_ MBMQ_GUARDED_BY(w_->mu) = 0;  // send()s waiting for the window
  // close() returned with sends still pending (K5): closed for the application (as Closed), the
  // endpoint still open until the keeper's linger_tick() ends it, at linger_until_ns_ at the
  // latest. state_ stays Open meanwhile, so that UCX's callbacks still find and serve it.
  bool lingering_ MBMQ_GUARDED_BY(w_->mu) = false;
  // (F7) A failure decided inside a request callback, to apply after progress (the first one's).
  bool due_ MBMQ_GUARDED_BY(w_->mu) = false;
  Errc due_code_ MBMQ_GUARDED_BY(w_->mu) = Errc::PeerClosed;
  const char* due_why_ MBMQ_GUARDED_BY(w_->mu) = "";
  std::int64_t linger_until_ns_ MBMQ_GUARDED_BY(w_->mu) = 0;
  // Open for the application: not closed, not lingering.
  bool usable_locked() const MBMQ_REQUIRES(w_->mu) { return state_ == State::Open && !lingering_; }
  std::uint32_t peer_limit_ MBMQ_GUARDED_BY(w_->mu) = 0;  // the peer accepts payloads up to this
  std::uint32_t my_limit_ MBMQ_GUARDED_BY(w_->mu) = 64u << 20;
  // Flow control. Sender side: what the peer granted (its hello), and what we sent of it that it
  // has not given back. Receiver side: what we grant; what the peer used of it and we have not
  // given back (rx_: queued, in the application's hands, or released and not yet returned); and
  // what the application released (received one-way messages) that the next Credit returns.
  Grant peer_grant_ MBMQ_GUARDED_BY(w_->mu) = {0, 0};
  std::uint64_t out_msgs_ MBMQ_GUARDED_BY(w_->mu) = 0;
  std::uint64_t out_bytes_ MBMQ_GUARDED_BY(w_->mu) = 0;
  Grant my_grant_ MBMQ_GUARDED_BY(w_->mu) = {kDefaultInboxMessages, kDefaultInboxBytes};
  std::uint64_t rx_msgs_ MBMQ_GUARDED_BY(w_->mu) = 0;
  std::uint64_t rx_bytes_ MBMQ_GUARDED_BY(w_->mu) = 0;
  std::uint64_t ret_msgs_ MBMQ_GUARDED_BY(w_->mu) = 0;
  std::uint64_t ret_bytes_ MBMQ_GUARDED_BY(w_->mu) = 0;
  std::uint16_t hello_status_ MBMQ_GUARDED_BY(w_->mu) = 0xffff;  // client: HelloAck's status
  // Server: our HelloAck has left (its send completed); until then the listener's accept() does
  // not hand the channel out, and the keeper's handshake tick progresses the worker (N4).
  bool hello_ack_sent_ MBMQ_GUARDED_BY(w_->mu) = false;
  // The peer's peer_timeout in ms, from its Hello/HelloAck's seq field: we send heartbeats often
  // enough for it, not only for our own (0: unknown).
  std::uint32_t peer_timeout_ms_ MBMQ_GUARDED_BY(w_->mu) = 0;
  // The call in flight (one per channel, serialized by call_mu_): its number, whether its send
  // completed, and its reply.
  std::uint32_t next_seq_ MBMQ_GUARDED_BY(w_->mu) = 0;
  std::uint32_t call_seq_ MBMQ_GUARDED_BY(w_->mu) = 0;  // 0: none
  // The call in flight: its request's bytes (a reply gives back at most these) and whether its
  // reply came (a second one is a protocol error: each would be fetched).
  std::uint32_t call_bytes_ MBMQ_GUARDED_BY(w_->mu) = 0;
  bool call_replied_ MBMQ_GUARDED_BY(w_->mu) = false;
  bool call_sent_ MBMQ_GUARDED_BY(w_->mu) = false;
  bool reply_ready_ MBMQ_GUARDED_BY(w_->mu) = false;
  std::uint16_t reply_status_ MBMQ_GUARDED_BY(w_->mu) = 0;
  std::vector<std::byte> reply_bytes_ MBMQ_GUARDED_BY(w_->mu);
  std::size_t reply_size_ MBMQ_GUARDED_BY(w_->mu) = 0;
  void* call_op_ MBMQ_GUARDED_BY(w_->mu) = nullptr;  // the call's SendOp while UCX reads it
  // (R1) send_request()s whose replies have not reached the inbox, and timed-out calls whose late
  // replies have not come: each holds one message of credit, so there are at most out_msgs_ <=
  // the peer's message grant of them (capped by ours, F1); the vector grows to that and stays.
  std::vector<Outstanding> requests_ MBMQ_GUARDED_BY(w_->mu);
  ListenCore* listener_ MBMQ_GUARDED_BY(w_->mu) = nullptr;  // server, while Pending
  std::int64_t pending_since_ns_ = 0;  // written before the channel is shared, then read under mu
  std::int64_t last_rx_ns_ MBMQ_GUARDED_BY(w_->mu) = monotonic_ns();
  std::int64_t last_tx_ns_ MBMQ_GUARDED_BY(w_->mu) = monotonic_ns();
  os::Mutex call_mu_;  // one call() at a time
  WaitPolicy policy_{};
  // (Q2) Redirected to a MsgQueue: its source there, and the key of its messages.
  std::shared_ptr<NetSource> source_ MBMQ_GUARDED_BY(w_->mu);
  std::uint64_t tap_key_ MBMQ_GUARDED_BY(w_->mu) = 0;
  bool tap_listed_ MBMQ_GUARDED_BY(w_->mu) = false;  // in w_->tap_news
  // (Q2) Noted in w_->tap_news (for the next flush_taps_locked) if redirected.
  void note_tap_locked() MBMQ_REQUIRES(w_->mu) {
    if (source_ && !tap_listed_) {
      tap_listed_ = true;
      w_->tap_news.push_back(this);  // capacity reserved at redirect: no allocation
    }
  }
  // (Q5) No longer redirected (close(), the destructor): what the source still holds of ours
  // goes to `drop` (destroyed unlocked: reply tokens take mu), the adopter's reference to `keep`.
  void unredirect_locked(std::vector<std::shared_ptr<void>>& drop) MBMQ_REQUIRES(w_->mu);
};

class ListenCore {
 public:
  static Result<std::shared_ptr<ListenCore>> make(const Ucx* u, const std::string& addr,
                                                  std::uint16_t port, std::string service,
                                                  const ListenOptions& options);
  ~ListenCore();
  ListenCore(const ListenCore&) = delete;
  ListenCore& operator=(const ListenCore&) = delete;

  Result<std::shared_ptr<ChannelCore>> accept(Deadline deadline);
  // (Q6) Listener::redirect (net/redirect.cc).
  Status redirect(const std::shared_ptr<mbmq::detail::QueueCore>& queue, std::uint64_t key);
  // (Q6) At each flush while redirected: every acceptable connection of ready_ goes to the
  // queue's source as a Kind::Connection (or, the queue gone, to graveyard_).
  void deliver_locked() MBMQ_REQUIRES(w_->mu);
  // (Q6) For the pump, which destroys them unlocked: failed connections nobody accept()s.
  bool graveyard_due_locked() const MBMQ_REQUIRES(w_->mu) { return !graveyard_.empty(); }
  void take_graveyard_locked(std::vector<std::shared_ptr<ChannelCore>>& empty)
      MBMQ_REQUIRES(w_->mu) {
    empty.swap(graveyard_);  // no allocation
  }
  ListenerStats stats() noexcept;
  std::uint16_t port() const noexcept { return port_; }

  // Callbacks (worker mu held).
  void on_conn_request_locked(ucp_conn_request_h req) MBMQ_REQUIRES(w_->mu);
  // A pending channel's hello: kHelloOk moves it to ready_, else it is closed and counted.
  void on_hello_locked(ChannelCore* ch, std::uint16_t verdict) MBMQ_REQUIRES(w_->mu);
  void drop_pending_locked(ChannelCore* ch) MBMQ_REQUIRES(w_->mu);
  const std::string& service() const noexcept { return service_; }
  std::uint32_t max_message() const noexcept { return options_.max_message; }
  Grant grant() const noexcept { return {options_.inbox_messages, options_.inbox_bytes}; }
  std::chrono::milliseconds peer_timeout() const noexcept { return options_.peer_timeout; }

  const std::shared_ptr<WorkerCore> w_;

 private:
  ListenCore(std::shared_ptr<WorkerCore> w, std::string service, ListenOptions options)
      : w_(std::move(w)), service_(std::move(service)), options_(std::move(options)) {}
  void expire_pending_locked() MBMQ_REQUIRES(w_->mu);
  // (N6) Connections ListenOptions::backlog counts: in handshake, accepted and not yet taken by
  // accept(), delivered to the queue and not yet taken from it (net/redirect.cc).
  std::size_t held_locked() const MBMQ_REQUIRES(w_->mu);
  // (Q6) No longer redirected (the destructor): the source, out of the worker's list if we were
  // its last user, goes to `out` (destroyed unlocked: its undelivered connections close).
  void unredirect_locked(std::shared_ptr<NetSource>& out) MBMQ_REQUIRES(w_->mu);

  ucp_listener_h listener_ MBMQ_GUARDED_BY(w_->mu) = nullptr;
  std::uint16_t port_ = 0;
  const std::string service_;
  const ListenOptions options_;
  std::vector<std::shared_ptr<ChannelCore>> pending_ MBMQ_GUARDED_BY(w_->mu);
  std::deque<std::shared_ptr<ChannelCore>> ready_ MBMQ_GUARDED_BY(w_->mu);
  // Channels dropped inside a callback: destroyed later, outside mu (their destructor takes it).
  std::vector<std::shared_ptr<ChannelCore>> graveyard_ MBMQ_GUARDED_BY(w_->mu);
  ListenerStats stats_ MBMQ_GUARDED_BY(w_->mu);
  // (Q6) Where connections go once redirected (also listed in w_->sources); its queue's key.
  std::shared_ptr<NetSource> source_ MBMQ_GUARDED_BY(w_->mu);
};

// Watches `ch` from mbmq::net's keeper thread (started on first use) until it is gone: heartbeats
// and peer_timeout (net/keeper.cc). timeout 0: not watched.
// `peer_timeout` is the peer's (from its hello): heartbeats go out after a quarter of the shorter
// of the two, so that a peer with a shorter peer_timeout than ours does not think us dead. Both 0:
// not watched.
void keep_alive(const std::shared_ptr<ChannelCore>& ch, std::chrono::milliseconds timeout,
                std::chrono::milliseconds peer_timeout);
// A peer_timeout in ms as sent in a hello's seq field.
std::uint32_t wire_timeout_ms(std::chrono::milliseconds t) noexcept;
// Watches a listener's pending connection from the keeper thread: no hello within `timeout`, it
// is dropped (and counted failed). timeout 0: only Listener::accept() expires it.
void watch_handshake(const std::shared_ptr<ChannelCore>& ch, std::chrono::milliseconds timeout);
// (K4) A flush close that did not finish in close()'s 100 ms (a send the peer has not fetched:
// a stopped peer, a full link): the keeper progresses `w` every tick until the close request
// finishes, then frees it and lets the worker go. Destroying a worker with that send still
// pending aborts in UCX 1.13 (ucp_ep.c:437). Bound: one such request and a reference to its
// worker per channel so closed, until UCX finishes or fails the connection.
void keep_closing(std::shared_ptr<WorkerCore> w, void* request);
// (D1) Asks mbmq::net's allocating thread (started on first use) to start w's deferred receives:
// it allocates their vectors, then relocks w and receives into them. False: no memory or no
// thread (the caller falls back: WorkerCore::alloc_fallback). Called under w's mu (a leaf lock
// of its own; never waits).
bool allocate_deferred_later(std::weak_ptr<WorkerCore> w) noexcept;
// (K5) Gives the keeper a channel whose close() left sends pending: it calls ch->linger_tick()
// every millisecond until it returns true. Throws (no memory, no thread) like keep_closing.
void keep_lingering(std::shared_ptr<ChannelCore> ch);
// How long a closed channel's unfetched sends are kept for a slow peer (K5); a peer that dies or
// falls silent for its peer_timeout ends it sooner.
inline constexpr std::int64_t kLingerMaxNs = 10'000'000'000;

// The credit we use: the peer's grant, capped field by field by our own grant to it (F1).
Grant capped_grant(Grant peer, Grant own) noexcept;

// Maps a UCX status of a failed endpoint to an mbmq error code.
Errc errc_of(ucs_status_t s) noexcept;

// ---- WorkerCore::run_until ----
template <class Done>
Result<bool> WorkerCore::run_until(Deadline deadline, WaitPolicy policy, const void* waiter,
                                   Done done) {
  MBMQ_TRY(check_not_forked());
  {
    os::LockGuard lock(mu);
    ++waiters;
    if (n_waiting_on < waiting_on.size()) waiting_on[n_waiting_on++] = waiter;
  }
  Result<bool> r = run_until_counted(deadline, policy, waiter, done);
  {
    os::LockGuard lock(mu);
    --waiters;
    // One entry of ours, if we got one (a thread beyond the 32 has none; any holder of the same
    // waiter may remove it: they wait on the same thing).
    if (auto* it = std::find(waiting_on.begin(), waiting_on.begin() + n_waiting_on, waiter);
        it != waiting_on.begin() + n_waiting_on) {
      *it = waiting_on[--n_waiting_on];
    }
    // (W3) Nobody polls the fd now: one gen sleeper takes the role.
    if (!poller_asleep && !poller_waking && gen_sleepers > 0) wake_gen_locked(1);
  }
  // Ours, deferred by another thread's progress since our last look: nobody else takes them
  // while we waited.
  start_deferred(waiter, false);
  return r;
}

template <class Done>
Result<bool> WorkerCore::run_until_counted(Deadline deadline, WaitPolicy policy, const void* waiter,
                                           Done done) {
  const std::int64_t spin_ns = policy.mode == WaitMode::Spin    ? Deadline::kNever
                               : policy.mode == WaitMode::Sleep ? 0
                                                                : policy.spin.count();
  const std::int64_t start = monotonic_ns();
  std::uint32_t looks = 0;
  bool busy = false;  // our last progress had events
  for (;;) {
    // Busy (a large transfer): a thread waiting for mu takes it before we do again. Not when
    // idle: waking gen sleepers would then switch twice as often.
    if (busy) hand_over();
    bool poller = false;
    std::uint32_t seen = 0;
    int verdict = -1;  // decided: 1 done, 0 the deadline; -1 go on
    bool again = false;
    {
      os::LockGuard lock(mu);
      bool more = false;
      busy = progress_locked(waiter, &more);
      // Several cases below end alike (progress again); each says why.
      // NOLINTBEGIN(bugprone-branch-clone)
      if (done()) {
        verdict = 1;
      } else if ((more && (deadline.is_never() || monotonic_ns() < deadline.ns())) ||
                 (deferred_count.load(std::memory_order_relaxed) != 0 &&
                  takes_deferred_locked(waiter, true)) ||
                 (spin_ns != 0 && looks++ != 0 && (looks & 15) != 0)) {
        // Progress again, in the first of these cases that holds: (1) not drained (the loop
        // stopped early): before arming; (2) receives to start below, unlocked: not as the
        // poller (nobody would poll meanwhile) or a gen sleeper; (3) spinning: the clock is read
        // on the first look, then once per 16 (a clock read per progress step was 14 % of a
        // spinning 64 B round trip's samples).
        again = true;
      } else if (const std::int64_t now = monotonic_ns();
                 !deadline.is_never() && now >= deadline.ns()) {
        verdict = 0;
      } else if (now - start < spin_ns) {
        again = true;
      } else if (poller_asleep || poller_waking) {
        // Another thread sleeps on the event fd: sleep on gen until events are progressed.
        seen = gen.load(std::memory_order_relaxed);
        ++gen_sleepers;
      } else if (u->ucp_worker_arm(worker) == UCS_ERR_BUSY) {
        again = true;  // events came meanwhile: progress again
      } else {
        // The event fd is armed.
        poller = true;
        poller_asleep = true;
        poller_for = waiter;  // (W2) others signal us only for news of it
      }
      // NOLINTEND(bugprone-branch-clone)
    }
    // What our progress left to allocate outside the lock (WorkerCore::Deferred): before we
    // return or go on.
    start_deferred(waiter, true);
    if (verdict >= 0) return verdict == 1;
    if (again) continue;
    if (!poller) {
      wait_gen(seen, deadline);
      os::LockGuard lock(mu);
      --gen_sleepers;
      continue;
    }
    const Status st = wait_events(deadline);
    bool finished = false;
    {
      os::LockGuard lock(mu);
      poller_asleep = false;
      poller_for = nullptr;
      poller_waking = true;  // our own progress next is not a theft (W2)
      busy = progress_locked(waiter);
      poller_waking = false;
      // Leaving with done(), the role passes on in run_until (W3); else we poll again.
      finished = done();
    }
    start_deferred(waiter, true);
    if (finished) return true;
    MBMQ_TRY(st);
  }
}

}  // namespace mbmq::net::detail
