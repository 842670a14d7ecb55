#include "os/process.h"

#include <dirent.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstring>

#include "os/mutex.h"
#include "os/syscall_count.h"

namespace mbmq::os {

namespace {
std::atomic<pid_t> g_pid{0};
void refresh_pid() noexcept { g_pid.store(::getpid(), std::memory_order_relaxed); }
}  // namespace

pid_t current_pid() noexcept {
  pid_t p = g_pid.load(std::memory_order_relaxed);
  if (p == 0) {
    static const bool registered = [] {
      ::pthread_atfork(nullptr, nullptr, refresh_pid);
      return true;
    }();
    (void)registered;
    count_syscall();
    p = ::getpid();
    g_pid.store(p, std::memory_order_relaxed);
  }
  return p;
}

void on_fork_child(void (*fn)()) noexcept {
  (void)current_pid();  // make sure the pid refresh handler runs first
  ::pthread_atfork(nullptr, nullptr, fn);
}

Result<pid_t> fork_process() {
  (void)current_pid();
  count_syscall();
  pid_t p = ::fork();
  if (p < 0) return fail(Error::from_syscall("fork", errno));
  return p;
}

Result<int> wait_process(pid_t pid) {
  int status = 0;
  for (;;) {
    count_syscall();
    pid_t r = ::waitpid(pid, &status, 0);
    if (r == pid) return status;
    if (r < 0 && errno == EINTR) continue;
    return fail(Error::from_syscall("waitpid", errno));
  }
}

Status kill_process(pid_t pid, int sig) {
  count_syscall();
  if (::kill(pid, sig) != 0) return fail(Error::from_syscall("kill", errno));
  return {};
}

void exit_now(int code) noexcept { ::_exit(code); }

Status pin_to_cpu(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(static_cast<unsigned>(cpu), &set);
  count_syscall();
  if (::sched_setaffinity(0, sizeof(set), &set) != 0)
    return fail(Error::from_syscall("sched_setaffinity", errno));
  return {};
}

void yield_cpu() noexcept {
  count_syscall();
  count_yield();
  (void)::sched_yield();
}

int cpu_count() noexcept {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (::sched_getaffinity(0, sizeof(set), &set) != 0) return 1;
  return CPU_COUNT(&set);
}

Result<std::pair<UniqueFd, UniqueFd>> make_pipe() {
  int p[2];
  count_syscall();
  if (::pipe2(p, O_CLOEXEC) != 0) return fail(Error::from_syscall("pipe2", errno));
  return std::pair<UniqueFd, UniqueFd>{UniqueFd(p[0]), UniqueFd(p[1])};
}

Result<std::size_t> read_full(int fd, std::span<std::byte> buf) {
  std::size_t done = 0;
  while (done < buf.size()) {
    count_syscall();
    ssize_t n = ::read(fd, buf.data() + done, buf.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return fail(Error::from_syscall("read", errno));
    if (n == 0) break;
    done += static_cast<std::size_t>(n);
  }
  return done;
}

Status write_full(int fd, std::span<const std::byte> buf) {
  std::size_t done = 0;
  while (done < buf.size()) {
    count_syscall();
    ssize_t n = ::write(fd, buf.data() + done, buf.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return fail(Error::from_syscall("write", errno));
    done += static_cast<std::size_t>(n);
  }
  return {};
}

long read_once(int fd, void* buf, std::size_t n) noexcept {
  count_syscall();
  return ::read(fd, buf, n);
}
long write_once(int fd, const void* buf, std::size_t n) noexcept {
  count_syscall();
  return ::write(fd, buf, n);
}

std::size_t open_fd_count() {
  std::size_t n = 0;
  if (DIR* d = ::opendir("/proc/self/fd")) {
    while (dirent* e = ::readdir(d))
      if (e->d_name[0] != '.') ++n;
    ::closedir(d);
    if (n > 0) --n;  // the DIR's own fd
  }
  return n;
}

std::size_t open_fd_count(const char* needle) {
  std::size_t n = 0;
  if (DIR* d = ::opendir("/proc/self/fd")) {
    while (dirent* e = ::readdir(d)) {  // the DIR's own fd links to /proc/<pid>/fd: no match
      if (e->d_name[0] == '.') continue;
      char target[256];
      const ssize_t len = ::readlinkat(::dirfd(d), e->d_name, target, sizeof target - 1);
      if (len <= 0) continue;  // closed meanwhile
      target[len] = '\0';
      if (std::strstr(target, needle) != nullptr) ++n;
    }
    ::closedir(d);
  }
  return n;
}

std::size_t resident_bytes() {
  std::size_t pages_total = 0, pages_resident = 0;
  if (FILE* f = std::fopen("/proc/self/statm", "r")) {
    // NOLINTNEXTLINE(cert-err34-c): the kernel prints two page counts that fit; a short read is 0.
    if (std::fscanf(f, "%zu %zu", &pages_total, &pages_resident) != 2) pages_resident = 0;
    (void)std::fclose(f);
  }
  return pages_resident * static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
}

std::vector<std::string> dir_listing(const char* path) {
  std::vector<std::string> names;
  if (DIR* d = ::opendir(path)) {
    while (dirent* e = ::readdir(d))
      if (std::strcmp(e->d_name, ".") != 0 && std::strcmp(e->d_name, "..") != 0)
        names.emplace_back(e->d_name);
    ::closedir(d);
  }
  std::sort(names.begin(), names.end());
  return names;
}

Result<pid_t> spawn_program(const std::string& path, const std::vector<std::string>& args,
                            int stdout_fd, int stderr_fd, int fd3,
                            const std::vector<std::string>& env_extra) {
  std::vector<char*> argv;
  argv.push_back(const_cast<char*>(path.c_str()));
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  posix_spawn_file_actions_t fa;
  ::posix_spawn_file_actions_init(&fa);
  if (stdout_fd >= 0) ::posix_spawn_file_actions_adddup2(&fa, stdout_fd, 1);
  if (stderr_fd >= 0) ::posix_spawn_file_actions_adddup2(&fa, stderr_fd, 2);
  if (fd3 >= 0) ::posix_spawn_file_actions_adddup2(&fa, fd3, 3);
  std::size_t inherited = 0;
  while (environ[inherited] != nullptr) ++inherited;
  std::vector<char*> envp;
  envp.reserve(env_extra.size() + inherited + 1);
  for (const auto& e : env_extra) envp.push_back(const_cast<char*>(e.c_str()));
  for (char** e = environ; *e != nullptr; ++e) {
    std::string_view kv(*e);
    bool overridden = false;
    for (const auto& x : env_extra)
      overridden |=
          kv.substr(0, kv.find('=') + 1) == std::string_view(x).substr(0, x.find('=') + 1);
    if (!overridden) envp.push_back(*e);
  }
  envp.push_back(nullptr);
  pid_t pid = 0;
  count_syscall();
  int rc = ::posix_spawn(&pid, path.c_str(), &fa, nullptr, argv.data(), envp.data());
  ::posix_spawn_file_actions_destroy(&fa);
  if (rc != 0) return fail(Error::from_syscall("posix_spawn", rc));
  return pid;
}

std::size_t mapping_count(const char* needle) {
  std::size_t n = 0;
  if (FILE* f = std::fopen("/proc/self/maps", "r")) {
    char line[4096];
    while (std::fgets(line, sizeof line, f) != nullptr)
      if (std::strstr(line, needle) != nullptr) ++n;
    (void)std::fclose(f);
  }
  return n;
}

std::size_t mapping_count() {
  std::size_t n = 0;
  if (FILE* f = std::fopen("/proc/self/maps", "r")) {
    for (int c; (c = std::fgetc(f)) != EOF;)
      if (c == '\n') ++n;
    (void)std::fclose(f);
  }
  return n;
}

}  // namespace mbmq::os

namespace mbmq::os {
unsigned current_uid() noexcept {
  count_syscall();
  return ::getuid();
}

Status become_user(unsigned uid, unsigned gid) {
  count_syscall();
  if (::setresgid(gid, gid, gid) != 0) return fail(Error::from_syscall("setresgid", errno));
  count_syscall();
  if (::setresuid(uid, uid, uid) != 0) return fail(Error::from_syscall("setresuid", errno));
  return {};
}
}  // namespace mbmq::os

#include <sys/prctl.h>

namespace mbmq::os {
void die_with_parent() noexcept {
  count_syscall();
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);
}
}  // namespace mbmq::os

#include <ctime>

namespace mbmq::os {
std::int64_t thread_cpu_ns() noexcept {
  timespec ts{};
  ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<std::int64_t>(ts.tv_sec) * 1'000'000'000 + ts.tv_nsec;
}

bool is_terminal(int fd) noexcept { return ::isatty(fd) == 1; }

std::int64_t process_cpu_ns() noexcept {
  timespec ts{};
  ::clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<std::int64_t>(ts.tv_sec) * 1'000'000'000 + ts.tv_nsec;
}

std::int64_t process_cpu_ns(pid_t pid) noexcept {
  clockid_t clk{};
  if (::clock_getcpuclockid(pid, &clk) != 0) return -1;
  timespec ts{};
  if (::clock_gettime(clk, &ts) != 0) return -1;
  return static_cast<std::int64_t>(ts.tv_sec) * 1'000'000'000 + ts.tv_nsec;
}

void ignore_sigpipe() noexcept { (void)::signal(SIGPIPE, SIG_IGN); }

namespace {
// Lock-free, hence async-signal-safe; relaxed: a count for the test to read, no data guarded.
std::atomic<std::uint64_t> g_interval_signals{0};
void on_interval_signal(int) { g_interval_signals.fetch_add(1, std::memory_order_relaxed); }

struct IntervalTimer {
  Mutex mu;
  bool running MBMQ_GUARDED_BY(mu) = false;
  timer_t timer MBMQ_GUARDED_BY(mu) = {};
  int signo MBMQ_GUARDED_BY(mu) = 0;
  struct sigaction previous MBMQ_GUARDED_BY(mu) {};
};
IntervalTimer& interval_timer() {
  static IntervalTimer t;
  return t;
}
}  // namespace

Status start_interval_signal(std::chrono::microseconds interval, int signo) {
  if (interval.count() <= 0) return fail(Errc::InvalidArgument, "start_interval_signal: interval");
  IntervalTimer& t = interval_timer();
  LockGuard lock(t.mu);
  if (t.running) return fail(Errc::Busy, "start_interval_signal: one is running");
  struct sigaction sa {};
  sa.sa_handler = on_interval_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = 0;  // no SA_RESTART: interrupted system calls fail with EINTR
  count_syscall();
  if (::sigaction(signo, &sa, &t.previous) != 0)
    return fail(Error::from_syscall("sigaction", errno));
  sigevent ev{};
  ev.sigev_notify = SIGEV_SIGNAL;
  ev.sigev_signo = signo;
  count_syscall();
  if (::timer_create(CLOCK_MONOTONIC, &ev, &t.timer) != 0) {
    int err = errno;
    ::sigaction(signo, &t.previous, nullptr);
    return fail(Error::from_syscall("timer_create", err));
  }
  const auto s = std::chrono::duration_cast<std::chrono::seconds>(interval);
  itimerspec spec{};
  spec.it_interval.tv_sec = static_cast<time_t>(s.count());
  spec.it_interval.tv_nsec = static_cast<long>((interval - s).count() * 1000);
  spec.it_value = spec.it_interval;
  g_interval_signals.store(0, std::memory_order_relaxed);
  count_syscall();
  if (::timer_settime(t.timer, 0, &spec, nullptr) != 0) {
    int err = errno;
    ::timer_delete(t.timer);
    ::sigaction(signo, &t.previous, nullptr);
    return fail(Error::from_syscall("timer_settime", err));
  }
  t.signo = signo;
  t.running = true;
  return {};
}

void stop_interval_signal() noexcept {
  IntervalTimer& t = interval_timer();
  LockGuard lock(t.mu);
  if (!t.running) return;
  count_syscall();
  ::timer_delete(t.timer);  // no new signals from here on
  // SIG_IGN discards one still pending (POSIX), which the previous action (often SIG_DFL:
  // terminate, for SIGALRM) must not receive.
  struct sigaction ignore {};
  ignore.sa_handler = SIG_IGN;
  sigemptyset(&ignore.sa_mask);
  count_syscall();
  ::sigaction(t.signo, &ignore, nullptr);
  count_syscall();
  ::sigaction(t.signo, &t.previous, nullptr);
  t.running = false;
}

std::uint64_t interval_signal_count() noexcept {
  return g_interval_signals.load(std::memory_order_relaxed);
}
}  // namespace mbmq::os

#include <sys/resource.h>

namespace mbmq::os {
std::uint64_t fd_limit() noexcept {
  rlimit r{};
  count_syscall();
  if (::getrlimit(RLIMIT_NOFILE, &r) != 0) return 1024;  // cannot fail; the usual default
  return r.rlim_cur == RLIM_INFINITY ? UINT64_MAX : static_cast<std::uint64_t>(r.rlim_cur);
}

Status set_fd_limit(std::uint64_t soft) {
  rlimit r{};
  count_syscall();
  if (::getrlimit(RLIMIT_NOFILE, &r) != 0) return fail(Error::from_syscall("getrlimit", errno));
  r.rlim_cur = soft == UINT64_MAX ? RLIM_INFINITY : static_cast<rlim_t>(soft);
  count_syscall();
  if (::setrlimit(RLIMIT_NOFILE, &r) != 0) return fail(Error::from_syscall("setrlimit", errno));
  return {};
}

std::uint64_t raise_fd_limit() noexcept {
  rlimit r{};
  count_syscall();
  if (::getrlimit(RLIMIT_NOFILE, &r) == 0) {
    const std::uint64_t hard = r.rlim_max == RLIM_INFINITY ? std::uint64_t{1} << 20
                                                           : static_cast<std::uint64_t>(r.rlim_max);
    if (fd_limit() < hard) (void)set_fd_limit(hard);
  }
  return fd_limit();
}

unsigned effective_uid() noexcept {
  count_syscall();
  return ::geteuid();
}

void sleep_ns(std::int64_t ns) noexcept {
  if (ns <= 0) return;
  timespec left{static_cast<time_t>(ns / 1'000'000'000), static_cast<long>(ns % 1'000'000'000)};
  // Relative: an EINTR hands back the time left in `left`, and we sleep that.
  for (;;) {
    count_syscall();
    if (::clock_nanosleep(CLOCK_MONOTONIC, 0, &left, &left) != EINTR) return;
  }
}
}  // namespace mbmq::os
