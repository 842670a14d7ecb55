// QueueBell and PeerBell: a MsgQueue's doorbell (see ipc/queue_bell.h, P4q/P6q of shm/layout.h).
#include "ipc/queue_bell.h"

#include <climits>
#include <new>

#include "os/file.h"
#include "os/futex.h"
#include "os/memfd.h"
#include "os/unix_socket.h"

namespace mbmq::detail {

Result<BellFds> BellFds::dup() const {
  BellFds d;
  d.ready = MBMQ_TRY(os::dup_fd(ready.get()));
  d.wait = MBMQ_TRY(os::dup_fd(wait.get()));
  d.signal = MBMQ_TRY(os::dup_fd(signal.get()));
  return d;
}

void mark_ready(shm::QueueReadyPage& page, std::uint32_t q) noexcept {
  // Step 1. acq_rel: after the ring entry's release stores, before the fence. The queue takes the
  // summary bit, then the word: a bit set in between is found on its next look.
  const std::uint64_t bit = std::uint64_t{1} << (q % 64);
  page.ready[q / 64].fetch_or(bit, std::memory_order_acq_rel);
  // Always, not only when the word's first bit was ours: a word with a bit set and no summary bit
  // (forged, or a producer killed between the two) would otherwise never be looked at again.
  page.summary[q / 4096].fetch_or(std::uint64_t{1} << ((q / 64) % 64), std::memory_order_acq_rel);
  // Step 2. Pairs with the queue's fence between its store of sleepers and its last look (P6q):
  // either it sees our bit, or we see its sleepers.
  std::atomic_thread_fence(std::memory_order_seq_cst);
}

void wake_queue(shm::QueueReadyPage& page, std::uint32_t sleepers, int signal_fd) noexcept {
  if (sleepers == 0) return;
  if ((sleepers & shm::kQueueSleepersMask) != 0) {
    // Pairs with the waiter's acquire load of the word before FUTEX_WAIT (P6q).
    page.word.fetch_add(1, std::memory_order_release);
    (void)os::futex_wake(&page.word, 1);
  }
  if ((sleepers & shm::kQueueArmed) != 0) os::signal_byte(signal_fd);
}

Result<QueueBell> QueueBell::make() {
  QueueBell b;
  b.ready_fd_ = MBMQ_TRY(os::make_sealed_memfd("mbmq-queue-ready", shm::kQueuePageSize));
  // No more seals, from anyone: a peer that added F_SEAL_FUTURE_WRITE would keep every later peer
  // from mapping the page.
  MBMQ_TRY(os::add_seals(b.ready_fd_.get(), os::kSealSeal));
  b.ready_map_ = MBMQ_TRY(
      os::Mapping::map_shared(b.ready_fd_.get(), shm::kQueuePageSize, os::Access::ReadWrite));
  b.ready_ = new (b.ready_map_.data()) shm::QueueReadyPage{};
  b.wait_fd_ = MBMQ_TRY(os::make_sealed_memfd("mbmq-queue-wait", shm::kQueuePageSize));
  b.wait_map_ = MBMQ_TRY(
      os::Mapping::map_shared(b.wait_fd_.get(), shm::kQueuePageSize, os::Access::ReadWrite));
  b.wait_ = new (b.wait_map_.data()) shm::QueueWaitPage{};
  // Our mapping stays writable; nobody can map the page writable from now on (a peer that could
  // would stop every wake-up by clearing sleepers).
  MBMQ_TRY(os::add_seals(b.wait_fd_.get(), os::kSealFutureWrite | os::kSealSeal));
  b.signal_rx_ = MBMQ_TRY(os::dgram_receiver());
  b.signal_tx_ = MBMQ_TRY(os::dgram_sender_to(b.signal_rx_.get()));
  return b;
}

void QueueBell::poke() noexcept {
  ready_->word.fetch_add(1, std::memory_order_release);
  (void)os::futex_wake(&ready_->word, INT_MAX);
  os::signal_byte(signal_tx_.get());
}

void QueueBell::drain() noexcept { (void)os::drain_bytes(signal_rx_.get()); }

void QueueBell::signal_self() noexcept { os::signal_byte(signal_tx_.get()); }

void QueueBell::wake_after_store() noexcept {
  // Pairs with the queue's fence between its store of sleepers and its last look (P6q).
  std::atomic_thread_fence(std::memory_order_seq_cst);
  wake_queue(*ready_, sleepers(), signal_tx_.get());
}

namespace {
// Like a segment or an extent: only a memfd sealed against shrinking can be mapped without
// risking SIGBUS when the peer truncates it later.
bool page_ok(int fd) {
  auto seals = os::get_seals(fd);
  auto size = os::file_size(fd);
  return seals && (*seals & os::kSealShrink) != 0 && size && *size >= shm::kQueuePageSize;
}
}  // namespace

const char* PeerBell::open(BellFds fds, std::uint32_t gen, std::uint32_t q) {
  if (!fds.ready || !fds.wait || !fds.signal || q >= shm::kQueueCapacity)
    return "doorbell: malformed (fds or slot)";
  if (!page_ok(fds.ready.get()) || !page_ok(fds.wait.get()))
    return "doorbell: not a memfd of a page sealed against shrinking";
  if (!os::is_unix_dgram(fds.signal.get()))
    return "doorbell: the signal fd is not a datagram socket";
  auto r = os::Mapping::map_shared(fds.ready.get(), shm::kQueuePageSize, os::Access::ReadWrite);
  auto w = os::Mapping::map_shared(fds.wait.get(), shm::kQueuePageSize, os::Access::ReadOnly);
  if (!r || !w) return nullptr;  // a local failure is not the peer's: the bell stays closed
  ready_map_ = std::move(*r);
  wait_map_ = std::move(*w);
  ready_ = reinterpret_cast<shm::QueueReadyPage*>(ready_map_.data());
  wait_ = reinterpret_cast<const shm::QueueWaitPage*>(wait_map_.data());
  fds_ = std::move(fds);
  gen_ = gen;
  slot_ = q;
  return nullptr;
}

}  // namespace mbmq::detail
