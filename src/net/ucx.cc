// net/ucx.cc: loading UCX lazily, with its process-wide side effects off (net/ucx.h).
#include "net/ucx.h"

#include <dlfcn.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <mutex>

#include "os/process.h"

namespace mbmq::net::detail {
namespace {

Ucx g_ucx;        // written once, under g_once
Error g_error{};  // why loading failed, if it did
// Release-stored once, under g_once, after g_ucx and g_pid; acquire-loaded by every check.
std::atomic<bool> g_loaded{false};
pid_t g_pid = 0;  // the process that loaded UCX: written before g_loaded's release store
std::once_flag g_once;

// The defaults mbmq sets before UCX reads its environment (overwrite = 0: a variable the user set
// wins). UCX reads UCX_ERROR_SIGNALS and the UCX_MEM_* options in libucs's and libucm's load-time
// constructors, so ucp_config_modify() would be too late for them: they must be in the
// environment before dlopen().
constexpr const char* kDefaults[][2] = {
    {"UCX_ERROR_SIGNALS", ""},           // no SIGSEGV/SIGBUS/SIGILL/SIGFPE handlers
    {"UCX_DEBUG_SIGNO", "0"},            // no SIGHUP handler (UCX's "enter debug mode" signal)
    {"UCX_MEM_MALLOC_HOOKS", "n"},       // no malloc hooks
    {"UCX_MEM_MMAP_HOOK_MODE", "none"},  // no mmap/munmap/brk hooks
    {"UCX_MEM_EVENTS", "n"},             // and no memory-event machinery at all
    {"UCX_TCP_CM_REUSEADDR", "y"},       // a restarted server binds its port at once
    {"UCX_HANDLE_ERRORS", "none"},       // no backtrace-and-freeze on a fatal error
};

void load() {
  // setenv is not thread-safe against a concurrent getenv: it runs once, before UCX exists
  // (net/ucx.h says so; the README asks for UCX_* to be set before threads that read it start).
  for (const auto& kv : kDefaults)
    (void)::setenv(kv[0], kv[1], 0);  // NOLINT(concurrency-mt-unsafe)
  void* lib = ::dlopen("libucp.so.0", RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) {
    g_error = Error::make(Errc::System, "net: cannot load libucp.so.0 (Debian: libucx0)");
    return;
  }
  bool all = true;
#define MBMQ_UCX_LOAD(name)                                              \
  g_ucx.name = reinterpret_cast<decltype(&::name)>(::dlsym(lib, #name)); \
  all = all && g_ucx.name != nullptr;
  MBMQ_UCX_FUNCTIONS(MBMQ_UCX_LOAD)
#undef MBMQ_UCX_LOAD
  if (!all) {
    g_error =
        Error::make(Errc::System, "net: libucp.so.0 lacks a function mbmq needs (UCX < 1.13?)");
    return;
  }
  ucp_config_t* config = nullptr;
  if (g_ucx.ucp_config_read(nullptr, nullptr, &config) != UCS_OK) {
    g_error = Error::make(Errc::System, "net: ucp_config_read failed");
    return;
  }
  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_MT_WORKERS_SHARED;
  params.features = UCP_FEATURE_AM | UCP_FEATURE_WAKEUP;
  params.mt_workers_shared = 1;  // workers of several threads share the context
  const ucs_status_t s =
      g_ucx.ucp_init_version(UCP_API_MAJOR, UCP_API_MINOR, &params, config, &g_ucx.context);
  g_ucx.ucp_config_release(config);
  if (s != UCS_OK) {
    g_error = Error::make(Errc::System, "net: ucp_init failed");
    return;
  }
  g_pid = os::current_pid();
  g_loaded.store(true, std::memory_order_release);  // pairs with the acquire loads below
  // Registered after dlopen(): it runs before the loaded libraries' destructors (exit() runs the
  // handlers in reverse order of registration, and the loader's, which runs those destructors,
  // was registered at start-up). If it cannot be registered, exit stays as it was before.
  (void)std::atexit(before_exit);
}

std::atomic<bool> g_exiting{false};

}  // namespace

Status check_not_forked() noexcept {
  if (g_loaded.load(std::memory_order_acquire) && g_pid != os::current_pid())
    return fail(Errc::InvalidArgument,
                "net: UCX cannot be used in a child forked after it was loaded (use it before "
                "fork() in the parent only, or exec)");
  return {};
}

bool ucx_usable() noexcept {
  return g_loaded.load(std::memory_order_acquire) && g_pid == os::current_pid();
}

bool exiting() noexcept { return g_exiting.load(std::memory_order_acquire); }

void before_exit() noexcept {
  // A forked child has no keeper or allocating thread, and their locks may have been copied held.
  if (!ucx_usable()) return;
  // (K7) What close() left to the keeper, within 100 ms.
  (void)finish_kept(Deadline::after(std::chrono::milliseconds(100)));
  // Pairs with the acquire loads in exiting(): a pass that starts after this leaves UCX alone.
  g_exiting.store(true, std::memory_order_release);
  wait_for_passes();
}

Result<const Ucx*> ucx() {
  MBMQ_TRY(check_not_forked());
  std::call_once(g_once, load);
  if (!g_loaded.load(std::memory_order_acquire)) return fail(g_error);
  return &g_ucx;
}

}  // namespace mbmq::net::detail
