#include "os/syscall_count.h"

namespace mbmq::os {

namespace {
thread_local std::uint64_t tls_syscalls = 0;
thread_local std::uint64_t tls_yields = 0;
}  // namespace

void count_syscall() noexcept { ++tls_syscalls; }
std::uint64_t syscalls_this_thread() noexcept { return tls_syscalls; }
void count_yield() noexcept { ++tls_yields; }
std::uint64_t yields_this_thread() noexcept { return tls_yields; }
std::uint64_t work_syscalls_this_thread() noexcept { return tls_syscalls - tls_yields; }

}  // namespace mbmq::os
