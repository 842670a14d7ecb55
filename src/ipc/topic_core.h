// ipc/topic_core.h: the state behind Publisher (TopicCore) and Subscriber (SubscriberCore), the
// protocol steps (T1)-(T10) of docs/design/topic.md over the layout of shm/topic_layout.h.
//
// Locking: TopicCore::mu_ guards everything of the publisher: the sample table, the subscriber
// table, the queue and the listener. It is never held across a sleep: publish()/buffer() waiting
// for room and serve() let it go while they wait on the private queue (wait_events_unlocked, in
// steps of at most 10 ms), so other threads' calls, stats(), subscribers() and Buffers dropped
// meanwhile wait only for short critical sections. Another thread's publish()/buffer() waits for
// it only until its own deadline (a DeadlineMutex). SubscriberCore::recv_mu_ serializes
// receive() (a second receiver waits until its own deadline); release() (T6) takes no lock.
//
// Fork: the private records (free list, rings' tails, references) describe the pool of the
// process that made them; a copy of a Publisher or Subscriber in a forked child refuses to work
// (Errc::InvalidArgument), as two publishers of one pool would hand out the same sample.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <utility>
#include <vector>

#include "ipc/deadline_mutex.h"
#include "ipc/topic_tap.h"
#include "mbmq/channel.h"
#include "mbmq/msg_queue.h"
#include "mbmq/rendezvous.h"
#include "mbmq/topic.h"
#include "os/fd.h"
#include "os/mapping.h"
#include "os/mutex.h"
#include "os/process.h"
#include "os/thread_annotations.h"
#include "shm/topic_layout.h"

namespace mbmq::detail {

// What a Publisher or Subscriber copy in a forked child returns (both refuse to work there).
inline constexpr const char* kForked =
    "Publisher/Subscriber: a copy in a forked child (use it in the process that made it)";

class TopicCore : public std::enable_shared_from_this<TopicCore> {
 public:
  static Result<std::shared_ptr<TopicCore>> make(std::string_view name, const TopicOptions& o);
  TopicCore(const TopicCore&) = delete;
  TopicCore& operator=(const TopicCore&) = delete;
  explicit TopicCore(TopicOptions o) : opt_(std::move(o)) {}

  Result<Buffer> buffer(std::size_t size, Deadline deadline);
  Status publish(Buffer&& b, Deadline deadline);
  std::size_t subscribers();
  Result<std::size_t> serve(Deadline deadline, std::size_t until);
  TopicStats stats();
  // From ~Buffer: a sample handed out by buffer() and never published goes back to the pool.
  void release_unpublished(std::uint32_t index, std::uint32_t gen) noexcept;
  // From ~Publisher: stop listening, disconnect every subscriber.
  void shutdown() noexcept;

 private:
  enum class SampleState : std::uint8_t { Free, App, Lent };
  struct SampleRec {
    std::uint32_t gen = 1;
    std::uint32_t refs = 0;  // subscribers it is lent to
    SampleState state = SampleState::Free;
  };
  struct RingRec {  // what we wrote at a ring position: never read back from shared memory
    std::uint32_t sample = 0;
    std::uint32_t gen = 0;
  };
  struct Sub {
    bool active = false;
    std::uint32_t gen = 0;  // bumped per occupant of this index: part of the queue key
    Channel channel;
    os::Mapping map;
    shm::TopicSubSegment* seg = nullptr;
    std::uint64_t tail = 0;  // next ring position (T3)
    std::uint64_t drop = 0;  // oldest position not yet resolved by a drop attempt (T8)
    std::vector<RingRec> recs;
    std::vector<std::uint64_t> lent;  // bit k: sample k lent to this subscriber (authoritative)
    std::uint32_t lent_count = 0;
  };
  enum class DropResult : std::uint8_t { Dropped, Nothing, Bad };

  Status make_room_locked(Deadline deadline, bool for_buffer) MBMQ_REQUIRES(mu_);
  bool room_ready_locked(bool for_buffer) MBMQ_REQUIRES(mu_);
  // Takes queue events (joins, departures, kicks) that are there now (never sleeps).
  void poll_events_locked() MBMQ_REQUIRES(mu_);
  // Sleeps until `deadline` for the next event with mu_ let go, then handles what came under it.
  void wait_events_unlocked(Deadline deadline) MBMQ_REQUIRES(mu_);
  void maybe_poll_events_locked() MBMQ_REQUIRES(mu_);
  void handle_message_locked(Message&& m) MBMQ_REQUIRES(mu_);
  void join_locked(Channel&& ch) MBMQ_REQUIRES(mu_);
  void remove_locked(std::size_t i, bool protocol) MBMQ_REQUIRES(mu_);
  void unref_locked(std::uint32_t k) MBMQ_REQUIRES(mu_);
  void harvest_locked(Sub& s) MBMQ_REQUIRES(mu_);
  bool full_locked(Sub& s) MBMQ_REQUIRES(mu_);
  DropResult drop_oldest_locked(Sub& s) MBMQ_REQUIRES(mu_);
  bool push_locked(Sub& s, std::uint32_t k, std::uint32_t size, std::uint64_t seq)
      MBMQ_REQUIRES(mu_);
  void set_waiting_locked(std::uint32_t v) MBMQ_REQUIRES(mu_);

