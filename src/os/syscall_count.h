// os/syscall_count.h: every system call made through the os/ layer is counted per thread, so
// benchmarks and tests can assert "zero syscalls per round trip" on the spinning path.
// Thread-local, so counting costs one non-atomic increment and no cache-line sharing.
#pragma once

#include <cstdint>

namespace mbmq::os {

namespace detail {
extern thread_local std::uint64_t tls_syscalls;
}

inline void count_syscall() noexcept { ++detail::tls_syscalls; }
// System calls this thread made through os/ since it started.
inline std::uint64_t syscalls_this_thread() noexcept { return detail::tls_syscalls; }

}  // namespace mbmq::os
