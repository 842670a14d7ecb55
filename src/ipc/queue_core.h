// ipc/queue_core.h: QueueCore, the process-private half of a MsgQueue (its shared half is the
// DoorbellPage of src/shm/layout.h). Waiting steps P4/P6; the scan over the redirected ends and
// the listeners; replies deferred by back-pressure.
//
// Locking: mu_ guards the ends, listeners and deferred replies. Order: the queue's mu_, then an
// end's mu_ (Endpoint::poll), or a listener's. Never held while sleeping.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "ipc/atomic_wait_policy.h"
#include "ipc/endpoint.h"
#include "ipc/spin_mutex.h"
#include "mbmq/buffer.h"
#include "mbmq/deadline.h"
#include "mbmq/msg_queue.h"
#include "mbmq/result.h"
#include "os/fd.h"
#include "os/mapping.h"
#include "os/thread_annotations.h"
#include "shm/layout.h"

namespace mbmq::detail {

class ListenCore;

// The process-private half of a MsgQueue (its shared half is the DoorbellPage).
class QueueCore {
 public:
  static Result<std::shared_ptr<QueueCore>> make(WaitPolicy policy);

  Result<Message> wait(Deadline deadline);
  void add(std::shared_ptr<Endpoint> ep);
  // Listeners whose accepted connections arrive here as Kind::Connection.
  void add_listener(std::shared_ptr<ListenCore> l);
  void remove_listener(const ListenCore* l);
  // Bumps the wake word and wakes every waiter, so they look again.
  void poke() noexcept;
  int doorbell_fd() const noexcept { return fd_.get(); }
  std::size_t channel_count() const;
  void set_wait_policy(WaitPolicy p);
  // Lets go of every channel (the MsgQueue handle is being destroyed).
  std::vector<std::shared_ptr<Endpoint>> take_all();
  // In a child forked after channels were redirected here: registers them with this process's
  // watcher (once per process).
  void watch_after_fork();
  // A reply that met back-pressure (reply_and_wait): retried by wait() until it goes.
  void defer(Buffer&& b);

 private:
  bool scan_locked(Message* out) MBMQ_REQUIRES(mu_);
  void retry_deferred_locked() MBMQ_REQUIRES(mu_);
  void set_sleeping_locked(bool sleeping) noexcept MBMQ_REQUIRES(mu_);

  os::UniqueFd fd_;
  os::Mapping map_;
  shm::DoorbellPage* page_ = nullptr;
  mutable SpinMutex mu_;
  std::vector<std::shared_ptr<Endpoint>> eps_ MBMQ_GUARDED_BY(mu_);
  std::vector<std::shared_ptr<ListenCore>> listeners_ MBMQ_GUARDED_BY(mu_);
  std::size_t next_ MBMQ_GUARDED_BY(mu_) = 0;  // round-robin start
  int sleepers_ MBMQ_GUARDED_BY(mu_) = 0;
  AtomicWaitPolicy policy_{WaitPolicy{}};  // read on every wait, without the lock
  std::atomic<int> watch_pid_{0};          // the process whose watcher knows every end here
  // Replies held back by their callers' full control sockets (at most one per request held).
  std::vector<Buffer> deferred_ MBMQ_GUARDED_BY(mu_);
  std::atomic<std::size_t> deferred_count_{0};  // deferred_.size(), read without the lock
};

}  // namespace mbmq::detail
