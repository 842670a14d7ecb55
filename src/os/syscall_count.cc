#include "os/syscall_count.h"

namespace mbmq::os {

namespace {
thread_local std::uint64_t tls_syscalls = 0;
}

void count_syscall() noexcept { ++tls_syscalls; }
std::uint64_t syscalls_this_thread() noexcept { return tls_syscalls; }

}  // namespace mbmq::os
