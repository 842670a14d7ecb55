// os/process.h: processes, pipes and CPU affinity, for the library (fork-safety, pid caching),
// its tests and its benchmark.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "mbmq/result.h"
#include "os/fd.h"

namespace mbmq::os {

// getpid(), cached; refreshed in a child by a pthread_atfork handler (no syscall on the hot path).
pid_t current_pid() noexcept;
// Registers `fn` to run in the child after fork() (pthread_atfork child handler).
void on_fork_child(void (*fn)()) noexcept;

Result<pid_t> fork_process();
// Waits for pid; returns the raw wait status.
Result<int> wait_process(pid_t pid);
Status kill_process(pid_t pid, int sig);
[[noreturn]] void exit_now(int code) noexcept;  // _exit: no destructors, no atexit
// Pins the calling thread to one CPU (sched_setaffinity); an error where the CPU does not exist.
Status pin_to_cpu(int cpu);
int cpu_count() noexcept;
// sched_yield(): a spinning waiter lets another thread of its CPU run (counted as a syscall and a
// yield, os/syscall_count.h).
void yield_cpu() noexcept;

Result<std::pair<UniqueFd, UniqueFd>> make_pipe();  // {read end, write end}, O_CLOEXEC
// Full read/write with EINTR retry. read_full returns the bytes read (< size only at EOF).
Result<std::size_t> read_full(int fd, std::span<std::byte> buf);
Status write_full(int fd, std::span<const std::byte> buf);
// Raw read/write once (for baselines that must measure exactly one syscall).
long read_once(int fd, void* buf, std::size_t n) noexcept;
long write_once(int fd, const void* buf, std::size_t n) noexcept;

// Counts entries of /proc/self/fd and lines of /proc/self/maps (leak checks in tests).
std::size_t open_fd_count();
// Open fds whose /proc/self/fd link contains `needle` (e.g. "memfd:budget-extent" or "pipe:"): a
// count unaffected by the fds the library opens lazily (a queue's safety timerfd, the peer
// watcher's epoll), whenever a thread first needs them.
std::size_t open_fd_count(const char* needle);
std::size_t mapping_count();
// Lines of /proc/self/maps that contain `needle` (e.g. "memfd:mbmq": the library's own mappings,
// unaffected by the allocator's or a sanitizer's).
std::size_t mapping_count(const char* needle);
// Resident set size of this process, in bytes (/proc/self/statm).
std::size_t resident_bytes();
// The names in a directory, sorted (e.g. /dev/shm, to show nothing was left there).
std::vector<std::string> dir_listing(const char* path);

// posix_spawn(path, argv): a new program, not a fork of this one. Its stdout is `stdout_fd` and
// its stderr `stderr_fd` (-1: ours); `fd3`, if given, is its fd 3. Its environment is ours plus
// `env_extra` ("NAME=value" entries, which win). Only fds without O_CLOEXEC (and
// 0-2) reach it.
Result<pid_t> spawn_program(const std::string& path, const std::vector<std::string>& args,
                            int stdout_fd, int stderr_fd = -1, int fd3 = -1,
                            const std::vector<std::string>& env_extra = {});

}  // namespace mbmq::os

namespace mbmq::os {
unsigned current_uid() noexcept;  // getuid()
// setresuid/setresgid (tests that play another user; needs privilege).
Status become_user(unsigned uid, unsigned gid);
}  // namespace mbmq::os

namespace mbmq::os {
// prctl(PR_SET_PDEATHSIG, SIGKILL): this (forked) process is killed when its parent dies, so a
// crashed benchmark or test never leaves a spinning child behind.
void die_with_parent() noexcept;
}  // namespace mbmq::os

namespace mbmq::os {
// CPU time (user + system) the calling thread has used, in ns (CLOCK_THREAD_CPUTIME_ID).
std::int64_t thread_cpu_ns() noexcept;
// isatty(fd): whether to draw a progress bar there.
bool is_terminal(int fd) noexcept;
// CPU time of the whole process, all threads (CLOCK_PROCESS_CPUTIME_ID).
std::int64_t process_cpu_ns() noexcept;
// signal(SIGPIPE, SIG_IGN) for the whole process: a write to a socket whose reader left then
// fails with EPIPE instead of killing the process. For programs (servers); a library must not
// decide it for its host.
void ignore_sigpipe() noexcept;
// CPU time of another process (all its threads; clock_getcpuclockid), or -1.
std::int64_t process_cpu_ns(pid_t pid) noexcept;
}  // namespace mbmq::os

#include <chrono>

namespace mbmq::os {
// A POSIX timer (timer_create, CLOCK_MONOTONIC) that raises `signo` in this process every
// `interval`, caught by a handler installed WITHOUT SA_RESTART: a blocking system call in any
// thread fails with EINTR at that rate, as under a profiler or an application's own timer. For
// tests of EINTR handling. One at a time per process: Errc::Busy while one runs.
Status start_interval_signal(std::chrono::microseconds interval, int signo);
// Deletes the timer, discards a signal still pending, restores the previous handler. Does
// nothing when none runs.
void stop_interval_signal() noexcept;
// How many times the handler has run since the last start_interval_signal().
std::uint64_t interval_signal_count() noexcept;
}  // namespace mbmq::os

namespace mbmq::os {
// The soft RLIMIT_NOFILE: one more than the highest fd number this process may open
// (RLIM_INFINITY is UINT64_MAX).
std::uint64_t fd_limit() noexcept;
// Sets the soft RLIMIT_NOFILE (the hard limit stays): tests that play a process with a small fd
// table. Errc::System/EINVAL above the hard limit.
Status set_fd_limit(std::uint64_t soft);
// Raises the soft RLIMIT_NOFILE to the hard limit (an unlimited hard limit counts as 1 Mi, the
// kernel's default fs.nr_open) and returns the soft limit then in force.
std::uint64_t raise_fd_limit() noexcept;
// geteuid(): the uid the kernel reports for this process (SO_PEERCRED gives effective ids).
unsigned effective_uid() noexcept;
// Sleeps for `ns` nanoseconds (clock_nanosleep, CLOCK_MONOTONIC, relative), resuming after a
// signal until the time has passed. ns <= 0 returns at once.
void sleep_ns(std::int64_t ns) noexcept;
}  // namespace mbmq::os
