// os/fault.h: fault injection, for the reliability tests (docs/RELIABILITY.md). Inactive unless a
// test arms it; then the cost on every guarded call is one relaxed atomic load.
//
// Crash points: MBMQ_CRASH_POINT("call.sent") in the library marks a step of a protocol. If the
// environment variable MBMQ_CRASH_AT names it when the process starts (or arm_crash_point() was
// called), the process SIGKILLs itself there: a crash at exactly that step, as the peer sees it.
//
// System-call failures: the os/ wrappers of the calls below ask injected() first. If the call is
// armed (MBMQ_FAIL=name[:after[:times]] in the environment, or arm_failure()), it fails with the
// given errno without reaching the kernel: `after` calls pass first, then `times` fail (0: all).
#pragma once

#include <atomic>
#include <cstdint>
#include <string_view>

namespace mbmq::os {

enum class Fault : std::uint8_t {
  MemfdCreate,
  Ftruncate,
  Mmap,
  SendMsg,
  RecvMsg,
  SocketPair,
  FutexWait,
  FutexWake,
  EpollCtl,
  Sendfile,
  Splice,
  kCount
};
const char* fault_name(Fault f) noexcept;

namespace detail {
extern std::atomic<bool> g_faults_armed;
extern std::atomic<const char*> g_crash_at;
bool fault_fires(Fault f) noexcept;
void crash_here(const char* point) noexcept;
}  // namespace detail

// True if this call of `f` must fail (the caller returns the fault's errno).
inline bool injected(Fault f) noexcept {
  return detail::g_faults_armed.load(std::memory_order_relaxed) && detail::fault_fires(f);
}
int fault_errno(Fault f) noexcept;

// For tests in one process (call before starting threads that use the library).
void arm_failure(Fault f, std::uint32_t after, std::uint32_t times, int err) noexcept;
void disarm_failures() noexcept;
void arm_crash_point(const char* point) noexcept;

// Every crash point compiled into the library, for the tests that walk them all.
std::string_view crash_points_list() noexcept;  // comma-separated

}  // namespace mbmq::os

#define MBMQ_CRASH_POINT(name)                                                     \
  do {                                                                             \
    if (::mbmq::os::detail::g_crash_at.load(std::memory_order_relaxed) != nullptr) \
      ::mbmq::os::detail::crash_here(name);                                        \
  } while (0)
