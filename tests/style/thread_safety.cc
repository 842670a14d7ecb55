// Compiled by the tests style.thread_safety_*_compiles_as_it_should with clang++ -Wthread-safety
// -Werror -fsyntax-only: each MBMQ_CASE_* touches a guarded member (or calls a `_locked`
// function) without its lock and must FAIL to compile; without a case, every access is made with
// the lock held and it must compile. It uses the library's own mutexes, guard and macros, so the
// check is live only if they carry the annotations src/ relies on.
#include <vector>

#include "ipc/deadline_mutex.h"
#include "ipc/spin_mutex.h"
#include "mbmq/deadline.h"
#include "os/mutex.h"
#include "os/thread_annotations.h"

namespace {

using mbmq::os::kAdoptLock;
using mbmq::os::LockGuard;

class Queue {
 public:
  void push(int v) {
#ifdef MBMQ_CASE_UNLOCKED_WRITE
    items_.push_back(v);  // no lock: touching items_ requires holding mu_
#else
    LockGuard lock(mu_);
    items_.push_back(v);
#endif
  }
  int drop_all() {
#ifdef MBMQ_CASE_UNLOCKED_CALL
    return drop_locked();  // no lock: calling drop_locked requires holding mu_
#else
    LockGuard lock(mu_);
    return drop_locked();
#endif
  }
  int count() {
    LockGuard lock(other_mu_);
#ifdef MBMQ_CASE_WRONG_LOCK
    return static_cast<int>(items_.size());  // holds other_mu_, not mu_
#else
    return counter_;
#endif
  }
  bool take_turn(mbmq::Deadline d) {
#ifdef MBMQ_CASE_UNCHECKED_DEADLINE
    (void)turn_mu_.lock_until(d);  // may have timed out: not held here
    ++turns_;
    turn_mu_.unlock();
    return true;
#else
    if (!turn_mu_.lock_until(d)) return false;
    LockGuard lock(turn_mu_, kAdoptLock);
    ++turns_;
    return true;
#endif
  }

 private:
  int drop_locked() MBMQ_REQUIRES(mu_) {
    const int n = static_cast<int>(items_.size());
    items_.clear();
    return n;
  }

  mbmq::detail::SpinMutex mu_;
  std::vector<int> items_ MBMQ_GUARDED_BY(mu_);
  mbmq::os::Mutex other_mu_;
  int counter_ MBMQ_GUARDED_BY(other_mu_) = 0;
  mbmq::detail::DeadlineMutex turn_mu_;
  int turns_ MBMQ_GUARDED_BY(turn_mu_) = 0;
};

}  // namespace

int main() {
  Queue q;
  q.push(1);
  (void)q.take_turn(mbmq::Deadline::never());
  return q.drop_all() + q.count() == 1 ? 0 : 1;
}
