// os/memfd.h: anonymous shared memory. Segments are memfds sealed against shrinking and growing,
// so a peer can never truncate a mapping under us (which would turn reads into SIGBUS), and
// nothing is ever named in /dev/shm: the memory disappears with its last fd and mapping.
#pragma once

#include <cstddef>
#include <cstdint>

#include "mbmq/result.h"
#include "os/fd.h"
#include "os/file.h"

namespace mbmq::os {

inline constexpr unsigned kSealsFixedSize = kSealShrink | kSealGrow;

// memfd_create(MFD_CLOEXEC|MFD_ALLOW_SEALING) + ftruncate(size) + the fixed-size seals.
Result<UniqueFd> make_sealed_memfd(const char* name, std::size_t size);
// The seals on fd (F_GET_SEALS); Errc::System/EINVAL for an fd that is not a memfd.
Result<unsigned> get_seals(int fd);
// The fd's size (fstat st_size).
Result<std::uint64_t> file_size(int fd);

}  // namespace mbmq::os
