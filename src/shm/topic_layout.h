// shm/topic_layout.h: the bytes a topic's publisher shares with its subscribers (#15). The
// protocol steps (T1)-(T10) and the threat model are in docs/design/topic.md; the code cites them.
//
//   pool memfd (one per topic): TopicPoolHeader (one page), then `samples` sample slots of
//     sample_stride bytes. The publisher maps it read-write and seals it F_SEAL_FUTURE_WRITE |
//     F_SEAL_SEAL before sharing; subscribers map it read-only (they cannot map it writable).
//   sub-segment memfd (one per subscriber, shared with that subscriber only): TopicSubSegment.
//     Everything a subscriber can write is here, so its garbage reaches nobody else.
//
// Trust: the publisher never reads back what it wrote into a sub-segment (private records are
// authoritative) and reads each subscriber-written word once into a local before validating it.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace mbmq::shm {

inline constexpr std::uint64_t kTopicMagic = 0x31'43'49'50'4f'54'4d'00ull;  // "\0MTOPIC1"
inline constexpr std::uint32_t kTopicLayoutVersion = 1;   // bump on any change to this file
inline constexpr std::uint32_t kTopicRingCapacity = 256;  // entries per subscriber ring
inline constexpr std::uint32_t kMaxTopicSamples = 1024;   // samples per pool
inline constexpr std::uint32_t kTopicReturnedWords = kMaxTopicSamples / 64;
inline constexpr std::uint64_t kTopicPoolDataOffset = 4096;  // samples start on the second page
inline constexpr std::uint32_t kMaxTopicSampleSize = 64u << 20;

// TopicEntry::state = (position + 1) << 2 | tag. 0: never written. (T3, T5, T8)
inline constexpr std::uint64_t kTopicPublished = 0;  // publisher: store-release after the fields
inline constexpr std::uint64_t kTopicTaken = 1;      // subscriber: CAS from Published (T5)
inline constexpr std::uint64_t kTopicDropped = 2;    // publisher: CAS from Published (T8)
inline constexpr std::uint32_t kTopicVerdictProtocol = 1;  // TopicSubSegment::verdict

constexpr std::uint64_t topic_state(std::uint64_t pos, std::uint64_t tag) noexcept {
  return ((pos + 1) << 2) | tag;
}

// Written once by the publisher before the pool fd is shared (T1), except `wake`.
struct TopicPoolHeader {
  std::uint64_t magic;
  std::uint32_t version;
  std::uint32_t samples;        // <= kMaxTopicSamples
  std::uint32_t sample_size;    // payload capacity of a sample
  std::uint32_t sample_stride;  // sample_size rounded up to 64
  std::uint64_t pool_size;      // data_offset + samples * sample_stride, == the memfd's size
  std::uint64_t data_offset;    // kTopicPoolDataOffset
  // Subscribers joined now. Publisher: relaxed store on each join and departure. Subscribers: a
  // relaxed load per receive(), a hint only: with more subscribers than CPUs besides the
  // publisher's, a subscriber in WaitMode::Adaptive sleeps at once instead of spinning (it would
  // hold a CPU that another subscriber needs to wake up on). A wrong value costs latency only.
  std::atomic<std::uint32_t> subscribers;
  std::uint32_t reserved[7];
  // The futex word every sleeping subscriber waits on (read-only for them). Publisher:
  // fetch_add(1, release) then FUTEX_WAKE(INT_MAX) when some subscriber announced sleep (T4).
  // Subscribers: acquire load before announcing sleep, FUTEX_WAIT on that value (T5).
  alignas(64) std::atomic<std::uint32_t> wake;
};
static_assert(std::is_standard_layout_v<TopicPoolHeader>);
static_assert(offsetof(TopicPoolHeader, samples) == 12 &&
              offsetof(TopicPoolHeader, sample_stride) == 20 &&
              offsetof(TopicPoolHeader, pool_size) == 24 &&
              offsetof(TopicPoolHeader, data_offset) == 32 &&
              offsetof(TopicPoolHeader, subscribers) == 40 &&
              offsetof(TopicPoolHeader, wake) == 128);
static_assert(sizeof(TopicPoolHeader) <= kTopicPoolDataOffset);

