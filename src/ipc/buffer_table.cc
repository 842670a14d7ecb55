// BufferTable: one end's ownership tables (see ipc/buffer_table.h).
#include "ipc/buffer_table.h"

#include "mbmq/buffer.h"
#include "os/memfd.h"

namespace mbmq::detail {

using shm::Desc;
using shm::DescKind;
using shm::kMaxExtents;

void PendingDescs::push(const Desc& d) noexcept {
  MBMQ_ASSERT(count_ < ring_.size());  // each entry names a distinct buffer
  ring_[(head_ + count_++) % ring_.size()] = d;
}

bool PendingDescs::pop(Desc* d) noexcept {
  if (count_ == 0) return false;
  *d = ring_[head_];
  head_ = static_cast<std::uint32_t>((head_ + 1) % ring_.size());
  --count_;
  return true;
}

BufferTable::BufferTable(const shm::Segment& seg, int side, std::uint32_t next_extent_gen)
    : seg_(seg),
      side_(side),
      n_(seg.geometry().slots_per_side),
      slot_size_(seg.geometry().slot_size),
      next_extent_gen_(next_extent_gen == 0 ? 1 : next_extent_gen) {
  // All allocation happens here, never per message.
  free_slots_.reserve(n_);
  for (std::uint32_t k = n_; k-- > 0;) free_slots_.push_back(k);
  free_ext_.reserve(kMaxExtents);
  for (std::uint32_t e = kMaxExtents; e-- > 0;) free_ext_.push_back(e);
}

Result<BufferTable::Allocated> BufferTable::alloc(std::size_t size, bool to_seal) {
  if (size <= slot_size_) {
    if (!has_free_slot()) return fail(Errc::NoBuffers, "Channel::buffer: pool exhausted");
    return alloc_slot();
  }
  if (size > shm::kMaxExtentSize)
    return fail(Errc::InvalidArgument, "Channel::buffer: larger than 4 GiB - 4 KiB");
  if (free_ext_.empty()) return fail(Errc::NoBuffers, "Channel::buffer: extent table full");
  std::size_t cap = (size + 4095) / 4096 * 4096;
  ExtentMemory m;
  if (spare_.map.valid() && spare_.map.size() >= cap && spare_.map.size() / 2 <= cap &&
      (to_seal || !spare_.huge)) {
    m = std::move(spare_);  // prepared while the last call waited (see wants_spare())
  } else {
    m = MBMQ_TRY(make_extent_memory(cap, to_seal));
  }
  cap = m.map.size();  // a hugetlb extent's is rounded up to 2 MiB
  const std::uint32_t e = free_ext_.back();
  free_ext_.pop_back();
  OwnExtent& x = own_ext_[e];
  x.fd = std::move(m.fd);
  x.map = std::move(m.map);
  x.huge = m.huge;
  x.state = OwnState::App;
  x.gen = take_extent_gen();
  x.sent_gen = 0;
  return Allocated{BufferId::extent(e), x.gen, x.map.data(), static_cast<std::uint32_t>(cap)};
}

Result<BufferTable::ExtentMemory> BufferTable::make_extent_memory(std::size_t cap, bool huge) {
  ExtentMemory m;
  const std::size_t hcap = (cap + os::kHugePageSize - 1) / os::kHugePageSize * os::kHugePageSize;
  if (huge && cap >= os::kHugePageSize && hcap <= shm::kMaxExtentSize && os::hugetlb_opted_in()) {
    // Any failure (no hugetlbfs, too few free huge pages: fallocate's ENOSPC) falls through to
    // 4 KiB pages. The pages exist already (fallocate): MAP_POPULATE only maps them.
    if (auto fd = os::make_hugetlb_memfd("mbmq-extent", hcap)) {
      if (auto map =
              os::Mapping::map_shared(fd->get(), hcap, os::Access::ReadWrite, os::Prefault::Yes)) {
        m.fd = std::move(*fd);
        m.map = std::move(*map);
        m.huge = true;
        return m;
      }
    }
  }
  m.fd = MBMQ_TRY(os::make_sealed_memfd("mbmq-extent", cap));
  m.map =
      MBMQ_TRY(os::Mapping::map_shared(m.fd.get(), cap, os::Access::ReadWrite, os::Prefault::Huge));
  return m;
}

OwnState* BufferTable::own_state(BufferId id) noexcept {
  if (id.is_extent())
    return id.extent_index() < kMaxExtents ? &own_ext_[id.extent_index()].state : nullptr;
  const std::uint32_t first = static_cast<std::uint32_t>(side_) * n_;
  if (id.slot_index() < first || id.slot_index() - first >= n_) return nullptr;
  return &own_slots_[id.slot_index() - first].state;
}

std::uint32_t BufferTable::own_gen(BufferId id) const noexcept {
  if (id.is_extent()) return own_ext_[id.extent_index()].gen;
  return own_slots_[id.slot_index() - static_cast<std::uint32_t>(side_) * n_].gen;
}

std::uint32_t BufferTable::own_capacity(BufferId id) const noexcept {
  if (id.is_extent()) return static_cast<std::uint32_t>(own_ext_[id.extent_index()].map.size());
  return slot_size_;
}

std::byte* BufferTable::own_data(BufferId id) const noexcept {
  if (id.is_extent()) return own_ext_[id.extent_index()].map.data();
  return seg_.slot(id.slot_index());
}

std::uint32_t BufferTable::free_own(BufferId id) noexcept {
  if (id.is_extent()) {
    const std::uint32_t e = id.extent_index();
    OwnExtent& x = own_ext_[e];
    const std::uint32_t hint = x.sent_gen == x.gen ? x.gen : 0;
    x.map.reset();
    x.fd.reset();
    x.sealed = false;
    x.huge = false;
    x.state = OwnState::Free;
    free_ext_.push_back(e);  // capacity reserved at construction: no allocation
    return hint;
  }
  const std::uint32_t k = id.slot_index() - static_cast<std::uint32_t>(side_) * n_;
  own_slots_[k].state = OwnState::Free;
  free_slots_.push_back(k);
  return 0;
}

std::uint32_t BufferTable::take_returned(std::uint32_t w, std::uint64_t bits) noexcept {
  std::uint32_t freed = 0;
  for (; bits != 0; bits &= bits - 1) {
    const std::uint32_t k = 64 * w + static_cast<std::uint32_t>(__builtin_ctzll(bits));
    if (k >= n_ || own_slots_[k].state != OwnState::LentOneWay) continue;
    own_slots_[k].state = OwnState::Free;
    free_slots_.push_back(k);  // capacity reserved at construction: no allocation
    ++freed;
  }
  return freed;
}

void BufferTable::reclaim_lent() noexcept {
  // (P8) Nothing the peer holds can come back: lent and abandoned buffers return to the pool,
  // extents are unmapped and closed (no ReleaseExtent: the channel is over). A call's buffer is
  // given back to its caller by call() itself.
  auto lent = [](OwnState st) {
    return st == OwnState::LentRequest || st == OwnState::LentOneWay || st == OwnState::Abandoned;
  };
  for (std::uint32_t k = 0; k < n_; ++k)
    if (lent(own_slots_[k].state))
      (void)free_own(BufferId::slot(static_cast<std::uint32_t>(side_) * n_ + k));
  for (std::uint32_t e = 0; e < kMaxExtents; ++e)
    if (lent(own_ext_[e].state)) (void)free_own(BufferId::extent(e));
  requests_out_ = 0;
}

std::uint32_t BufferTable::take_extent_gen() noexcept {
  const std::uint32_t g = next_extent_gen_;
  next_extent_gen_ = g + 1 == 0 ? 1 : g + 1;  // 0 means "never sent" (OwnExtent::sent_gen)
  return g;
}

bool BufferTable::is_peer_slot(BufferId id) const noexcept {
  const std::uint32_t first = static_cast<std::uint32_t>(1 - side_) * n_;
  return !id.is_extent() && id.slot_index() >= first && id.slot_index() - first < n_;
}

PeerExtent* BufferTable::peer_extent(BufferId id) noexcept {
  return id.is_extent() && id.extent_index() < kMaxExtents ? &peer_ext_[id.extent_index()]
                                                           : nullptr;
}

const PeerExtent* BufferTable::peer_extent(BufferId id) const noexcept {
  return id.is_extent() && id.extent_index() < kMaxExtents ? &peer_ext_[id.extent_index()]
                                                           : nullptr;
}

bool BufferTable::held(BufferId id) const noexcept {
  if (id.is_extent()) return peer_ext_[id.extent_index()].held;
  return peer_held_[id.slot_index() - static_cast<std::uint32_t>(1 - side_) * n_];
}

const char* BufferTable::check_lent(const Desc& d, std::uint32_t max_in_flight) const noexcept {
  const bool request = is(kind_of(d), DescKind::Request);
  if (request && max_in_flight != 0 && requests_in_ >= max_in_flight)
    return "receive: the peer exceeded the channel's in-flight limit";
  const BufferId id = BufferId::from_wire(d.buffer);
  if (id.is_extent()) {
    const PeerExtent* pe = peer_extent(id);
    if (pe == nullptr) return "receive: invalid extent descriptor";
    if (pe->held) return "receive: the peer reused an extent we still hold";
    return nullptr;
  }
  if (!is_peer_slot(id) || d.size > slot_size_) return "receive: invalid slot descriptor";
  if (held(id)) return "receive: a buffer sent twice";
  return nullptr;
}

void BufferTable::take_lent(const Desc& d) noexcept {
  set_held(BufferId::from_wire(d.buffer), true);
  if (is(kind_of(d), DescKind::Request)) ++requests_in_;
}

const char* BufferTable::check_back(const Desc& d, bool is_return, const BufferId* call) noexcept {
  const BufferId id = BufferId::from_wire(d.buffer);
  const OwnState* st = own_state(id);
  if (st == nullptr) return "receive: reply names no buffer of ours";
  if (own_gen(id) != d.gen || *st == OwnState::Free || *st == OwnState::App)
    return "receive: reply for a buffer not lent";
  if (is_return) {
    // Slots come back through `returned` (P7r), extents with Return.
    if (!id.is_extent() || *st != OwnState::LentOneWay || (d.kind & shm::kDescHasHandles) != 0 ||
        d.size > own_capacity(id))
      return "receive: invalid return";
    return nullptr;
  }
  if (d.status > static_cast<std::uint16_t>(shm::DescStatus::NoReply))
    return "receive: reply status";
  if (*st == OwnState::LentCall && (call == nullptr || *call != id))
    return "receive: reply for a call not waiting";
  if (*st != OwnState::LentCall && *st != OwnState::Abandoned && *st != OwnState::LentRequest)
    return "receive: reply for a one-way message";
  return nullptr;
}

OwnState BufferTable::take_reply(BufferId id) noexcept {
  OwnState* st = own_state(id);
  const OwnState was = *st;
  request_answered();
  if (was != OwnState::Abandoned) *st = OwnState::App;  // Abandoned: the caller frees it
  return was;
}

std::uint64_t BufferTable::shadow_bytes() const noexcept {
  std::uint64_t n = 0;
  for (const OwnExtent& x : own_ext_) n += x.shadow.capacity();
  for (const PeerExtent& pe : peer_ext_) n += pe.shadow.capacity();
  return n;
}

void BufferTable::free_idle_shadows() noexcept {
  for (OwnExtent& x : own_ext_)
    if (x.state == OwnState::Free) std::vector<std::byte>().swap(x.shadow);
  for (PeerExtent& pe : peer_ext_)
    if (!pe.held) std::vector<std::byte>().swap(pe.shadow);
}

const char* BufferTable::release_peer_extent(const Desc& d) noexcept {
  PeerExtent* pe = peer_extent(BufferId::from_wire(d.buffer));
  if (pe == nullptr || (d.kind & shm::kDescHasHandles) != 0 || pe->held)
    return "receive: invalid release";
  if (pe->gen == d.gen) {
    pe->map.reset();
    pe->fd.reset();
    std::vector<std::byte>().swap(pe->shadow);
  }
  return nullptr;
}

const char* BufferTable::busy() const noexcept {
  for (const auto& o : own_slots_)
    if (o.state != OwnState::Free) return "export channel end: buffers out";
  for (const auto& x : own_ext_)
    if (x.state != OwnState::Free) return "export channel end: buffers out";
  for (bool h : peer_held_)
    if (h) return "export channel end: peer buffers held";
  for (const auto& pe : peer_ext_)
    if (pe.map.valid()) return "export channel end: peer extents mapped";
  if (!pending_.empty()) return "export channel end: messages pending";
  return nullptr;
}

}  // namespace mbmq::detail
