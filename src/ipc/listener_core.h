// ipc/listener_core.h: the process-private half of a Listener. The listening socket and every
// connection still in its handshake (R1-R2 of include/mbmq/rendezvous.h) are watched by the
// process's watcher thread, which runs R2-R4 with non-blocking I/O and queues the server's end of
// each accepted channel here; the queue the listener is redirected to takes them in its scan.
//
// Locking: mu_ guards the listening socket's watch, the handshake table, the arrivals and the
// queue binding. Order: a queue's mutex, then mu_, then the watcher's; mu_ is never held across a
// wait.
#pragma once

#include <atomic>
#include <deque>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "ipc/end_counters.h"
#include "ipc/peer_watch.h"
#include "ipc/stat_wire.h"
#include "mbmq/msg_queue.h"
#include "mbmq/rendezvous.h"
#include "os/fd.h"
#include "os/mutex.h"
#include "os/thread_annotations.h"

namespace mbmq::detail {

class QueueCore;
class Endpoint;

class ListenCore final : public Watched, public std::enable_shared_from_this<ListenCore> {
 public:
  static Result<std::shared_ptr<ListenCore>> make(std::string_view name, ListenOptions options);
  ~ListenCore();

  // Sends arrivals to `queue` with `key` from now on, and wakes it if some are waiting.
  Status bind(const std::shared_ptr<QueueCore>& queue, std::uint64_t key) MBMQ_EXCLUDES(mu_);
  enum class Take { Got, Empty, Gone };
  // From the queue's scan (its mutex held): the next accepted channel as a Kind::Connection.
  // Gone: the listener was closed; the queue forgets it.
  Take take(Message* out) MBMQ_EXCLUDES(mu_);
  // Without a lock: whether take() may have something (an arrival, or the close to report).
  bool maybe_ready() const noexcept { return ready_.load(std::memory_order_acquire); }
  // Stops listening (the Listener handle is gone). Safe in a forked child, where it only closes
  // this process's copies.
  void close() noexcept MBMQ_EXCLUDES(mu_);

  ListenerStats stats() const noexcept;
  void on_watch(int fd, std::uint32_t events) noexcept override MBMQ_EXCLUDES(mu_);

  // Written by the watcher thread (handshakes, queries) and by the leases (live); relaxed RMW
  // (several writers; each is a count read by monitors, ordering nothing). totals: see
  // ListenTotals (ipc/end_counters.h).
  struct Counters {
    std::atomic<std::uint64_t> accepted{0}, refused_policy{0}, refused_version{0}, refused_limit{0},
        refused_busy{0}, failed{0}, live{0}, fd_backoffs{0};
    std::atomic<std::uint64_t> queries{0}, queries_dropped{0};  // (Q4) answered, not sent
    std::atomic<std::uint32_t> last_refused_uid{~0u};           // ~0u: none yet
    std::atomic<std::int32_t> last_refused_pid{0};
    ListenTotals totals;
  };
  std::uint32_t max_connections() const noexcept { return max_connections_; }

 private:
  ListenCore() = default;
  // close() in a forked child: mu_ may have been copied locked by a thread that does not exist
  // here, so it is not taken (the analysis cannot know that no other thread can race).
  void close_in_child() noexcept MBMQ_NO_THREAD_SAFETY_ANALYSIS;
  // Watcher thread only.
  void accept_pending() noexcept MBMQ_EXCLUDES(mu_);
  // (R2) A connection just accepted: its uid checked, then on to finish() or into a slot.
  void admit(os::UniqueFd conn) noexcept MBMQ_EXCLUDES(mu_);
  // (R2) The hello arrived on a connection waiting in a slot.
  void handshake(int fd) noexcept MBMQ_EXCLUDES(mu_);
  // (Q3)-(Q4) A stat query in place of the hello (ipc/stat_wire.h): one reply, never waiting;
  // the connection is closed on return. Watcher thread only.
  void answer_query(os::UniqueFd conn, const StatQuery& q) noexcept MBMQ_EXCLUDES(mu_);
  // The listener's half of the reply (counters, totals over live and retired ends).
  void fill_listener_stat(ListenerStat* out) const noexcept;
  // (R2)-(R4) for a connection whose uid passed and whose hello (checked) is in hand.
  void finish(os::UniqueFd conn, std::uint32_t version, std::uint32_t flags) noexcept
      MBMQ_EXCLUDES(mu_);
  // A hello or a stat query has arrived on conn (its uid passed): on to finish() or
  // answer_query(). Errc::WouldBlock: nothing yet (the connection is handed back in *conn).
  Status dispatch(os::UniqueFd* conn) noexcept MBMQ_EXCLUDES(mu_);
  // Adds an accepted server end to the stat registry (pruning dead entries as it doubles).
  void register_end(const std::shared_ptr<Endpoint>& ep, int pid, unsigned uid) noexcept
      MBMQ_EXCLUDES(mu_);
  // accept4() failed for want of fds (or memory). Stops watching the listening socket
  // (level-triggered, it would wake us at once, forever) and watches it again after a delay.
  void back_off_locked() noexcept MBMQ_REQUIRES(mu_);
  // Drops the slot of the handshake on `fd` (if any), and its uid's count.
  void erase_handshake_locked(int fd) noexcept MBMQ_REQUIRES(mu_);
  // Marks the arrivals ready and returns the bound queue, for the caller to wake once unlocked.
  std::shared_ptr<QueueCore> queue_to_poke_locked() noexcept MBMQ_REQUIRES(mu_);