  const TopicOptions opt_;
  std::uint32_t words_ = 0;  // 64-bit words of a bitmap over the samples
  os::UniqueFd pool_fd_;
  os::Mapping pool_;
  shm::TopicPoolHeader* hdr_ = nullptr;
  std::byte* data_ = nullptr;
  std::uint32_t stride_ = 0;

  // Loops over the subscribers stop at live_end_ (one past the highest active index): a publish
  // costs O(subscribers that joined), not O(max_subscribers).
  std::span<Sub> live_locked() MBMQ_REQUIRES(mu_) { return {subs_.data(), live_end_}; }
  bool forked() const noexcept { return os::current_pid() != pid_; }
  const pid_t pid_ = os::current_pid();
  DeadlineMutex mu_;
  std::size_t live_end_ MBMQ_GUARDED_BY(mu_) = 0;
  std::vector<SampleRec> samples_ MBMQ_GUARDED_BY(mu_);
  std::vector<std::uint32_t> free_ MBMQ_GUARDED_BY(mu_);
  std::vector<Sub> subs_ MBMQ_GUARDED_BY(mu_);
  std::vector<std::uint8_t> skip_ MBMQ_GUARDED_BY(mu_);  // publish(): subscribers skipped (T8)
  std::size_t active_ MBMQ_GUARDED_BY(mu_) = 0;
  std::uint64_t next_seq_ MBMQ_GUARDED_BY(mu_) = 1;
  std::int64_t last_event_poll_ns_ MBMQ_GUARDED_BY(mu_) = 0;
  bool waiting_ MBMQ_GUARDED_BY(mu_) = false;            // publisher_waiting set in the segments
  std::uint32_t room_waiters_ MBMQ_GUARDED_BY(mu_) = 0;  // threads in make_room_locked's wait
  bool closed_ MBMQ_GUARDED_BY(mu_) = false;
  TopicStats stats_ MBMQ_GUARDED_BY(mu_);
  MsgQueue queue_ MBMQ_GUARDED_BY(mu_);
  Listener listener_ MBMQ_GUARDED_BY(mu_);
};

inline void topic_release_unpublished(TopicCore& core, std::uint32_t index,
                                      std::uint32_t gen) noexcept {
  core.release_unpublished(index, gen);
}

class SubscriberCore final : public TopicTap, public std::enable_shared_from_this<SubscriberCore> {
 public:
  static Result<std::shared_ptr<SubscriberCore>> connect(std::string_view name, Deadline deadline,
                                                         const ConnectOptions& options);
  SubscriberCore() = default;
  SubscriberCore(const SubscriberCore&) = delete;
  SubscriberCore& operator=(const SubscriberCore&) = delete;

  Result<Sample> receive(Deadline deadline);
  Status redirect(MsgQueue& queue, std::uint64_t key);
  bool take_into(Message* out) noexcept override;  // (T10), from the queue's poll
  void on_end(Message* out) noexcept override;
  void release(std::uint32_t index) noexcept;  // (T6)
  void close() noexcept;
  shm::TopicSubSegment* segment_for_test() noexcept { return seg_; }

 private:
  // (T5) One look at the ring: a sample, nothing (nullopt), or a protocol error.
  Result<std::optional<Sample>> try_take() MBMQ_REQUIRES(recv_mu_);
  bool ring_has_news() const noexcept MBMQ_REQUIRES(recv_mu_);
  Status closed_status() noexcept;

  Channel channel_;
  os::Mapping pool_;
  os::Mapping seg_map_;
  const shm::TopicPoolHeader* hdr_ = nullptr;
  const std::byte* data_ = nullptr;
  shm::TopicSubSegment* seg_ = nullptr;
  std::uint32_t samples_ = 0;
  std::uint32_t sample_size_ = 0;
  std::uint32_t stride_ = 0;
  WaitPolicy wait_{};
  const pid_t pid_ = os::current_pid();
  DeadlineMutex recv_mu_;
  std::uint64_t head_ MBMQ_GUARDED_BY(recv_mu_) = 0;
  std::uint64_t expected_seq_ MBMQ_GUARDED_BY(recv_mu_) = 0;
  const char* broken_ MBMQ_GUARDED_BY(recv_mu_) = nullptr;  // a protocol error seen
  bool redirected_ MBMQ_GUARDED_BY(recv_mu_) = false;
  std::uint64_t key_ MBMQ_GUARDED_BY(recv_mu_) = 0;
  std::atomic<bool> kicking_{false};
};

// For tests: the raw segment a subscriber shares with its publisher, to play a hostile one.
struct TopicTestAccess {
  static shm::TopicSubSegment* segment(Subscriber& s) { return s.core_->segment_for_test(); }
};

}  // namespace mbmq::detail
