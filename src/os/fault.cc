#include "os/fault.h"

#include <unistd.h>

#include <array>
#include <atomic>
#include <cerrno>
#include <csignal>
#include <cstdlib>
#include <cstring>

namespace mbmq::os {

namespace {

constexpr std::array<const char*, static_cast<std::size_t>(Fault::kCount)> kNames = {
    "memfd_create", "ftruncate",  "mmap",      "sendmsg",  "recvmsg", "socketpair",
    "futex_wait",   "futex_wake", "epoll_ctl", "sendfile", "splice"};

struct Armed {
  std::atomic<std::uint32_t> calls{0};
  std::uint32_t after = 0, times = 0;
  int err = 0;
  bool on = false;
};
std::array<Armed, static_cast<std::size_t>(Fault::kCount)> g_armed;

int default_errno(Fault f) {
  switch (f) {
    case Fault::MemfdCreate:
      return EMFILE;
    case Fault::Ftruncate:
    case Fault::Mmap:
      return ENOMEM;
    case Fault::SendMsg:
      return ENOBUFS;
    case Fault::Sendfile:
    case Fault::Splice:
      return EINVAL;  // what the kernel says when it cannot do it for these fds
    default:
      return EIO;
  }
}

// MBMQ_FAIL=name[:after[:times]][,name...] and MBMQ_CRASH_AT=point, read once at start-up.
struct FromEnvironment {
  // noexcept: it runs during static initialization, where an exception could not be caught.
  FromEnvironment() noexcept {
    if (const char* c = std::getenv("MBMQ_CRASH_AT"); c != nullptr && *c != '\0')
      detail::g_crash_at.store(c, std::memory_order_relaxed);
    const char* f = std::getenv("MBMQ_FAIL");
    if (f == nullptr) return;
    std::string_view spec(f);
    while (!spec.empty()) {
      std::size_t comma = spec.find(',');
      std::string_view one = spec.substr(0, comma);
      spec = comma == std::string_view::npos ? std::string_view() : spec.substr(comma + 1);
      std::string_view name = one.substr(0, one.find(':'));
      std::uint32_t after = 0, times = 0;
      if (std::size_t c1 = one.find(':'); c1 != std::string_view::npos) {
        after = static_cast<std::uint32_t>(std::strtoul(one.data() + c1 + 1, nullptr, 10));
        if (std::size_t c2 = one.find(':', c1 + 1); c2 != std::string_view::npos)
          times = static_cast<std::uint32_t>(std::strtoul(one.data() + c2 + 1, nullptr, 10));
      }
      for (std::size_t i = 0; i < kNames.size(); ++i)
        if (name == kNames[i]) arm_failure(static_cast<Fault>(i), after, times, 0);
    }
  }
};

}  // namespace

namespace detail {
std::atomic<bool> g_faults_armed{false};
std::atomic<const char*> g_crash_at{nullptr};

bool fault_fires(Fault f) noexcept {
  Armed& a = g_armed[static_cast<std::size_t>(f)];
  if (!a.on) return false;
  std::uint32_t n = a.calls.fetch_add(1, std::memory_order_relaxed);
  return n >= a.after && (a.times == 0 || n < a.after + a.times);
}

void crash_here(const char* point) noexcept {
  const char* at = g_crash_at.load(std::memory_order_relaxed);
  if (at == nullptr || std::strcmp(point, at) != 0) return;
  ::kill(::getpid(), SIGKILL);  // as abrupt as a crash gets: no destructor, no flush
  ::_exit(137);
}
}  // namespace detail

const char* fault_name(Fault f) noexcept { return kNames[static_cast<std::size_t>(f)]; }

int fault_errno(Fault f) noexcept {
  const Armed& a = g_armed[static_cast<std::size_t>(f)];
  return a.err != 0 ? a.err : default_errno(f);
}

void arm_failure(Fault f, std::uint32_t after, std::uint32_t times, int err) noexcept {
  Armed& a = g_armed[static_cast<std::size_t>(f)];
  a.calls.store(0, std::memory_order_relaxed);
  a.after = after;
  a.times = times;
  a.err = err;
  a.on = true;
  detail::g_faults_armed.store(true, std::memory_order_relaxed);
}

void disarm_failures() noexcept {
  for (auto& a : g_armed) a.on = false;
  detail::g_faults_armed.store(false, std::memory_order_relaxed);
}

void arm_crash_point(const char* point) noexcept {
  detail::g_crash_at.store(point, std::memory_order_relaxed);
}

std::string_view crash_points_list() noexcept {
  return "connect.sent_hello,connect.got_verdict,listen.got_hello,listen.sent_verdict,"
         "call.sent,call.got_reply,receive.got_request,reply.before_send,reply.sent,send.sent,"
         "close.before";
}

namespace {
const FromEnvironment g_from_environment;
}

}  // namespace mbmq::os
