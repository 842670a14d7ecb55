#include "shm/segment.h"

#include <algorithm>
#include <cstring>
#include <new>

#include "os/memfd.h"

namespace mbmq::shm {

namespace {
constexpr std::uint64_t align_up(std::uint64_t v, std::uint64_t a) { return (v + a - 1) / a * a; }
}  // namespace

Result<Geometry> compute_geometry(std::uint32_t slots_per_side, std::uint32_t slot_size,
                                  Limits limits) {
  if (slots_per_side == 0 || slots_per_side > kMaxSlotsPerSide)
    return fail(Errc::InvalidArgument, "segment: slots_per_side out of range");
  if (slot_size < kMinSlotSize || slot_size > kMaxSlotSize || slot_size % 64 != 0)
    return fail(Errc::InvalidArgument, "segment: slot_size out of range or not a multiple of 64");
  if (limits.max_handles > kMaxHandles)
    return fail(Errc::InvalidArgument, "segment: max_handles above kMaxHandles (8)");
  if (limits.max_in_flight > slots_per_side + kMaxExtents)
    return fail(Errc::InvalidArgument, "segment: max_in_flight above the buffers a side has");
  if (limits.untrusted_mask > 3) return fail(Errc::InvalidArgument, "segment: trust mask");
  // 0: untrusted ends copy payloads up to 64 MiB (the faster path on machines with 4 KiB pages,
  // see kDefaultCopyThreshold); with every end cooperative the value is unused, slot_size.
  const std::uint32_t threshold = limits.copy_threshold != 0 ? limits.copy_threshold
                                  : limits.untrusted_mask != 0
                                      ? std::max(kDefaultCopyThreshold, slot_size)
                                      : slot_size;
  if (threshold < slot_size || threshold > kMaxExtentSize)
    return fail(Errc::InvalidArgument,
                "segment: copy_threshold below slot_size (pool buffers cannot be sealed)");
  Geometry g;
  g.untrusted_mask = limits.untrusted_mask;
  g.copy_threshold = threshold;
  g.max_in_flight = limits.max_in_flight;
  g.max_handles = limits.max_handles;
  g.slots_per_side = slots_per_side;
  g.slot_size = slot_size;
  g.dir_offset[0] = kDirOffset;
  g.dir_offset[1] = kDirOffset + sizeof(Direction);
  g.pool_offset = align_up(g.dir_offset[1] + sizeof(Direction), 4096);
  g.segment_size = align_up(g.pool_offset + 2ull * slots_per_side * slot_size, 4096);
  return g;
}

Result<Segment> Segment::create(std::uint32_t slots_per_side, std::uint32_t slot_size,
                                Limits limits) {
  Geometry g = MBMQ_TRY(compute_geometry(slots_per_side, slot_size, limits));
  Segment s;
  s.fd_ = MBMQ_TRY(os::make_sealed_memfd("mbmq-channel", g.segment_size));
  s.map_ = MBMQ_TRY(os::Mapping::map_shared(s.fd_.get(), g.segment_size, os::Access::ReadWrite));
  s.geo_ = g;
  SegmentHeader h{};
  h.magic = kMagic;
  h.version = kLayoutVersion;
  h.slots_per_side = slots_per_side;
  h.slot_size = slot_size;
  h.ring_capacity = kRingCapacity;
  h.dir_offset[0] = g.dir_offset[0];
  h.dir_offset[1] = g.dir_offset[1];
  h.pool_offset = g.pool_offset;
  h.segment_size = g.segment_size;
  h.max_in_flight = static_cast<std::uint16_t>(g.max_in_flight);
  h.max_handles = static_cast<std::uint16_t>(g.max_handles);
  h.untrusted_mask = g.untrusted_mask;
  h.copy_threshold = g.copy_threshold;
  std::memcpy(s.map_.data(), &h, sizeof(h));
  // The memfd is zero-filled, which is a valid initial state for every atomic in Direction;
  // placement-new makes their lifetime explicit.
  for (const std::uint64_t off : g.dir_offset) new (s.map_.data() + off) Direction{};
  return s;
}

Result<Segment> Segment::attach(os::UniqueFd fd) {
  unsigned seals = MBMQ_TRY(os::get_seals(fd.get()));
  if ((seals & os::kSealsFixedSize) != os::kSealsFixedSize)
    return fail(Errc::Protocol, "segment: memfd not sealed against shrink/grow");
  std::uint64_t size = MBMQ_TRY(os::file_size(fd.get()));
  if (size < sizeof(SegmentHeader) || size > (std::uint64_t{1} << 36))
    return fail(Errc::Protocol, "segment: bad size");
  Segment s;
  s.map_ = MBMQ_TRY(os::Mapping::map_shared(fd.get(), size, os::Access::ReadWrite));
  SegmentHeader h;
  std::memcpy(&h, s.map_.data(), sizeof(h));  // read once, validate the private copy
  if (h.magic != kMagic || h.version != kLayoutVersion || h.ring_capacity != kRingCapacity)
    return fail(Errc::Protocol, "segment: bad magic or layout version");
  auto g =
      compute_geometry(h.slots_per_side, h.slot_size,
                       Limits{h.max_in_flight, h.max_handles, h.untrusted_mask, h.copy_threshold});
  if (!g || g->segment_size != size || g->segment_size != h.segment_size ||
      g->pool_offset != h.pool_offset || g->dir_offset[0] != h.dir_offset[0] ||
      g->dir_offset[1] != h.dir_offset[1] || g->copy_threshold != h.copy_threshold)
    return fail(Errc::Protocol, "segment: header does not match its size");
  s.geo_ = *g;
  s.fd_ = std::move(fd);
  return s;
}

}  // namespace mbmq::shm