// One ring entry: a sample offered to one subscriber. The fields are relaxed atomics written by
// the publisher before the state's store-release (T3) and copied by the subscriber after its
// acquire load and before its CAS (a seqlock read: the publisher rewrites them only after it saw
// the state Taken or Dropped, so a successful CAS proves the copy).
struct TopicEntry {
  // Publisher: store-release topic_state(t, Published) after the fields (T3); CAS Published ->
  // Dropped (acq_rel, T8). Subscriber: acquire load; CAS Published -> Taken (acq_rel, T5).
  std::atomic<std::uint64_t> state;
  std::atomic<std::uint32_t> sample;  // publisher, relaxed: the sample's index in the pool
  std::atomic<std::uint32_t> gen;     // publisher, relaxed: the sample's generation (for checks)
  std::atomic<std::uint32_t> size;    // publisher, relaxed: payload bytes
  std::uint32_t reserved;
  std::atomic<std::uint64_t> seq;  // publisher, relaxed: the topic's sequence number
};
static_assert(std::is_standard_layout_v<TopicEntry> && sizeof(TopicEntry) == 32);
static_assert(offsetof(TopicEntry, sample) == 8 && offsetof(TopicEntry, seq) == 24);
static_assert(std::atomic<std::uint64_t>::is_always_lock_free);

struct TopicSubSegment {
  // Header: written once by the publisher before the fd is sent (T2); the subscriber validates a
  // private copy at attach and never reads it again.
  std::uint64_t magic;
  std::uint32_t version;
  std::uint32_t ring_capacity;  // kTopicRingCapacity
  std::uint32_t samples;        // as the pool's header
  std::uint32_t reserved0;
  std::uint64_t join_seq;  // seq of the first sample this subscriber can receive
  std::uint32_t reserved1[8];
  // Subscriber: relaxed store 1 then seq_cst fence before its last look (T5), store 0 after the
  // sleep. Publisher: relaxed load after its seq_cst fence (T4). A hint: a lie costs the publisher
  // at most one FUTEX_WAKE per publish, or delays only this subscriber.
  alignas(64) std::atomic<std::uint32_t> sleeping;
  // (T10) A subscriber redirected to a MsgQueue: 1 = "notify me". Subscriber: store 1 after a
  // look that found nothing, seq_cst fence, look once more. Publisher: after T4's fence, a relaxed
  // load, and if set exchange(0, acq_rel); if it got 1, one one-way message on the channel (which
  // wakes the subscriber's queue, P4q); if that send fails, store 1 again. A lie costs the
  // publisher one channel send per publish, or delays only this subscriber (its queue's 1 s
  // safety net still polls it).
  std::atomic<std::uint32_t> notify;
  // Publisher: store 1 (then seq_cst fence, then a last harvest) while it waits for room (T7),
  // 0 after. Subscriber: load after its seq_cst fetch_or on `returned` (T6); if set, it kicks the
  // publisher with a one-way message on its channel. A hint: the publisher's waits are bounded.
  alignas(64) std::atomic<std::uint32_t> publisher_waiting;
  // Publisher: store-release kTopicVerdictProtocol just before it closes the channel of a
  // subscriber that broke the protocol (T9). Subscriber: acquire load once it finds its channel
  // closed, to report Errc::Protocol instead of PeerClosed. Only this subscriber reads it.
  std::atomic<std::uint32_t> verdict;
  // (T6/T7) Bit k % 64 of word k / 64: sample k released. Subscriber: fetch_or(seq_cst) when it
  // drops a sample (its reads of the payload happen before). Publisher: exchange(0, acquire) when
  // it needs room; bits of samples it has not lent to this subscriber are ignored.
  alignas(64) std::atomic<std::uint64_t> returned[kTopicReturnedWords];
  // (T3/T5/T8) Entry t % capacity holds position t.
  alignas(64) TopicEntry ring[kTopicRingCapacity];
};
static_assert(std::is_standard_layout_v<TopicSubSegment>);
static_assert(offsetof(TopicSubSegment, join_seq) == 24 &&
              offsetof(TopicSubSegment, sleeping) == 64 &&
              offsetof(TopicSubSegment, publisher_waiting) == 128 &&
              offsetof(TopicSubSegment, verdict) == 132 &&
              offsetof(TopicSubSegment, returned) == 192 &&
              offsetof(TopicSubSegment, ring) == 192 + 8 * kTopicReturnedWords);
static_assert(sizeof(TopicSubSegment) == 320 + sizeof(TopicEntry) * kTopicRingCapacity);
static_assert((kTopicRingCapacity & (kTopicRingCapacity - 1)) == 0);

// The hello the publisher sends on a new subscriber's channel (T2), with two fds attached: the
// pool memfd, then the subscriber's segment memfd. The subscriber checks it against both headers.
struct TopicHello {
  std::uint64_t magic;  // kTopicMagic
  std::uint32_t version;
  std::uint32_t samples;
  std::uint32_t sample_size;
  std::uint32_t sample_stride;
  std::uint64_t pool_size;
  std::uint64_t sub_size;  // sizeof(TopicSubSegment)
};
static_assert(std::is_standard_layout_v<TopicHello> && sizeof(TopicHello) == 40);

}  // namespace mbmq::shm
