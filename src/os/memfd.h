// os/memfd.h: anonymous shared memory. Segments are memfds sealed against shrinking and growing,
// so a peer can never truncate a mapping under us (which would turn reads into SIGBUS), and
// nothing is ever named in /dev/shm: the memory disappears with its last fd and mapping.
#pragma once

#include <cstddef>
#include <cstdint>

#include "mbmq/result.h"
#include "os/fd.h"
#include "os/file.h"
#include "os/mapping.h"

namespace mbmq::os {

inline constexpr unsigned kSealsFixedSize = kSealShrink | kSealGrow;

// memfd_create(MFD_CLOEXEC|MFD_ALLOW_SEALING) + ftruncate(size) + the fixed-size seals.
Result<UniqueFd> make_sealed_memfd(const char* name, std::size_t size);
// The same on hugetlbfs (MFD_HUGETLB, 2 MiB pages: `size` must be a multiple of kHugePageSize),
// with every huge page allocated now (fallocate): so a first touch can never SIGBUS for want of a
// huge page. Fails (Errc::System) where the kernel has no hugetlbfs or the pool has too few free
// pages (vm.nr_hugepages; ENOSPC/ENOMEM): the caller falls back to make_sealed_memfd. Not subject
// to fault injection (os/fault.h): its failure is a normal outcome, and the fallback is.
Result<UniqueFd> make_hugetlb_memfd(const char* name, std::size_t size);
// fd is a file on hugetlbfs (fstatfs). Its mappings must be multiples of kHugePageSize (its
// size always is), and a MAP_PRIVATE mapping of it reserves huge pages for its whole length.
bool is_hugetlb(int fd) noexcept;
// MBMQ_HUGETLB=1 in the environment: sealed extents may go on huge pages (make_hugetlb_memfd).
// Off by default: a receiver's private view of such a file reserves huge pages of the machine's
// pool, and a child it forks that writes the view can die of SIGBUS when the pool is empty
// (README, #16).
bool hugetlb_opted_in() noexcept;
// The seals on fd (F_GET_SEALS); Errc::System/EINVAL for an fd that is not a memfd.
Result<unsigned> get_seals(int fd);
// The fd's size (fstat st_size).
Result<std::uint64_t> file_size(int fd);

}  // namespace mbmq::os
