// PeerTrust: seal checks, private copies, sealed sends and replacements (see ipc/peer_trust.h).
#include "ipc/peer_trust.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <new>
#include <vector>

#include "os/file.h"
#include "os/memfd.h"

namespace mbmq::detail {

namespace {
std::uint32_t page_round(std::uint32_t n) {
  return static_cast<std::uint32_t>((std::uint64_t{n} + 4095) / 4096 * 4096);
}

// A private, writable view of an immutable memfd of OUR OWN of `cap` bytes, `size` of them the
// payload (P3c):
// copy-on-write, which allocates nothing until written. On hugetlbfs a MAP_PRIVATE mapping
// reserves huge pages for its whole length when it is made (so that a copy-on-write fault can
// never SIGBUS: MAP_NORESERVE would allow exactly that), and fails with ENOMEM when the pool has
// not that many free. Then: a private copy of its first `size` bytes in anonymous memory (one
// pread, what the copy path costs), if the file holds at least that many bytes of huge pages: a
// sparse file's holes would be zeros allocated for nothing, so a peer can make us copy no more
// than it holds itself. Else the mapping's error.
Result<os::Mapping> sealed_view(int fd, std::size_t cap, std::size_t size) {
  auto m = os::Mapping::map_shared(fd, cap, os::Access::CopyOnWrite);
  if (m || m.error().code != Errc::System || m.error().sys_errno != ENOMEM || !os::is_hugetlb(fd))
    return m;
  size = std::min(size, cap);
  auto info = os::file_info(fd);
  if (!info || info->allocated < size) return m;
  auto copy = MBMQ_TRY(os::Mapping::anonymous(cap));
  if (size > 0 && MBMQ_TRY(os::pread_full(fd, {copy.data(), size}, 0)) != size)
    return fail(Errc::Protocol, "sealed extent shorter than its payload");
  return copy;
}
}  // namespace

PeerTrust::PeerTrust(const shm::Segment& seg, int side, BufferTable& table)
    : seg_(seg),
      table_(table),
      slot_size_(seg.geometry().slot_size),
      untrusted_me_(((seg.geometry().untrusted_mask >> side) & 1u) != 0),
      untrusted_peer_(((seg.geometry().untrusted_mask >> (1 - side)) & 1u) != 0),
      copy_threshold_(seg.geometry().copy_threshold) {
  // All allocation here, never per message. The geometry is the segment creator's, i.e. for a
  // connecting client the peer's: up to 2 * 448 slots of 16 MiB. Out of memory is an error of
  // Endpoint::make (copies_ok()), never an exception out of connect() or pair().
  if (untrusted_me_)
    slot_shadow_.reset(new (std::nothrow)
                           std::byte[std::size_t{2} * seg.geometry().slots_per_side * slot_size_]);
}

// ---- what the peer sends -----------------------------------------------------------------------

const char* PeerTrust::map_extent_fd(int fd, bool announced_sealed, os::Access unsealed_access,
                                     std::uint32_t payload, os::Mapping* map, bool* sealed) {
  // Only a memfd sealed against shrinking can be mapped without risking SIGBUS later.
  auto seals = os::get_seals(fd);
  if (!seals || (*seals & os::kSealsFixedSize) != os::kSealsFixedSize)
    return "extent memfd not sealed against shrinking";
  *sealed = (*seals & os::kSealsImmutable) == os::kSealsImmutable;
  if (announced_sealed && !*sealed)
    return "extent announced sealed lacks F_SEAL_WRITE|SHRINK|GROW|SEAL";
  auto fsize = os::file_size(fd);
  if (!fsize || *fsize == 0 || *fsize > shm::kMaxExtentSize) return "extent size";
  if (os::is_hugetlb(fd)) {
    // On hugetlbfs only F_SEAL_WRITE stops the peer from punching a page out of a file we map: a
    // later fault on the hole SIGBUSes when the pool has no free page (shmem would give zeros).
    if (!*sealed) return "extent on huge pages not sealed against writing";
    // Our MAP_PRIVATE view reserves huge pages for the file's whole length: only for pages the
    // peer holds itself (a sparse file would make us reserve the pool for nothing).
    auto info = os::file_info(fd);
    if (!info || info->allocated < *fsize) return "extent on huge pages has holes";
  }
  // Immutable: copy-on-write (no writable shared mapping of it can exist). On hugetlbfs, when the
  // pool cannot reserve the view, the extent is refused (no private copy of a peer's file: the
  // same file sent as many extents would be copied as many times). Faulted in as far as the
  // payload only: the file may be a sparse 4 GiB (the peer budget).
  auto m = os::Mapping::map_shared(fd, *fsize, *sealed ? os::Access::CopyOnWrite : unsealed_access);
  if (!m) return "extent mmap failed";
  m->populate(payload);
  *map = std::move(*m);
  return nullptr;
}

const char* PeerTrust::install_peer_extent(PeerExtent& pe, os::UniqueFd fd, bool announced_sealed,
                                           std::uint32_t gen, std::uint32_t size) const {
  // Untrusted: read-only, answers go back with pwrite (P5b). Else shared, read-write: the answer
  // is written in place.
  os::Mapping map;
  bool sealed = false;
  if (const char* why = map_extent_fd(fd.get(), announced_sealed,
                                      untrusted_me_ ? os::Access::ReadOnly : os::Access::ReadWrite,
                                      size, &map, &sealed))
    return why;
  pe.map = std::move(map);
  pe.fd = std::move(fd);
  pe.gen = gen;
  pe.sealed = sealed;
  return nullptr;
}

const char* PeerTrust::check_peer_payload(const PeerExtent& pe, std::uint32_t size) const noexcept {
  if (size > pe.map.size()) return "receive: payload larger than its extent";
  if (needs_sealed(size) && !pe.sealed)
    return "receive (untrusted): payload above copy_threshold not in a sealed memfd";
  return nullptr;
}

const char* PeerTrust::check_replacement(int fd, bool announced_sealed, std::uint32_t size,
                                         os::Mapping* map, bool* sealed) const {
  if (const char* why =
          map_extent_fd(fd, announced_sealed, os::Access::ReadWrite, size, map, sealed))
    return why;
  if (needs_sealed(size) && !*sealed)
    return "reply (untrusted): answer above copy_threshold not in a sealed memfd";
  if (map->size() < size) return "reply: replacement smaller than the answer";
  return nullptr;
}

// ---- what we send ------------------------------------------------------------------------------

bool PeerTrust::shadowed(const Buffer& b) const noexcept {
  if (!untrusted_me_ || b.data_ == nullptr) return false;
  const BufferId id = BufferId::from_wire(b.id_);
  if (!id.is_extent()) return b.data_ != seg_.slot(id.slot_index());
  return b.data_ != (b.origin_ == Buffer::Origin::Own ? table_.own_extent(id).map.data()
                                                      : table_.peer_extent(id)->map.data());
}

Status PeerTrust::fresh_extent(OwnExtent& x, const std::byte* src, std::size_t size,
                               std::size_t cap, bool huge) {
  MBMQ_ASSERT(size <= cap);
  auto m = MBMQ_TRY(BufferTable::make_extent_memory(cap, huge));
  if (size > 0) std::memcpy(m.map.data(), src, size);
  x.fd = std::move(m.fd);
  x.map = std::move(m.map);
  x.huge = m.huge;
  x.sealed = false;
  x.gen = table_.take_extent_gen();
  x.sent_gen = 0;
  return {};
}

Status PeerTrust::seal_extent(OwnExtent& x, std::size_t size) {
  // (P3c) No writable shared mapping may exist for F_SEAL_WRITE: drop ours first.
  const std::size_t cap = x.map.size();
  x.map.reset();
  Status s = seal_unmapped(x, cap, size);
  if (!s && !x.map.valid()) {
    // Map the bytes back: writable and shared while the file is unsealed, else copy-on-write
    // (then it is immutable: a new generation, sent as sealed). Failing that, x.map stays empty
    // and the caller drops the buffer.
    auto seals = os::get_seals(x.fd.get());
    const bool immutable = seals && (*seals & os::kSealsImmutable) == os::kSealsImmutable;
    auto m = immutable ? sealed_view(x.fd.get(), cap, size)
                       : os::Mapping::map_shared(x.fd.get(), cap, os::Access::ReadWrite);
    if (m) {
      x.map = std::move(*m);
      if (immutable && !x.sealed) {
        x.sealed = true;
        x.gen = table_.take_extent_gen();
        x.sent_gen = 0;
      }
    }
  }
  return s;
}

Status PeerTrust::seal_unmapped(OwnExtent& x, std::size_t cap, std::size_t size) {
  if (!os::add_seals(x.fd.get(), os::kSealWrite | os::kSealSeal)) {
    // Someone else still maps it writable (or it may not be sealed): seal a fresh copy instead.
    auto back = MBMQ_TRY(os::Mapping::map_shared(x.fd.get(), cap, os::Access::ReadOnly));
    MBMQ_TRY(fresh_extent(x, back.data(), size, cap, /*huge=*/true));
    cap = x.map.size();
    x.map.reset();
    MBMQ_TRY(os::add_seals(x.fd.get(), os::kSealWrite | os::kSealSeal));
  }
  x.map = MBMQ_TRY(sealed_view(x.fd.get(), cap, size));
  x.sealed = true;
  x.gen = table_.take_extent_gen();
  x.sent_gen = 0;
  return {};
}

bool PeerTrust::seals(const Buffer& b) const noexcept {
  const BufferId id = BufferId::from_wire(b.id_);
  return id.is_extent() && (table_.own_extent(id).sealed || must_seal(b.size_));
}

Status PeerTrust::prepare_send(Buffer& b) {
  const BufferId id = BufferId::from_wire(b.id_);
  if (!id.is_extent()) {
    if (shadowed(b)) std::memcpy(seg_.slot(id.slot_index()), b.data_, b.size_);  // (P5b) back
    return {};
  }
  OwnExtent& x = table_.own_extent(id);
  const bool view = b.data_ == x.map.data();
  if (x.sealed || (x.huge && !must_seal(b.size_))) {
    // Sealed: its bytes are in our private view (or a private copy): they go out in a fresh
    // extent. On huge pages but no longer to be sealed (resized below copy_threshold): 4 KiB
    // pages, which an untrusted peer can answer with pwrite() (hugetlbfs has no write()).
    MBMQ_TRY(fresh_extent(x, b.data_, b.size_, x.map.size(), must_seal(b.size_)));
    if (view) b.data_ = x.map.data();  // the view was the old mapping, now gone
  } else if (shadowed(b)) {
    std::memcpy(x.map.data(), b.data_, b.size_);
  }
  if (must_seal(b.size_)) {
    Status sealed = seal_extent(x, b.size_);
    if (!sealed) {
      if (x.map.valid() && (view || !shadowed(b))) {
        b.data_ = x.map.data();
        b.capacity_ = static_cast<std::uint32_t>(x.map.size());
      }
      b.gen_ = x.gen;
      return sealed;
    }
  }
  b.data_ = x.map.data();
  b.capacity_ = static_cast<std::uint32_t>(x.map.size());
  b.gen_ = x.gen;
  return {};
}

Result<PeerTrust::Replacement> PeerTrust::make_replacement(const std::byte* src,
                                                           std::uint32_t size) const {
  const std::size_t cap = std::max<std::size_t>(4096, (std::size_t{size} + 4095) / 4096 * 4096);
  Replacement r{MBMQ_TRY(os::make_sealed_memfd("mbmq-reply", cap)), shm::kExtentReplace};
  if (size > 0) MBMQ_TRY(os::pwrite_full(r.fd.get(), {src, size}, 0));  // no mapping to drop
  if (must_seal(size)) {
    MBMQ_TRY(os::add_seals(r.fd.get(), os::kSealWrite | os::kSealSeal));
    r.aux |= shm::kExtentSealed;
  }
  return r;
}

Status PeerTrust::write_back_answer(const Buffer& b, std::uint32_t size) {
  if (!shadowed(b)) return {};
  const BufferId id = BufferId::from_wire(b.id_);
  if (id.is_extent()) return os::pwrite_full(table_.peer_extent(id)->fd.get(), {b.data_, size}, 0);
  std::memcpy(seg_.slot(id.slot_index()), b.data_, size);
  return {};
}

// ---- what we read ------------------------------------------------------------------------------

const char* PeerTrust::prepare_copy(BufferId id, std::uint32_t size, bool own) noexcept {
  if (!untrusted_me_ || !id.is_extent()) return nullptr;
  std::vector<std::byte>* shadow = nullptr;
  std::uint32_t cap = 0;
  if (own) {
    OwnExtent& x = table_.own_extent(id);
    if (x.sealed) return nullptr;
    shadow = &x.shadow;
    cap = own_copy_cap(table_.own_capacity(id), size);
  } else {
    PeerExtent* pe = table_.peer_extent(id);
    if (pe == nullptr || pe->sealed) return nullptr;
    shadow = &pe->shadow;
    cap = peer_copy_cap(static_cast<std::uint32_t>(pe->map.size()), size);
  }
  if (shadow->size() >= cap) return nullptr;
  if (table_.shadow_bytes() + cap > shm::kRetainedCopyBytes) table_.free_idle_shadows();
  try {
    shadow->resize(cap);  // grows, then reused for the next messages in this extent
  } catch (const std::bad_alloc&) {
    return "receive (untrusted): out of memory for the private copy of a payload";
  }
  return nullptr;
}

std::uint32_t PeerTrust::own_copy_cap(std::uint32_t cap, std::uint32_t size) const noexcept {
  // The answer's size, at least slot_size: an 8-byte answer in a 64 MiB extent is not 64 MiB.
  return std::min({cap, copy_threshold_, std::max(page_round(size), slot_size_)});
}

std::uint32_t PeerTrust::peer_copy_cap(std::uint32_t cap, std::uint32_t size) const noexcept {
  // The payload's size (what the answer may grow to in place), at least slot_size, never the
  // whole file: a peer announcing a sparse 4 GiB extent with an 8-byte payload must not make us
  // allocate 4 GiB.
  return std::min({cap, copy_threshold_, std::max(page_round(size), slot_size_)});
}

void PeerTrust::own_view(Buffer& b, std::uint32_t size) {
  const BufferId id = BufferId::from_wire(b.id_);
  std::byte* shared = table_.own_data(id);
  const std::uint32_t cap = table_.own_capacity(id);
  if (id.is_extent()) b.gen_ = table_.own_extent(id).gen;
  b.data_ = shared;
  b.capacity_ = cap;
  if (!untrusted_me_) return;
  if (!id.is_extent()) {
    b.data_ = slot_shadow(id.slot_index());
  } else {
    OwnExtent& x = table_.own_extent(id);
    if (x.sealed) return;  // immutable for the peer: nothing to copy
    const std::uint32_t shadow_cap = own_copy_cap(cap, size);
    if (x.shadow.size() < shadow_cap) x.shadow.resize(shadow_cap);  // prepare_copy() did it
    b.data_ = x.shadow.data();
    b.capacity_ = shadow_cap;
  }
  std::memcpy(b.data_, shared, size);  // (P5b) the one copy; later peer writes change nothing
}

void PeerTrust::peer_view(Buffer& b, std::uint32_t size) {
  const BufferId id = BufferId::from_wire(b.id_);
  if (id.is_extent()) {
    PeerExtent& pe = *table_.peer_extent(id);
    b.data_ = pe.map.data();
    b.capacity_ = static_cast<std::uint32_t>(pe.map.size());
    if (untrusted_me_ && !pe.sealed) {
      // (P5b) The one copy, before the application sees a byte (allocated by prepare_copy()).
      const std::uint32_t cap = peer_copy_cap(b.capacity_, size);
      if (pe.shadow.size() < cap) pe.shadow.resize(cap);
      std::memcpy(pe.shadow.data(), pe.map.data(), size);
      b.data_ = pe.shadow.data();
      b.capacity_ = cap;
    }
    return;
  }
  b.data_ = seg_.slot(id.slot_index());
  b.capacity_ = slot_size_;
  if (untrusted_me_) {
    std::memcpy(slot_shadow(id.slot_index()), b.data_, size);  // (P5b)
    b.data_ = slot_shadow(id.slot_index());
  }
}

}  // namespace mbmq::detail
