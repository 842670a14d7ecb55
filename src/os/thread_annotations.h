// os/thread_annotations.h: clang's thread-safety attributes as MBMQ_ macros (empty on other
// compilers). A clang build with -Wthread-safety (CMake preset tsa, part of scripts/test.sh)
// then rejects code that touches a guarded member without its lock:
//
//   class Queue {
//     os::Mutex mu_;
//     std::vector<int> items_ MBMQ_GUARDED_BY(mu_);
//     void drop_locked() MBMQ_REQUIRES(mu_);  // the `_locked` suffix: the caller holds mu_
//   };
//   os::LockGuard lock(mu_);  // not std::lock_guard: libstdc++'s guards are not annotated
//
// Mutexes: os::Mutex (os/mutex.h), detail::SpinMutex, detail::DeadlineMutex (src/ipc). Where the
// analysis cannot follow (a lock handed between functions, state abandoned after fork()), the
// narrowest function gets MBMQ_NO_THREAD_SAFETY_ANALYSIS and a comment saying why.
// https://clang.llvm.org/docs/ThreadSafetyAnalysis.html
#pragma once

#if defined(__clang__)
#define MBMQ_THREAD_ANNOTATION_(x) __attribute__((x))
#else
#define MBMQ_THREAD_ANNOTATION_(x)
#endif

// A type that is a lock (a mutex); `x` names the kind in diagnostics ("mutex").
#define MBMQ_CAPABILITY(x) MBMQ_THREAD_ANNOTATION_(capability(x))
// An RAII guard: its constructor acquires, its destructor releases.
#define MBMQ_SCOPED_CAPABILITY MBMQ_THREAD_ANNOTATION_(scoped_lockable)
// A member read or written only with the lock held.
#define MBMQ_GUARDED_BY(x) MBMQ_THREAD_ANNOTATION_(guarded_by(x))
// A pointer whose pointee is read or written only with the lock held.
#define MBMQ_PT_GUARDED_BY(x) MBMQ_THREAD_ANNOTATION_(pt_guarded_by(x))
// A function called with the lock(s) held (and still held when it returns).
#define MBMQ_REQUIRES(...) MBMQ_THREAD_ANNOTATION_(requires_capability(__VA_ARGS__))
// A function that takes the lock(s) (empty: `this`, for a mutex's own lock()).
#define MBMQ_ACQUIRE(...) MBMQ_THREAD_ANNOTATION_(acquire_capability(__VA_ARGS__))
// Takes the lock if it returns the first argument (true), e.g. try_lock().
#define MBMQ_TRY_ACQUIRE(...) MBMQ_THREAD_ANNOTATION_(try_acquire_capability(__VA_ARGS__))
// A function that lets the lock(s) go.
#define MBMQ_RELEASE(...) MBMQ_THREAD_ANNOTATION_(release_capability(__VA_ARGS__))
// A function called without the lock(s) (it takes them itself).
#define MBMQ_EXCLUDES(...) MBMQ_THREAD_ANNOTATION_(locks_excluded(__VA_ARGS__))
// Turns the analysis off for one function; always with a comment saying why.
// The capability is held here though the analysis cannot see it (a callback run under it).
#define MBMQ_ASSERT_CAPABILITY(x) MBMQ_THREAD_ANNOTATION_(assert_capability(x))
#define MBMQ_NO_THREAD_SAFETY_ANALYSIS MBMQ_THREAD_ANNOTATION_(no_thread_safety_analysis)
