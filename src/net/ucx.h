// net/ucx.h: the process's UCX, loaded and initialized lazily (docs/design/net.md).
//
// libucp is not linked: it is dlopen()ed on the first listen()/connect(), after the environment
// turns off what loading UCX does to the whole process (libucs installs SIGSEGV/SIGBUS/SIGILL/
// SIGFPE handlers in its load-time constructor, and UCM hooks malloc/mmap), unless the user's own
// UCX_* variables say otherwise. Calls go through the function table Ucx. Programs that never use
// a ucx:// URL never load UCX at all.
//
// Fork: the pid that loaded UCX is recorded; check() returns Errc::InvalidArgument in any other
// process (a forked child), before anything touches UCX.
#pragma once

#include <ucp/api/ucp.h>

#include <cstdint>

#include "mbmq/deadline.h"
#include "mbmq/result.h"

namespace mbmq::net::detail {

#define MBMQ_UCX_FUNCTIONS(X)       \
  X(ucp_config_read)                \
  X(ucp_config_release)             \
  X(ucp_config_modify)              \
  X(ucp_init_version)               \
  X(ucp_worker_create)              \
  X(ucp_worker_destroy)             \
  X(ucp_worker_progress)            \
  X(ucp_worker_get_efd)             \
  X(ucp_worker_arm)                 \
  X(ucp_worker_signal)              \
  X(ucp_worker_set_am_recv_handler) \
  X(ucp_listener_create)            \
  X(ucp_listener_destroy)           \
  X(ucp_listener_query)             \
  X(ucp_listener_reject)            \
  X(ucp_conn_request_query)         \
  X(ucp_ep_create)                  \
  X(ucp_ep_close_nbx)               \
  X(ucp_am_send_nbx)                \
  X(ucp_am_recv_data_nbx)           \
  X(ucp_am_data_release)            \
  X(ucp_request_check_status)       \
  X(ucp_request_free)               \
  X(ucs_status_string)

struct Ucx {
// NOLINTNEXTLINE(bugprone-macro-parentheses): `name` is a declarator, not an expression
#define MBMQ_UCX_MEMBER(name) decltype(&::name) name = nullptr;
  MBMQ_UCX_FUNCTIONS(MBMQ_UCX_MEMBER)
#undef MBMQ_UCX_MEMBER
  ucp_context_h context = nullptr;
};

// The loaded UCX, loading and initializing it on first use. Errc::InvalidArgument in a forked
// child; Errc::System (op says why) if libucp.so.0 cannot be loaded or ucp_init fails.
Result<const Ucx*> ucx();
// Errc::InvalidArgument if UCX was loaded by another process (we are a forked child).
Status check_not_forked() noexcept;
// True in the process that loaded UCX (false before it is loaded, and in a forked child).
bool ucx_usable() noexcept;
// True once the process that loaded UCX began exit() (its handler, registered at load, ran).
// The two threads of mbmq::net that act on channels the application may have let go of, the
// keeper and the allocating thread, stop touching UCX then: exit goes on to UCX's library
// destructors, which free what a worker being progressed uses (net/keeper.cc, K6). The threads
// that serve the application's open channels (a redirected worker's pump, a Bridge's links) stop
// when those channels close: close them before exit (README).
bool exiting() noexcept;
// The exit handler itself (for tests: it is idempotent): gives lingering channels up to 100 ms,
// marks the process exiting, then waits
// (up to 2 s each) for the keeper's and the allocating thread's pass in progress, if any, and
// starts the receives still queued for the allocating thread.
void before_exit() noexcept;
// net::finish_closes(): finishes the channels close() left lingering (what they sent fetched by
// their peers) and their closes, on the calling thread, until done or `deadline`.
Status finish_kept(Deadline deadline) noexcept;
// Its second half (net/keeper.cc).
void wait_for_passes() noexcept;

}  // namespace mbmq::net::detail
