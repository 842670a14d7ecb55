// os/mutex.h: Mutex, a std::mutex annotated for clang's thread-safety analysis, and LockGuard,
// the annotated scoped guard for it and for the other mbmq mutexes (detail::SpinMutex,
// detail::DeadlineMutex). libstdc++'s std::mutex and std::lock_guard carry no annotations, so a
// member guarded by one could not be checked, and code holding one would not count as holding
// it. Example:
//
//   os::Mutex mu_;
//   int count_ MBMQ_GUARDED_BY(mu_) = 0;
//   { os::LockGuard lock(mu_); ++count_; }
//   if (dm.lock_until(deadline)) { os::LockGuard lock(dm, os::kAdoptLock); ... }
//
// Memory ordering: as std::mutex (lock() acquires, unlock() releases).
#pragma once

#include <mutex>

#include "os/thread_annotations.h"

namespace mbmq::os {

class MBMQ_CAPABILITY("mutex") Mutex {
 public:
  void lock() MBMQ_ACQUIRE() { mu_.lock(); }
  bool try_lock() MBMQ_TRY_ACQUIRE(true) { return mu_.try_lock(); }
  void unlock() MBMQ_RELEASE() { mu_.unlock(); }

 private:
  std::mutex mu_;
};

// LockGuard(m, kAdoptLock): m is already held (taken with try_lock() or a deadline); the guard
// releases it.
struct AdoptLock {
  explicit AdoptLock() = default;
};
inline constexpr AdoptLock kAdoptLock{};

// Holds M (any type with lock() and unlock()) for its scope, as std::lock_guard.
template <class M>
class MBMQ_SCOPED_CAPABILITY LockGuard {
 public:
  explicit LockGuard(M& m) MBMQ_ACQUIRE(m) : m_(m) { m_.lock(); }
  LockGuard(M& m, AdoptLock) MBMQ_REQUIRES(m) : m_(m) {}
  ~LockGuard() MBMQ_RELEASE() { m_.unlock(); }
  LockGuard(const LockGuard&) = delete;
  LockGuard& operator=(const LockGuard&) = delete;

 private:
  M& m_;
};

}  // namespace mbmq::os
