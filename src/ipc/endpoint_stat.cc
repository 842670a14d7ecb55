// Endpoint's side of a stat query (#18, docs/design/introspection.md): its counters and gauges,
// read by the watcher thread while the end's owner runs.
#include <algorithm>
#include <cstring>

#include "ipc/endpoint.h"
#include "os/mutex.h"

namespace mbmq::detail {

namespace {

// Descriptors between a ring's published head and tail, as a monitor sees them: relaxed loads
// (shown, never used), clamped (the peer may have scribbled either index).
std::uint32_t ring_used(const shm::Direction& d) noexcept {
  const std::uint32_t used =
      d.tail.load(std::memory_order_relaxed) - d.head.load(std::memory_order_relaxed);
  return std::min(used, shm::kRingCapacity);
}

}  // namespace

void Endpoint::retire_locked(EpState was) noexcept {
  if (!retire_) return;
  retire_->retire(counters_, was == EpState::PeerClosed, was == EpState::Protocol, why_bad_);
  retire_.reset();
}

std::uint64_t Endpoint::message_total() const noexcept {
  std::uint64_t n = 0;
  for (std::size_t k = 1; k <= static_cast<std::size_t>(shm::DescKind::OneWay); ++k)
    n += EndCounters::get(counters_.out[k]) + EndCounters::get(counters_.in[k]);
  return n;
}

void Endpoint::fill_stat(ChannelStat* out) const noexcept {
  using shm::DescKind;
  const EndCounters& c = counters_;
  auto at = [](const std::array<std::atomic<std::uint64_t>, 6>& a, DescKind k) {
    return EndCounters::get(a[static_cast<std::size_t>(k)]);
  };
  out->requests_in = at(c.in, DescKind::Request);
  out->requests_out = at(c.out, DescKind::Request);
  out->replies_in = at(c.in, DescKind::Reply);
  out->replies_out = at(c.out, DescKind::Reply);
  out->oneway_in = at(c.in, DescKind::OneWay);
  out->oneway_out = at(c.out, DescKind::OneWay);
  out->returns_in = at(c.in, DescKind::Return);
  out->returns_out = at(c.out, DescKind::Return);
  out->no_reply_in = EndCounters::get(c.no_reply_in);
  out->no_reply_out = EndCounters::get(c.no_reply_out);
  out->bytes_in = EndCounters::get(c.bytes_in);
  out->bytes_out = EndCounters::get(c.bytes_out);
  out->ring_out = ring_used(out_);
  out->ring_in = ring_used(in_);
  const WaitPolicy w = wait_.load();
  out->wait_mode = static_cast<std::uint8_t>(w.mode);
  out->wait_spin_ns = static_cast<std::uint64_t>(std::max<std::int64_t>(w.spin.count(), 0));
  switch (state()) {
    case EpState::Open:
      out->state = static_cast<std::uint8_t>(ChannelState::Open);
      break;
    case EpState::PeerClosed:
      out->state = static_cast<std::uint8_t>(ChannelState::PeerClosed);
      break;
    case EpState::Protocol:
      out->state = static_cast<std::uint8_t>(ChannelState::Protocol);
      break;
    case EpState::LocalClosed:
      out->state = static_cast<std::uint8_t>(ChannelState::Closed);
      break;
  }
  // mu_ is a spin lock held for nanoseconds by the owner: taken once per channel per query.
  os::LockGuard lock(mu_);
  out->trust = trust_.untrusted_me() ? 1 : 0;
  out->slots_in_use = table_.slots_in_use();
  out->extents_in_use = table_.extents_in_use();
  out->requests_held = table_.requests_in();
  out->requests_out_now = table_.requests_out();
  const char* why = why_bad_ != nullptr ? why_bad_ : "";
  std::strncpy(out->why, why, sizeof(out->why) - 1);
  out->why[sizeof(out->why) - 1] = 0;
}

}  // namespace mbmq::detail
