#include "os/syscall_count.h"

namespace mbmq::os::detail {
thread_local std::uint64_t tls_syscalls = 0;
}
