// Endpoint: redirection to a queue and the end's lifecycle (P8): closing, hang-ups, the peer
// watcher, buffers parked or detached; where a buffer's bytes live (backing(), and the tests'
// hooks). The rest of the composition is in endpoint.cc.
#include <climits>
#include <cstring>

#include "ipc/endpoint.h"
#include "ipc/handles.h"
#include "ipc/peer_watch.h"
#include "ipc/queue_core.h"
#include "ipc/wait_step.h"
#include "os/epoll.h"
#include "os/fault.h"
#include "os/futex.h"
#include "os/mutex.h"
#include "os/process.h"
#include "os/unix_socket.h"

namespace mbmq::detail {

using shm::Desc;
using shm::DescKind;
using shm::kMaxExtents;

// ---- a buffer's backing ------------------------------------------------------------------------

bool Endpoint::backing(const Buffer& b, int* fd, std::uint64_t* offset) const {
  os::LockGuard lock(mu_);
  if (b.ep_.get() != this || b.data_ == nullptr) return false;
  const BufferId id = BufferId::from_wire(b.id_);
  if (!id.is_extent()) {
    if (id.slot_index() >= seg_.total_slots() || b.data_ != seg_.slot(id.slot_index()))
      return false;
    *fd = seg_.fd();
    *offset = static_cast<std::uint64_t>(seg_.slot(id.slot_index()) - seg_.base());
    return true;
  }
  if (id.extent_index() >= kMaxExtents) return false;
  const bool own = b.origin_ == Buffer::Origin::Own;
  const os::Mapping& map = own ? table_.own_extent(id).map : table_.peer_extent(id)->map;
  const os::UniqueFd& xfd = own ? table_.own_extent(id).fd : table_.peer_extent(id)->fd;
  const bool sealed = own ? table_.own_extent(id).sealed : table_.peer_extent(id)->sealed;
  if (b.data_ != map.data() || !xfd || sealed) return false;
  *fd = xfd.get();
  *offset = 0;
  return true;
}

int Endpoint::extent_fd_for_test(const Buffer& b) const {
  os::LockGuard lock(mu_);
  const BufferId id = BufferId::from_wire(b.id_);
  if (b.ep_.get() != this || !id.is_extent()) return -1;
  if (b.origin_ == Buffer::Origin::Own) return table_.own_extent(id).fd.get();
  const PeerExtent* pe = table_.peer_extent(id);
  return b.origin_ == Buffer::Origin::Peer && pe != nullptr ? pe->fd.get() : -1;
}

Status Endpoint::forge_extent_request_for_test(int fd, std::uint32_t gen, std::uint32_t size,
                                               std::uint32_t aux) {
  os::LockGuard lock(mu_);
  MBMQ_TRY(send_extent_locked(0, gen, aux, fd));
  return push_locked(
      Desc{BufferId::extent(0).raw(), size, gen, static_cast<std::uint16_t>(DescKind::Request), 0});
}

// ---- redirection, lifecycle (P8) --------------------------------------------------------------

Status Endpoint::redirect(const std::shared_ptr<QueueCore>& queue, std::uint64_t key) {
  // Not while another thread is inside call() or receive(): its wake-ups would go to the queue
  // and the queue would take its reply. (They re-check redirected_ once they hold the lock.)
  if (!consumer_mu_.try_lock())
    return fail(Errc::Busy, "redirect: another thread is in call() or receive() on this end");
  os::LockGuard consumer(consumer_mu_, os::kAdoptLock);
  // The peer's sender of our queue's signal, its own (made before our lock: system calls).
  os::UniqueFd sender = MBMQ_TRY(queue->new_signal_sender());
  std::uint32_t q = 0;
  {
    os::LockGuard lock(mu_);
    EpState s = state_.load(std::memory_order_acquire);
    if (s != EpState::Open) return fail(closed_errc(s), "redirect");
    if (queue_ == queue) {
      key_.store(key, std::memory_order_relaxed);
      return {};
    }
    if (queue_) return fail(Errc::Busy, "redirect: already redirected to another queue");
    q = MBMQ_TRY(queue->reserve());
    if (++my_db_gen_ == 0) ++my_db_gen_;
    const int bell[shm::kDoorbellFds] = {queue->ready_fd(), queue->wait_fd(), sender.get()};
    if (Status sent = send_doorbell_locked(my_db_gen_, q, bell); !sent) {
      queue->unreserve(q);
      return sent;
    }
    // Pairs with the producer's acquire load in (P4q): the doorbell is on the socket before the
    // generation that names it is visible.
    in_.doorbell_gen.store(my_db_gen_, std::memory_order_release);
    queue_ = queue;
    my_slot_ = q;
    key_.store(key, std::memory_order_relaxed);
    redirected_.store(true, std::memory_order_relaxed);
  }
  // After our lock (the queue's comes first, ipc/queue_core.h). An event between the two is not
  // lost: wake_local() below rings the slot once the end is installed.
  queue->add(shared_from_this(), q);
  // An end whose peer's death cannot be watched is closed (abandon() rings the queue, which
  // delivers its end); the caller learns why.
  Status w = ensure_watched();
  if (!w) abandon("the peer's death cannot be watched in this process");
  // Messages that came before the redirect are in the ring already: the queue looks at once.
  wake_local();
  return w;
}

WaitPolicy Endpoint::wait_policy() const noexcept { return wait_.load(); }

void Endpoint::set_wait_policy(WaitPolicy p) noexcept { wait_.store(p); }

void Endpoint::wake_local() noexcept {
  in_.doorbell.fetch_add(1, std::memory_order_release);
  (void)os::futex_wake(&in_.doorbell, INT_MAX);
  wake_room();
  std::shared_ptr<QueueCore> q;
  std::uint32_t slot = 0;
  {
    os::LockGuard lock(mu_);
    q = queue_;
    slot = my_slot_;
  }
  if (q) q->notify(slot);
}

void Endpoint::on_watch(int /*fd*/, std::uint32_t /*events*/) noexcept { on_hangup(); }

void Endpoint::on_hangup() noexcept {
  EpState expected = EpState::Open;
  state_.compare_exchange_strong(expected, EpState::PeerClosed, std::memory_order_acq_rel);
  wake_local();
}

void Endpoint::close_local() noexcept {
  MBMQ_CRASH_POINT("close.before");
  std::shared_ptr<QueueCore> q;
  std::uint32_t slot = 0;
  {
    os::LockGuard lock(mu_);
    const EpState was = state_.exchange(EpState::LocalClosed);
    if (was == EpState::LocalClosed) return;
    retire_locked(was);  // (#18) with the lease: the listener's totals take this end's counts now
    unwatch();
    ctl_.close();
    reclaim_lent_locked();
    lease_.reset();  // a listener's connection count drops now, not when the handle goes
    // Breaks the queue <-> end reference cycle: the queue drops its reference when its scan
    // finds the end gone (or when it is destroyed).
    q = std::move(queue_);
    slot = my_slot_;
  }
  in_.doorbell.fetch_add(1, std::memory_order_release);
  (void)os::futex_wake(&in_.doorbell, INT_MAX);
  wake_room();
  if (q) q->notify(slot);
}

void Endpoint::abandon(const char* why) noexcept {
  {
    os::LockGuard lock(mu_);
    (void)fail_protocol_locked(why);
  }
  wake_local();
}

Status Endpoint::ensure_watched() noexcept {
  int pid = os::current_pid();
  if (watch_pid_.load(std::memory_order_relaxed) == pid) return {};
  os::LockGuard lock(mu_);
  if (watch_pid_.load(std::memory_order_relaxed) == pid || !ctl_.is_open()) return {};
  // Hang-up only, edge-triggered: a peer's close is reported once; data on the socket is read by
  // the endpoint itself.
  auto id = watch_fd(std::weak_ptr<Watched>(weak_from_this()), ctl_.fd(),
                     WatchSpec{os::kEpollHangup | os::kEpollEdge, true, 0});
  if (!id) return fail(id.error());
  watch_id_ = *id;
  watch_pid_.store(pid, std::memory_order_relaxed);
  return {};
}

void Endpoint::detach_buffer(Buffer& b) noexcept {
  park_buffer(b);
  b.ep_.reset();
}

}  // namespace mbmq::detail
