// os/mapping.h: Mapping, the move-only owner of an mmap'd range (unmapped on destruction).
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>

#include "mbmq/result.h"

namespace mbmq::os {

// ReadWrite / ReadOnly: MAP_SHARED (both peers see the same pages). CopyOnWrite: MAP_PRIVATE,
// readable and writable, writes stay in this process (the kernel copies a page on its first
// write); allowed on a memfd sealed with F_SEAL_WRITE, unlike a writable shared mapping.
enum class Access { ReadWrite, ReadOnly, CopyOnWrite };
// Prefault::Yes maps every page at once (see map()). Prefault::Huge does the same for a writable
// shared mapping of 2 MiB or more, asking first for transparent huge pages (MADV_HUGEPAGE, then
// MADV_POPULATE_WRITE): where the machine allows them for shared memory
// (/sys/kernel/mm/transparent_hugepage/shmem_enabled = advise, within_size or always) a 16 MiB
// memfd is then 8 page-table entries instead of 4096 (measured here: preparing fresh pages
// 0.8-1.9 ms instead of 7-13 ms, and the sealed send's unmap/map 0.03 ms instead of 1.3-6 ms);
// elsewhere it costs one hint call. Other mappings: as Yes.
enum class Prefault { No, Yes, Huge };
inline constexpr std::size_t kHugePageSize = std::size_t{2} << 20;

class Mapping {
 public:
  Mapping() noexcept = default;
  // Maps `size` bytes of `fd` from offset 0, MAP_SHARED (both peers see the same pages).
  static Result<Mapping> map_shared(int fd, std::size_t size, Access access,
                                    Prefault prefault = Prefault::No) {
    return map(fd, 0, size, access, prefault);
  }
  // Maps `size` bytes of `fd` from `offset` (a multiple of the page size). prefault: map every
  // page now (MAP_POPULATE; for CopyOnWrite, MADV_POPULATE_READ, which keeps pages shared until
  // written): one call instead of a page fault per 4 KiB page, which costs ~12 us on this VM.
  static Result<Mapping> map(int fd, std::uint64_t offset, std::size_t size, Access access,
                             Prefault prefault = Prefault::No);

  // `size` bytes of private anonymous memory (MAP_PRIVATE|MAP_ANONYMOUS, read-write, zeroed,
  // allocated as touched).
  static Result<Mapping> anonymous(std::size_t size);

  // Faults in the first `bytes` bytes now (MADV_POPULATE_READ; a hint, errors ignored): a peer's
  // extent is populated as far as its payload, never the whole file (a sparse 4 GiB memfd would
  // make us allocate 4 GiB).
  void populate(std::size_t bytes) noexcept;
  Mapping(Mapping&& o) noexcept
      : addr_(std::exchange(o.addr_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  Mapping& operator=(Mapping&& o) noexcept {
    if (this != &o) {
      reset();
      addr_ = std::exchange(o.addr_, nullptr);
      size_ = std::exchange(o.size_, 0);
    }
    return *this;
  }
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  ~Mapping() { reset(); }

  // Takes over a mapping made earlier (addr, size from release()); it is unmapped on destruction.
  static Mapping adopt(void* addr, std::size_t size) noexcept {
    Mapping m;
    m.addr_ = addr;
    m.size_ = size;
    return m;
  }
  // Gives up ownership: the caller unmaps (e.g. through adopt()).
  void* release() noexcept {
    size_ = 0;
    return std::exchange(addr_, nullptr);
  }

  std::byte* data() const noexcept { return static_cast<std::byte*>(addr_); }
  std::size_t size() const noexcept { return size_; }
  bool valid() const noexcept { return addr_ != nullptr; }
  void reset() noexcept;

 private:
  void* addr_ = nullptr;
  std::size_t size_ = 0;
};

}  // namespace mbmq::os
