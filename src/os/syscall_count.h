// os/syscall_count.h: every system call made through the os/ layer is counted per thread, so
// benchmarks and tests can assert "zero syscalls per round trip" on the spinning path.
// Thread-local, so counting costs one non-atomic increment and no cache-line sharing. (The
// counter is internal to syscall_count.cc: an extern thread_local used from headers trips GCC's
// TLS wrapper under UBSan.)
#pragma once

#include <cstdint>

namespace mbmq::os {

void count_syscall() noexcept;
// System calls this thread made through os/ since it started.
std::uint64_t syscalls_this_thread() noexcept;
// Of those, the sched_yield()s of a spinning waiter that found nothing for its spin budget
// (yield_cpu()): made only while idle, never per message; tests tell them apart.
void count_yield() noexcept;
std::uint64_t yields_this_thread() noexcept;
// syscalls_this_thread() less yields_this_thread(): what "no system call per message" is about.
std::uint64_t work_syscalls_this_thread() noexcept;

}  // namespace mbmq::os
