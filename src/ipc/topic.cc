// Publisher: the publishing side of the topic protocol (T1)-(T10) of docs/design/topic.md;
// the subscribing side is in topic_subscriber.cc.
#include "mbmq/topic.h"

#include <algorithm>
#include <climits>
#include <cstring>
#include <utility>

#include "ipc/endpoint.h"
#include "ipc/listener_core.h"
#include "ipc/queue_core.h"
#include "ipc/topic_core.h"
#include "ipc/wait_step.h"
#include "os/file.h"
#include "os/futex.h"
#include "os/memfd.h"

namespace mbmq {
namespace detail {

namespace {
constexpr std::uint64_t kListenKey = ~std::uint64_t{0};
constexpr std::uint32_t kKickSlotSize = 256;      // the subscribers' channels: hello and kicks only
constexpr std::int64_t kRoomStepNs = 10'000'000;  // (T7) safety net of a wait for room
constexpr std::int64_t kEventPollNs = 1'000'000;  // the queue's events, on the publishing path

std::uint64_t sub_key(std::size_t i, std::uint32_t gen) {
  return (std::uint64_t{gen} << 32) | static_cast<std::uint64_t>(i);
}
Deadline earlier(Deadline d, std::int64_t step_ns) {
  const Deadline s = Deadline::after(std::chrono::nanoseconds(step_ns));
  return (d.is_never() || s.ns() < d.ns()) ? s : d;
}
}  // namespace

// ---- publisher ---------------------------------------------------------------------------------

Result<std::shared_ptr<TopicCore>> TopicCore::make(std::string_view name, const TopicOptions& o) {
  if (o.samples < 2 || o.samples > shm::kMaxTopicSamples || o.sample_size == 0 ||
      o.sample_size > shm::kMaxTopicSampleSize || o.keep == 0 || o.keep >= o.samples ||
      o.keep > shm::kTopicRingCapacity || o.max_subscribers == 0 || o.max_subscribers > 65536)
    return fail(Errc::InvalidArgument, "Publisher::create: options out of range");
  // (T8) Under DropOldest every subscriber may pin `keep` samples (taken by its application): the
  // pool must hold them all and one more, or subscribers (e.g. one process subscribed several
  // times) could leave the publisher no sample at all.
  if (o.policy == SlowSubscriber::DropOldest &&
      std::uint64_t{o.keep} * o.max_subscribers >= o.samples)
    return fail(Errc::InvalidArgument,
                "Publisher::create: DropOldest needs samples > keep * max_subscribers");
  auto core = std::make_shared<TopicCore>(o);
  TopicCore& c = *core;
  // (T1) The pool: mapped read-write here, then sealed so that nobody can map it writable again.
  c.stride_ = (o.sample_size + 63u) & ~63u;
  const std::uint64_t pool_size =
      shm::kTopicPoolDataOffset + std::uint64_t{o.samples} * std::uint64_t{c.stride_};
  c.pool_fd_ = MBMQ_TRY(os::make_sealed_memfd("mbmq-topic-pool", pool_size));
  c.pool_ = MBMQ_TRY(os::Mapping::map_shared(c.pool_fd_.get(), pool_size, os::Access::ReadWrite));
  MBMQ_TRY(os::add_seals(c.pool_fd_.get(), os::kSealFutureWrite | os::kSealSeal));
  c.hdr_ = new (c.pool_.data()) shm::TopicPoolHeader{};
  c.hdr_->magic = shm::kTopicMagic;
  c.hdr_->version = shm::kTopicLayoutVersion;
  c.hdr_->samples = o.samples;
  c.hdr_->sample_size = o.sample_size;
  c.hdr_->sample_stride = c.stride_;
  c.hdr_->pool_size = pool_size;
  c.hdr_->data_offset = shm::kTopicPoolDataOffset;
  c.data_ = c.pool_.data() + shm::kTopicPoolDataOffset;
  c.words_ = (o.samples + 63u) / 64u;

  os::LockGuard lock(c.mu_);
  c.samples_.resize(o.samples);
  for (std::uint32_t k = o.samples; k-- > 0;) c.free_.push_back(k);
  c.subs_.resize(o.max_subscribers);
  c.skip_.resize(o.max_subscribers);
  c.queue_ = MBMQ_TRY(MsgQueue::create(o.wait));
  ListenOptions lo;
  lo.access = o.access;
  // The channel carries the hello and kicks only: a small pool.
  lo.channel.slots_per_side = 4;
  lo.channel.slot_size = kKickSlotSize;
  c.listener_ = MBMQ_TRY(Listener::create(name, lo));
  MBMQ_TRY(c.listener_.redirect(c.queue_, kListenKey));
  return core;
}

void TopicCore::shutdown() noexcept {
  os::LockGuard lock(mu_);
  if (closed_) return;
  closed_ = true;
  for (std::size_t i = 0; i < subs_.size(); ++i)
    if (subs_[i].active) remove_locked(i, false);
  listener_ = Listener{};
  queue_ = MsgQueue{};
}

void TopicCore::unref_locked(std::uint32_t k) {
  SampleRec& r = samples_[k];
  MBMQ_ASSERT(r.state == SampleState::Lent && r.refs > 0);
  if (--r.refs == 0) {
    r.state = SampleState::Free;
    ++r.gen;
    free_.push_back(k);
  }
}

void TopicCore::release_unpublished(std::uint32_t index, std::uint32_t gen) noexcept {
  os::LockGuard lock(mu_);
  if (index >= samples_.size()) return;
  SampleRec& r = samples_[index];
  if (r.state != SampleState::App || r.gen != gen) return;
  r.state = SampleState::Free;
  ++r.gen;
  free_.push_back(index);
}

// (T2) A new subscriber: its segment, the hello with both fds, then its channel into our queue.
void TopicCore::join_locked(Channel&& ch) {
  std::size_t i = 0;
  while (i < subs_.size() && subs_[i].active) ++i;
  if (i == subs_.size() || closed_) {
    ch.close();  // max_subscribers: the subscriber's connect sees PeerClosed
    return;
  }
  Sub& s = subs_[i];
  const std::uint64_t join_seq = next_seq_;
  auto setup = [&]() -> Status {
    os::UniqueFd fd =
        MBMQ_TRY(os::make_sealed_memfd("mbmq-topic-sub", sizeof(shm::TopicSubSegment)));
    MBMQ_TRY(os::add_seals(fd.get(), os::kSealSeal));
    s.map = MBMQ_TRY(
        os::Mapping::map_shared(fd.get(), sizeof(shm::TopicSubSegment), os::Access::ReadWrite));
    s.seg = new (s.map.data()) shm::TopicSubSegment{};
    s.seg->magic = shm::kTopicMagic;
    s.seg->version = shm::kTopicLayoutVersion;
    s.seg->ring_capacity = shm::kTopicRingCapacity;
    s.seg->samples = opt_.samples;
    s.seg->join_seq = join_seq;
    shm::TopicHello hello{};
    hello.magic = shm::kTopicMagic;
    hello.version = shm::kTopicLayoutVersion;
    hello.samples = opt_.samples;
    hello.sample_size = opt_.sample_size;
    hello.sample_stride = stride_;
    hello.pool_size = hdr_->pool_size;
    hello.sub_size = sizeof(shm::TopicSubSegment);
    Buffer b = MBMQ_TRY(ch.buffer(sizeof hello));
    std::memcpy(b.data().data(), &hello, sizeof hello);
    os::UniqueFd pool_dup = MBMQ_TRY(os::dup_fd(pool_fd_.get()));
    MBMQ_TRY(b.attach_fd(pool_dup.release()));
    MBMQ_TRY(b.attach_fd(fd.release()));
    MBMQ_TRY(ch.send(std::move(b)));
    return {};
  };
  Status st = setup();
  if (st) st = ch.redirect(queue_, sub_key(i, s.gen + 1));
  if (!st) {
    s.map.reset();
    s.seg = nullptr;
    ch.close();
    return;
  }
  s.active = true;
  ++s.gen;
  s.channel = std::move(ch);
  s.tail = 0;
  s.drop = 0;
  s.recs.assign(shm::kTopicRingCapacity, RingRec{});
  s.lent.assign(words_, 0);
  s.lent_count = 0;
  if (waiting_) s.seg->publisher_waiting.store(1, std::memory_order_relaxed);
  live_end_ = std::max(live_end_, i + 1);
  ++active_;
  hdr_->subscribers.store(static_cast<std::uint32_t>(active_), std::memory_order_relaxed);
  ++stats_.joined;
}

// (T9) Every reference the subscriber holds, from our private lent bitmap; nothing read from its
// segment.
void TopicCore::remove_locked(std::size_t i, bool protocol) {
  Sub& s = subs_[i];
  MBMQ_ASSERT(s.active);
  for (std::uint32_t w = 0; w < words_; ++w) {
    std::uint64_t bits = s.lent[w];
    while (bits != 0) {
      const auto b = static_cast<std::uint32_t>(__builtin_ctzll(bits));
      bits &= bits - 1;
      unref_locked(w * 64 + b);
    }
    s.lent[w] = 0;
  }
  s.lent_count = 0;
  // Tells the subscriber why, before the hang-up it will see (only it reads this).
  if (protocol) s.seg->verdict.store(shm::kTopicVerdictProtocol, std::memory_order_release);
  s.channel.close();
  s.channel = Channel{};
  s.seg = nullptr;
  s.map.reset();
  s.active = false;
  while (live_end_ > 0 && !subs_[live_end_ - 1].active) --live_end_;
  --active_;
  hdr_->subscribers.store(static_cast<std::uint32_t>(active_), std::memory_order_relaxed);
  ++stats_.left;
  if (protocol) ++stats_.protocol_errors;
}

void TopicCore::handle_message_locked(Message&& m) {
  if (m.kind == Kind::Connection) {
    if (m.key == kListenKey) join_locked(std::move(m.channel));
    return;
  }
  const auto i = static_cast<std::size_t>(m.key & 0xffff'ffffu);
  const auto gen = static_cast<std::uint32_t>(m.key >> 32);
  if (i >= subs_.size() || !subs_[i].active || subs_[i].gen != gen) return;
  if (m.kind == Kind::PeerClosed) {
    remove_locked(i, m.error == Errc::Protocol);
    return;
  }
  // Kind::Message: a kick (T6), one byte in a pool slot. Its buffer goes back to the subscriber
  // when `m` is dropped. Anything else (a request, a memfd extent, handles) breaks the protocol:
  // it would make us hold the subscriber's fds and mappings.
  if (m.kind != Kind::Message || m.buffer.size() > 1 || m.buffer.capacity() > kKickSlotSize ||
      m.buffer.handle_count() != 0)
    remove_locked(i, true);
}

void TopicCore::poll_events_locked() {
  if (closed_) return;
  // At most a ring's worth per call: a flood of kicks cannot keep us here.
  for (int n = 0; n < 512; ++n) {
    auto m = queue_.wait(Deadline::immediate());
    if (!m) return;
    handle_message_locked(std::move(*m));
  }
}

// No lock is held across a sleep: the queue is waited on with mu_ let go (other threads'
// publish(), stats(), subscribers() and dropped Buffers go on meanwhile), and what it gives is
// handled under mu_ again. Two threads waiting at once may take a subscriber's messages in either
// order; every message is valid in any order (a kick or a departure of a subscriber already
// removed is ignored: handle_message_locked), so that is harmless. The queue's core is kept alive
// by the copy of its pointer if shutdown() drops queue_ meanwhile (closed_ is then seen here).
void TopicCore::wait_events_unlocked(Deadline deadline) {
  if (closed_) return;
  const std::shared_ptr<QueueCore> q = queue_.core_;
  mu_.unlock();
  Result<Message> m = q->wait(deadline);
  mu_.lock();
  if (m && !closed_) handle_message_locked(std::move(*m));
  poll_events_locked();
}

// On the publishing path the queue is looked at once per kEventPollNs at most: a look costs a
// spin of the queue's own (~64 polls), and joins, departures and kicks can wait a millisecond.
// (A wait for room looks at it on every step, make_room_locked.)
void TopicCore::maybe_poll_events_locked() {
  const std::int64_t now = monotonic_ns();
  if (now - last_event_poll_ns_ < kEventPollNs) return;
  last_event_poll_ns_ = now;
  poll_events_locked();
}

// (T7) Bits for samples not lent to this subscriber are ignored.
void TopicCore::harvest_locked(Sub& s) {
  for (std::uint32_t w = 0; w < words_; ++w) {
    const std::uint64_t got = s.seg->returned[w].exchange(0, std::memory_order_acquire);
    std::uint64_t bits = got & s.lent[w];
    s.lent[w] &= ~bits;
    while (bits != 0) {
      const auto b = static_cast<std::uint32_t>(__builtin_ctzll(bits));
      bits &= bits - 1;
      --s.lent_count;
      unref_locked(w * 64 + b);
    }
  }
}

bool TopicCore::full_locked(Sub& s) {
  if (s.lent_count < opt_.keep) return false;
  harvest_locked(s);
  return s.lent_count >= opt_.keep;
}

// (T8) CAS the oldest queued entry Published -> Dropped. Losing to the subscriber's take (Taken)
// moves the cursor on: that sample stays lent and comes back by T6.
TopicCore::DropResult TopicCore::drop_oldest_locked(Sub& s) {
  while (s.drop < s.tail) {
    const std::uint64_t p = s.drop;
    shm::TopicEntry& e = s.seg->ring[p % shm::kTopicRingCapacity];
    std::uint64_t expected = shm::topic_state(p, shm::kTopicPublished);
    if (e.state.compare_exchange_strong(expected, shm::topic_state(p, shm::kTopicDropped),
                                        std::memory_order_acq_rel, std::memory_order_acquire)) {
      ++s.drop;
      const RingRec rec = s.recs[p % shm::kTopicRingCapacity];
      const std::uint64_t bit = std::uint64_t{1} << (rec.sample % 64);
      if ((s.lent[rec.sample / 64] & bit) != 0 && samples_[rec.sample].gen == rec.gen) {
        s.lent[rec.sample / 64] &= ~bit;
        --s.lent_count;
        unref_locked(rec.sample);
      }
      ++stats_.dropped;
      return DropResult::Dropped;
    }
    if (expected != shm::topic_state(p, shm::kTopicTaken)) return DropResult::Bad;
    ++s.drop;
  }
  return DropResult::Nothing;
}

// (T3) Entry t - capacity must have been taken or dropped: an honest subscriber's queued entries
// are all lent, and lent < keep <= capacity here.
bool TopicCore::push_locked(Sub& s, std::uint32_t k, std::uint32_t size, std::uint64_t seq) {
  const std::uint64_t t = s.tail;
  shm::TopicEntry& e = s.seg->ring[t % shm::kTopicRingCapacity];
  if (t >= shm::kTopicRingCapacity) {
    const std::uint64_t prev = t - shm::kTopicRingCapacity;
    const std::uint64_t st = e.state.load(std::memory_order_acquire);  // pairs with T5's CAS
    if (st != shm::topic_state(prev, shm::kTopicTaken) &&
        st != shm::topic_state(prev, shm::kTopicDropped))
      return false;
  }
  if (s.drop + shm::kTopicRingCapacity <= t) s.drop = t + 1 - shm::kTopicRingCapacity;
  e.sample.store(k, std::memory_order_relaxed);
  e.gen.store(samples_[k].gen, std::memory_order_relaxed);
  e.size.store(size, std::memory_order_relaxed);
  e.seq.store(seq, std::memory_order_relaxed);
  e.state.store(shm::topic_state(t, shm::kTopicPublished), std::memory_order_release);
  s.recs[t % shm::kTopicRingCapacity] = RingRec{k, samples_[k].gen};
  s.lent[k / 64] |= std::uint64_t{1} << (k % 64);
  ++s.lent_count;
  s.tail = t + 1;
  return true;
}

void TopicCore::set_waiting_locked(std::uint32_t v) {
  waiting_ = v != 0;
  for (Sub& s : live_locked())
    if (s.active) s.seg->publisher_waiting.store(v, std::memory_order_relaxed);
}

// buffer(): a free sample. publish() under Block: no subscriber full.
bool TopicCore::room_ready_locked(bool for_buffer) {
  if (for_buffer) {
    if (!free_.empty()) return true;
    for (Sub& s : live_locked())
      if (s.active) harvest_locked(s);
    return !free_.empty();
  }
  for (Sub& s : live_locked())
    if (s.active && full_locked(s)) return false;
  return true;
}

// (T7) Wait for room: announce publisher_waiting, fence (pairs with T6's seq_cst fetch_or), look,
// then wait on the queue (kicks, departures, joins) for at most kRoomStepNs, without the lock
// (wait_events_unlocked). The flag stays up while any thread waits here (room_waiters_).
Status TopicCore::make_room_locked(Deadline deadline, bool for_buffer) {
  Status result{};
  bool announced = false;
  for (;;) {
    if (closed_) {
      result = fail(Errc::InvalidArgument,
                    for_buffer ? "Publisher::buffer: closed" : "Publisher::publish: closed");
      break;
    }
    if (room_ready_locked(for_buffer)) break;
    if (deadline.expired()) {
      result = fail(Errc::TimedOut, for_buffer ? "Publisher::buffer: no free sample"
                                               : "Publisher::publish: a subscriber is full");
      break;
    }
    if (!announced) {
      announced = true;
      if (room_waiters_++ == 0) set_waiting_locked(1);
      std::atomic_thread_fence(std::memory_order_seq_cst);
      continue;  // look once more after the fence
    }
    wait_events_unlocked(earlier(deadline, kRoomStepNs));
  }
  if (announced && --room_waiters_ == 0 && !closed_) set_waiting_locked(0);
  return result;
}

Result<Buffer> TopicCore::buffer(std::size_t size, Deadline deadline) {
  if (size > opt_.sample_size)
    return fail(Errc::InvalidArgument, "Publisher::buffer: above sample_size");
  if (forked()) return fail(Errc::InvalidArgument, kForked);
  if (!mu_.lock_until(deadline))
    return fail(Errc::TimedOut, "Publisher::buffer: another thread held the publisher");
  os::LockGuard lock(mu_, os::kAdoptLock);
  if (closed_) return fail(Errc::InvalidArgument, "Publisher::buffer: closed");
  maybe_poll_events_locked();
  MBMQ_TRY(make_room_locked(deadline, true));
  const std::uint32_t k = free_.back();
  free_.pop_back();
  SampleRec& r = samples_[k];
  r.state = SampleState::App;
  Buffer b;
  b.data_ = data_ + std::size_t{k} * stride_;
  b.size_ = static_cast<std::uint32_t>(size);
  b.capacity_ = opt_.sample_size;
  b.id_ = k;
  b.gen_ = r.gen;
  b.topic_ = shared_from_this();
  return b;
}

Status TopicCore::publish(Buffer&& b, Deadline deadline) {
  if (b.topic_.get() != this || b.handle_count() != 0)
    return fail(Errc::InvalidArgument,
                "Publisher::publish: not a sample of this publisher (or it carries handles)");
  if (forked()) return fail(Errc::InvalidArgument, kForked);
  if (!mu_.lock_until(deadline))
    return fail(Errc::TimedOut, "Publisher::publish: another thread held the publisher");
  os::LockGuard lock(mu_, os::kAdoptLock);
  if (closed_) return fail(Errc::InvalidArgument, "Publisher::publish: closed");
  const std::uint32_t k = b.id_;
  if (k >= samples_.size() || samples_[k].state != SampleState::App || samples_[k].gen != b.gen_)
    return fail(Errc::InvalidArgument, "Publisher::publish: stale sample");
  maybe_poll_events_locked();
  // (T8) Slow subscribers, per policy.
  std::vector<std::uint8_t>& skip = skip_;  // reused: no allocation per publish
  std::fill(skip.begin(), skip.begin() + static_cast<std::ptrdiff_t>(live_end_), std::uint8_t{0});
  switch (opt_.policy) {
    case SlowSubscriber::Refuse:
      for (Sub& s : live_locked())
        if (s.active && full_locked(s)) {
          ++stats_.refused;
          return fail(Errc::Busy, "Publisher::publish: a subscriber is full (Refuse)");
        }
      break;
    case SlowSubscriber::DropOldest:
      for (std::size_t i = 0; i < live_end_; ++i) {
        Sub& s = subs_[i];
        if (!s.active) continue;
        bool bad = false;
        while (full_locked(s)) {
          const DropResult d = drop_oldest_locked(s);
          if (d == DropResult::Dropped) continue;
          if (d == DropResult::Bad) bad = true;
          break;
        }
        if (bad) {
          remove_locked(i, true);
        } else if (full_locked(s)) {  // harvested once more: it may have taken and released
          skip[i] = 1;                // everything it holds is taken by its application
          ++stats_.skipped;
        }
      }
      break;
    case SlowSubscriber::Block:
    default:
      // May let the lock go while it sleeps: subscribers may have joined meanwhile.
      MBMQ_TRY(make_room_locked(deadline, false));
      std::fill(skip.begin(), skip.begin() + static_cast<std::ptrdiff_t>(live_end_),
                std::uint8_t{0});
      break;
  }
  // (T3) Queue it for every subscriber.
  const std::uint64_t seq = next_seq_++;
  SampleRec& r = samples_[k];
  r.state = SampleState::Lent;
  r.refs = 0;
  for (std::size_t i = 0; i < live_end_; ++i) {
    Sub& s = subs_[i];
    if (!s.active || skip[i] != 0) continue;
    if (!push_locked(s, k, b.size_, seq)) {
      remove_locked(i, true);
      continue;
    }
    ++r.refs;
    ++stats_.deliveries;
  }
  ++stats_.published;
  // The sample is the subscribers' now: the caller's Buffer lets go without giving it back.
  b.topic_.reset();
  b.data_ = nullptr;
  b.size_ = b.capacity_ = 0;
  if (r.refs == 0) {
    r.state = SampleState::Free;
    ++r.gen;
    free_.push_back(k);
  }
  // (T4) One wake-up for every subscriber asleep: fence (pairs with T5's), then their flags.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  bool asleep = false;
  for (Sub& s : live_locked())
    if (s.active && s.seg->sleeping.load(std::memory_order_relaxed) != 0) asleep = true;
  if (asleep) {
    hdr_->wake.fetch_add(1, std::memory_order_release);
    (void)os::futex_wake(&hdr_->wake, INT_MAX);
    ++stats_.wakes;
  }
  // (T10) Subscribers that receive through a MsgQueue and asked to be told: one message each.
  for (Sub& s : live_locked()) {
    if (!s.active || s.seg->notify.load(std::memory_order_relaxed) == 0) continue;
    if (s.seg->notify.exchange(0, std::memory_order_acq_rel) == 0) continue;
    auto nb = s.channel.buffer(1);
    if (!nb || !s.channel.send(std::move(*nb))) {
      s.seg->notify.store(1, std::memory_order_relaxed);  // the next publish tries again
    } else {
      ++stats_.notifications;
    }
  }
  return {};
}

std::size_t TopicCore::subscribers() {
  os::LockGuard lock(mu_);
  poll_events_locked();
  return active_;
}

Result<std::size_t> TopicCore::serve(Deadline deadline, std::size_t until) {
  if (forked()) return fail(Errc::InvalidArgument, kForked);
  for (;;) {  // the lock is let go between steps of at most kRoomStepNs
    if (!mu_.lock_until(deadline))
      return fail(Errc::TimedOut, "Publisher::serve: another thread held the publisher");
    os::LockGuard lock(mu_, os::kAdoptLock);
    if (closed_) return fail(Errc::InvalidArgument, "Publisher::serve: closed");
    poll_events_locked();
    if (until != 0 && active_ >= until) return active_;
    if (deadline.expired()) {
      if (until != 0) return fail(Errc::TimedOut, "Publisher::wait_for_subscribers");
      return active_;
    }
    wait_events_unlocked(earlier(deadline, kRoomStepNs));
  }
}

TopicStats TopicCore::stats() {
  os::LockGuard lock(mu_);
  if (!closed_) {
    poll_events_locked();
    for (Sub& sub : live_locked())
      if (sub.active) harvest_locked(sub);  // so that free_samples is current
  }
  TopicStats s = stats_;
  s.free_samples = static_cast<std::uint32_t>(free_.size());
  return s;
}

}  // namespace detail

// ---- public handles ----------------------------------------------------------------------------

Publisher& Publisher::operator=(Publisher&& o) noexcept {
  if (this != &o) {
    if (core_) core_->shutdown();
    core_ = std::move(o.core_);
  }
  return *this;
}

Publisher::~Publisher() {
  if (core_) core_->shutdown();
}

Result<Publisher> Publisher::create(std::string_view name, const TopicOptions& options) {
  Publisher p;
  p.core_ = MBMQ_TRY(detail::TopicCore::make(name, options));
  return p;
}

Result<Buffer> Publisher::buffer(std::size_t size, Deadline deadline) {
  if (!core_) return fail(Errc::InvalidArgument, "Publisher::buffer: invalid");
  return core_->buffer(size, deadline);
}

Status Publisher::publish(Buffer&& sample, Deadline deadline) {
  if (!core_) return fail(Errc::InvalidArgument, "Publisher::publish: invalid");
  return core_->publish(std::move(sample), deadline);
}

std::size_t Publisher::subscribers() const { return core_ ? core_->subscribers() : 0; }

Result<std::size_t> Publisher::serve(Deadline deadline) {
  if (!core_) return fail(Errc::InvalidArgument, "Publisher::serve: invalid");
  return core_->serve(deadline, 0);
}

Result<std::size_t> Publisher::wait_for_subscribers(std::size_t n, Deadline deadline) {
  if (!core_) return fail(Errc::InvalidArgument, "Publisher::wait_for_subscribers: invalid");
  if (n == 0) return core_->subscribers();
  return core_->serve(deadline, n);
}

TopicStats Publisher::stats() const { return core_ ? core_->stats() : TopicStats{}; }

}  // namespace mbmq
