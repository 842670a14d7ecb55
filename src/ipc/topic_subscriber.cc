// Subscriber and Sample: the subscribing side of the topic protocol (T1)-(T10) of
// docs/design/topic.md; the publishing side is in topic.cc.
#include <cstring>
#include <utility>

#include "ipc/endpoint.h"
#include "ipc/listener_core.h"
#include "ipc/topic_core.h"
#include "ipc/wait_step.h"
#include "mbmq/topic.h"
#include "os/file.h"
#include "os/futex.h"
#include "os/memfd.h"

namespace mbmq {
namespace detail {

namespace {
constexpr std::int64_t kSleepStepNs = 100'000'000;  // (T5) a sleeping subscriber's check period
constexpr const char* kThrownOut =
    "Subscriber: the publisher disconnected us for breaking the topic protocol";
}  // namespace

// ---- subscriber --------------------------------------------------------------------------------

Result<std::shared_ptr<SubscriberCore>> SubscriberCore::connect(std::string_view name,
                                                                Deadline deadline,
                                                                const ConnectOptions& options) {
  auto core = std::make_shared<SubscriberCore>();
  SubscriberCore& c = *core;
  c.wait_ = options.wait;
  c.channel_ = MBMQ_TRY(mbmq::connect(name, deadline, options));
  // (T2) The hello, read once into a local and checked against both segments.
  Message m = MBMQ_TRY(c.channel_.receive(deadline));
  if (m.kind != Kind::Message) return fail(m.error, "Subscriber::connect: no hello");
  shm::TopicHello h{};
  if (m.buffer.size() != sizeof h || m.buffer.handle_count() != 2)
    return fail(Errc::Protocol, "Subscriber::connect: malformed hello");
  std::memcpy(&h, m.buffer.data().data(), sizeof h);
  if (h.magic != shm::kTopicMagic || h.version != shm::kTopicLayoutVersion || h.samples == 0 ||
      h.samples > shm::kMaxTopicSamples || h.sample_size == 0 ||
      h.sample_size > shm::kMaxTopicSampleSize || h.sample_stride < h.sample_size ||
      h.sample_stride % 64 != 0 ||
      h.pool_size != shm::kTopicPoolDataOffset + std::uint64_t{h.samples} * h.sample_stride ||
      h.sub_size != sizeof(shm::TopicSubSegment))
    return fail(Errc::Protocol, "Subscriber::connect: hello out of range");
  os::UniqueFd pool_fd(MBMQ_TRY(m.buffer.take_fd(0)));
  os::UniqueFd sub_fd(MBMQ_TRY(m.buffer.take_fd(1)));
  m = Message{};  // gives the hello's buffer back
  const unsigned pool_seals = MBMQ_TRY(os::get_seals(pool_fd.get()));
  const unsigned sub_seals = MBMQ_TRY(os::get_seals(sub_fd.get()));
  if ((pool_seals & (os::kSealsFixedSize | os::kSealFutureWrite)) !=
          (os::kSealsFixedSize | os::kSealFutureWrite) ||
      (sub_seals & os::kSealsFixedSize) != os::kSealsFixedSize ||
      MBMQ_TRY(os::file_size(pool_fd.get())) != h.pool_size ||
      MBMQ_TRY(os::file_size(sub_fd.get())) != h.sub_size)
    return fail(Errc::Protocol, "Subscriber::connect: pool or segment not sealed or mis-sized");
  c.pool_ = MBMQ_TRY(os::Mapping::map_shared(pool_fd.get(), h.pool_size, os::Access::ReadOnly));
  c.seg_map_ = MBMQ_TRY(os::Mapping::map_shared(sub_fd.get(), h.sub_size, os::Access::ReadWrite));
  c.hdr_ = reinterpret_cast<const shm::TopicPoolHeader*>(c.pool_.data());
  c.seg_ = reinterpret_cast<shm::TopicSubSegment*>(c.seg_map_.data());
  // The headers are the publisher's, written before it sent the fds; copied once, checked.
  const std::uint64_t join_seq = c.seg_->join_seq;
  if (c.hdr_->magic != shm::kTopicMagic || c.hdr_->samples != h.samples ||
      c.hdr_->sample_size != h.sample_size || c.hdr_->sample_stride != h.sample_stride ||
      c.hdr_->pool_size != h.pool_size || c.hdr_->data_offset != shm::kTopicPoolDataOffset ||
      c.seg_->magic != shm::kTopicMagic || c.seg_->ring_capacity != shm::kTopicRingCapacity ||
      c.seg_->samples != h.samples)
    return fail(Errc::Protocol, "Subscriber::connect: headers disagree with the hello");
  c.samples_ = h.samples;
  c.sample_size_ = h.sample_size;
  c.stride_ = h.sample_stride;
  c.data_ = c.pool_.data() + shm::kTopicPoolDataOffset;
  {
    os::LockGuard lock(c.recv_mu_);
    c.expected_seq_ = join_seq;
  }
  return core;
}

Status SubscriberCore::closed_status() noexcept {
  auto& ep = ChannelAccess::ep(channel_);
  if (!ep) return fail(Errc::InvalidArgument, "Subscriber: closed");
  const EpState st = ep->state();
  if (st == EpState::Open) return {};
  if (seg_->verdict.load(std::memory_order_acquire) == shm::kTopicVerdictProtocol)
    return fail(Errc::Protocol, kThrownOut);
  return fail(closed_errc(st), "Subscriber::receive: the publisher has gone");
}

bool SubscriberCore::ring_has_news() const noexcept {
  const std::uint64_t st =
      seg_->ring[head_ % shm::kTopicRingCapacity].state.load(std::memory_order_acquire);
  return (st >> 2) >= head_ + 1;
}

// (T5) Copy the fields, then claim the entry by CAS; a failed CAS means the publisher dropped it.
Result<std::optional<Sample>> SubscriberCore::try_take() {
  // Skips are bounded per look: a publisher writing huge positions everywhere cannot keep us here
  // (receive() still ends at its deadline).
  for (std::uint32_t skips = 0; skips < 2 * shm::kTopicRingCapacity; ++skips) {
    shm::TopicEntry& e = seg_->ring[head_ % shm::kTopicRingCapacity];
    std::uint64_t st = e.state.load(std::memory_order_acquire);  // pairs with T3's release
    if ((st >> 2) < head_ + 1) return std::optional<Sample>{};
    if (st != shm::topic_state(head_, shm::kTopicPublished)) {
      ++head_;  // dropped, or dropped and reused (lapped)
      continue;
    }
    const std::uint32_t k = e.sample.load(std::memory_order_relaxed);
    const std::uint32_t size = e.size.load(std::memory_order_relaxed);
    const std::uint64_t seq = e.seq.load(std::memory_order_relaxed);
    if (!e.state.compare_exchange_strong(st, shm::topic_state(head_, shm::kTopicTaken),
                                         std::memory_order_acq_rel, std::memory_order_acquire)) {
      ++head_;  // (T8) the publisher dropped it first
      continue;
    }
    ++head_;
    if (k >= samples_ || size > sample_size_ || seq < expected_seq_) {
      broken_ = "Subscriber::receive: the publisher wrote a bad entry";
      return fail(Errc::Protocol, broken_);
    }
    Sample s;
    s.core_ = shared_from_this();
    s.data_ = data_ + std::size_t{k} * stride_;
    s.size_ = size;
    s.seq_ = seq;
    s.missed_ = seq - expected_seq_;
    s.index_ = k;
    expected_seq_ = seq + 1;
    return std::optional<Sample>{std::move(s)};
  }
  return std::optional<Sample>{};
}

Result<Sample> SubscriberCore::receive(Deadline deadline) {
  if (os::current_pid() != pid_) return fail(Errc::InvalidArgument, kForked);
  if (!recv_mu_.lock_until(deadline))
    return fail(Errc::TimedOut,
                "Subscriber::receive: another thread's receive did not end in time");
  os::LockGuard lock(recv_mu_, os::kAdoptLock);
  if (redirected_) return fail(Errc::InvalidArgument, "Subscriber::receive: redirected to a queue");
  if (broken_ != nullptr) return fail(Errc::Protocol, broken_);
  // (T5) More subscribers than CPUs besides the publisher's: an adaptive spin would hold a CPU
  // another subscriber needs to wake up on (measured: 8 subscribers on 2 CPUs, p50 of the last
  // receive 192 us spinning, 36 us sleeping at once). The count is the publisher's hint.
  WaitPolicy policy = wait_;
  if (policy.mode == WaitMode::Adaptive &&
      std::int64_t{hdr_->subscribers.load(std::memory_order_relaxed)} + 1 > os::cpu_count())
    policy.mode = WaitMode::Sleep;
  SpinStep step(policy, deadline);
  for (;;) {
    auto got = MBMQ_TRY(try_take());
    if (got) return std::move(*got);
    MBMQ_TRY(closed_status());
    switch (step.after_miss()) {
      case SpinStep::Next::Look:
        continue;
      case SpinStep::Next::Expired:
        return fail(Errc::TimedOut, "Subscriber::receive");
      case SpinStep::Next::Sleep:
        break;
    }
    // (T5) Sleep: read the word, announce, fence (pairs with T4's), look once more.
    const std::uint32_t v = hdr_->wake.load(std::memory_order_acquire);
    seg_->sleeping.store(1, std::memory_order_relaxed);
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (!ring_has_news() && closed_status()) {
      std::int64_t timeout = deadline.is_never() ? kSleepStepNs : deadline.remaining_ns();
      if (timeout > kSleepStepNs) timeout = kSleepStepNs;
      if (timeout > 0) (void)os::futex_wait(&hdr_->wake, v, timeout);
    }
    seg_->sleeping.store(0, std::memory_order_relaxed);
  }
}

// Lock order: the queue's lock, then recv_mu_ (take_into). So recv_mu_ is not held across the
// channel's redirect, which takes the queue's lock.
Status SubscriberCore::redirect(MsgQueue& queue, std::uint64_t key) {
  {
    os::LockGuard lock(recv_mu_);
    if (redirected_) return fail(Errc::InvalidArgument, "Subscriber::redirect: already redirected");
    if (!ChannelAccess::ep(channel_))
      return fail(Errc::InvalidArgument, "Subscriber::redirect: closed");
    key_ = key;
    redirected_ = true;
  }
  // Before the queue can poll the end: the redirect publishes it to the queue's threads.
  ChannelAccess::ep(channel_)->set_tap(std::weak_ptr<TopicTap>(weak_from_this()));
  Status st = channel_.redirect(queue, key);
  if (!st) {  // the tap stays, unused: nothing polls an end that is not redirected
    os::LockGuard lock(recv_mu_);
    redirected_ = false;
  }
  return st;
}

// (T10) From the queue's poll of our channel end, with the queue's lock held. Nothing there: arm
// `notify`, fence (pairs with T4's), look once more.
bool SubscriberCore::take_into(Message* out) noexcept {
  os::LockGuard lock(recv_mu_);
  if (!redirected_ || broken_ != nullptr) return false;
  for (int attempt = 0; attempt < 2; ++attempt) {
    auto got = try_take();
    if (!got) {
      // The publisher wrote garbage: the channel ends with Errc::Protocol, which the queue
      // delivers as this subscription's Kind::PeerClosed.
      ChannelAccess::ep(channel_)->abandon(broken_);
      return false;
    }
    if (*got) {
      *out = Message{};
      out->key = key_;
      out->kind = Kind::Sample;
      out->sample = std::move(**got);
      return true;
    }
    if (attempt == 0) {
      seg_->notify.store(1, std::memory_order_relaxed);
      std::atomic_thread_fence(std::memory_order_seq_cst);
    }
  }
  return false;
}

void SubscriberCore::on_end(Message* out) noexcept {
  if (seg_->verdict.load(std::memory_order_acquire) == shm::kTopicVerdictProtocol) {
    out->error = Errc::Protocol;
    out->why = kThrownOut;
  }
}

// (T6) No lock: one RMW on our own segment, then a kick if the publisher waits for room.
void SubscriberCore::release(std::uint32_t index) noexcept {
  if (seg_ == nullptr || index >= samples_) return;
  // A Sample's copy dropped in a forked child: the parent still reads it (found by review).
  if (os::current_pid() != pid_) return;
  seg_->returned[index / 64].fetch_or(std::uint64_t{1} << (index % 64), std::memory_order_seq_cst);
  if (seg_->publisher_waiting.load(std::memory_order_relaxed) == 0) return;
  // One kick at a time; a lost one is covered by the publisher's 10 ms safety net.
  if (kicking_.exchange(true, std::memory_order_acquire)) return;
  auto b = channel_.buffer(1);
  if (b) (void)channel_.send(std::move(*b));
  kicking_.store(false, std::memory_order_release);
}

void SubscriberCore::close() noexcept { channel_.close(); }

}  // namespace detail

// ---- public handles ----------------------------------------------------------------------------

Sample::Sample(Sample&& o) noexcept
    : core_(std::move(o.core_)),
      data_(std::exchange(o.data_, nullptr)),
      size_(std::exchange(o.size_, 0)),
      seq_(o.seq_),
      missed_(o.missed_),
      index_(o.index_) {}

Sample& Sample::operator=(Sample&& o) noexcept {
  if (this != &o) {
    reset();
    core_ = std::move(o.core_);
    data_ = std::exchange(o.data_, nullptr);
    size_ = std::exchange(o.size_, 0);
    seq_ = o.seq_;
    missed_ = o.missed_;
    index_ = o.index_;
  }
  return *this;
}

Sample::~Sample() { reset(); }

void Sample::reset() noexcept {
  if (core_ && data_ != nullptr) core_->release(index_);
  core_.reset();
  data_ = nullptr;
  size_ = 0;
}

Subscriber::~Subscriber() {
  if (core_) core_->close();
}

Result<Subscriber> Subscriber::connect(std::string_view name, Deadline deadline,
                                       const ConnectOptions& options) {
  Subscriber s;
  s.core_ = MBMQ_TRY(detail::SubscriberCore::connect(name, deadline, options));
  return s;
}

Status Subscriber::redirect(MsgQueue& queue, std::uint64_t key) {
  if (!core_) return fail(Errc::InvalidArgument, "Subscriber::redirect: invalid");
  return core_->redirect(queue, key);
}

Result<Sample> Subscriber::receive(Deadline deadline) {
  if (!core_) return fail(Errc::InvalidArgument, "Subscriber::receive: invalid");
  return core_->receive(deadline);
}

}  // namespace mbmq