  int owner_pid_ = 0;
  std::string name_;
  ListenOptions options_;
  std::uint32_t max_connections_ = 0;         // options_' or derived (rendezvous.h)
  std::uint32_t max_handshakes_per_uid_ = 0;  // options_' or derived
  std::shared_ptr<Counters> counters_ = std::make_shared<Counters>();  // shared with leases

  os::Mutex mu_;
  os::UniqueFd listen_fd_ MBMQ_GUARDED_BY(mu_);
  // The level-triggered watch, or the timer.
  std::uint64_t listen_watch_ MBMQ_GUARDED_BY(mu_) = 0;
  bool backing_off_ MBMQ_GUARDED_BY(mu_) = false;     // listen_watch_ is the back-off timer
  std::int64_t backoff_ns_ MBMQ_GUARDED_BY(mu_) = 0;  // the current delay (0: none yet)
  struct Handshake {
    os::UniqueFd conn;
    std::uint64_t watch_id = 0;
    unsigned uid = 0;
  };
  std::unordered_map<int, Handshake> handshakes_ MBMQ_GUARDED_BY(mu_);  // keyed by fd
  // handshakes_ per uid.
  std::unordered_map<unsigned, std::uint32_t> slots_of_ MBMQ_GUARDED_BY(mu_);
  std::deque<Channel> arrivals_ MBMQ_GUARDED_BY(mu_);
  // (#18) The accepted server ends, for stat queries. seen_*: the message total a query last saw
  // and when it first saw it (the idle time, without a clock on the hot path).
  struct Registered {
    std::weak_ptr<Endpoint> ep;
    std::uint64_t id = 0;
    int pid = 0;
    unsigned uid = 0;
    std::uint64_t seen_total = 0;
    std::int64_t seen_ns = -1;
  };
  std::vector<Registered> registry_ MBMQ_GUARDED_BY(mu_);
  std::size_t prune_at_ MBMQ_GUARDED_BY(mu_) = 64;
  std::uint64_t next_id_ MBMQ_GUARDED_BY(mu_) = 1;
  std::int64_t start_ns_ = 0;
  std::weak_ptr<QueueCore> queue_ MBMQ_GUARDED_BY(mu_);
  std::uint64_t key_ MBMQ_GUARDED_BY(mu_) = 0;
  bool closed_ MBMQ_GUARDED_BY(mu_) = false;
  // arrivals_ non-empty, or closed and not yet reported: lets the queue skip the lock.
  std::atomic<bool> ready_{false};
};

// Reaches into Channel for the library's own plumbing.
struct ChannelAccess {
  static std::shared_ptr<Endpoint>& ep(Channel& c) noexcept { return c.ep_; }
  static Channel make(std::shared_ptr<Endpoint> ep) noexcept { return Channel(std::move(ep)); }
  // A remote end (ipc/foreign_channel.h): mbmq::net makes them and takes them apart.
  static std::shared_ptr<ForeignChannel>& remote(Channel& c) noexcept { return c.remote_; }
  static Channel make_remote(std::shared_ptr<ForeignChannel> r) noexcept {
    return Channel(std::move(r));
  }
};

}  // namespace mbmq::detail
