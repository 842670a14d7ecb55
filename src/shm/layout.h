// shm/layout.h: the bytes two processes share for one channel. Read this before touching ipc/.
//
// A channel is one memfd segment (sealed F_SEAL_SHRINK|F_SEAL_GROW) plus a SOCK_SEQPACKET
// socketpair (the "control socket"). Both ends map the segment; the control socket carries file
// descriptors (large-buffer extents, queue doorbells) and tells each end when the other is gone.
//
//   offset 0            SegmentHeader      written once by the creator, then read-only
//   kDirOffset          Direction dir[0]   messages from side 0 to side 1
//   + sizeof(Direction) Direction dir[1]   messages from side 1 to side 0
//   pool_offset         slot[0 .. 2n)      message buffers; side s owns slots [s*n, (s+1)*n)
//
// Trust: the segment is shared with a process that may be buggy or hostile. Geometry is copied
// into private memory at attach and validated once; afterwards only the ring indices, descriptors
// and wake words are read from shared memory, each read once into a local and validated before
// use. Authoritative copies of our own ring index live in private memory: the shared copy is only
// published, never read back.
//
// Protocol (numbers are cited in ipc/ as "(P3)" etc.):
//  (P1) Create: side 0 makes the memfd, seals it, writes SegmentHeader, zeroes the directions.
//       Side 1 (a forked child, or a process the end was sent to) validates the header against
//       fstat() and its own limits before using any offset.
//  (P2) Allocate: a side takes a free slot of its own (private free list), or for payloads above
//       slot_size an *extent*: a memfd of its own, sealed against shrinking, id < kMaxExtents.
//  (P3) Send: write the payload in place; for an extent whose fd the peer has not seen at this
//       generation, first send it on the control socket (CtlMsg::Extent); then write the Desc
//       into ring[t % cap], store-release its seq = t + 1 (pairs with the consumer's acquire load
//       in P5), then store-release tail = t + 1 (read only for validation, P6). A batch writes
//       each entry and its seq so, then stores tail once, after the last.
//  (P3b) Handles: fds and channel ends attached to a buffer are sent first, as one
//       CtlMsg::Handles packet naming the buffer (id, gen), with their fds (SCM_RIGHTS); then the
//       Desc, with kDescHasHandles. sendmsg() on a Unix socket has queued the packet at the
//       receiver before it returns, so a receiver that pops such a Desc reads its control socket
//       (without blocking) until it holds the packet; missing or mismatched, it is a protocol
//       error. Handles never delivered are closed: with the receiver's stash when its end
//       closes, or by the kernel with the socket.
//  (P3c) Sealed send: when the receiving side is untrusted (SegmentHeader::untrusted_mask) and
//       the payload is larger than copy_threshold (so it is an extent), the sender makes the
//       extent immutable first: it unmaps its writable shared mapping, adds F_SEAL_WRITE |
//       F_SEAL_SEAL (SHRINK|GROW are there from P2), maps it back copy-on-write (its later writes
//       stay private), gives it a new generation and sends the fd with kExtentSealed. If the seal
//       cannot be added (EBUSY: a writable mapping exists elsewhere; EPERM), or the extent is
//       already sealed (the app's writes since live only in its private view), the payload is
//       first copied into a fresh extent, which is then sealed. A sealed extent sent again, to
//       anyone, always goes through a fresh extent (its bytes are in the private view).
//       Fresh pages: a call() that sent a sealed extent prepares one spare extent of that size
//       while it waits (ipc/buffer_table.h wants_spare); it is sealed like any other, so only
//       once no writable mapping of it is left (the kernel refuses F_SEAL_WRITE before that).
//       An extent of 2 MiB or more made to be sealed (and the spare) is a hugetlb memfd, its size
//       a multiple of 2 MiB, where the kernel's pool has the pages (else a 4 KiB memfd): nothing
//       in the protocol changes, the receiver's checks are the same. A copy-on-write view of a
//       hugetlb file reserves huge pages; where the pool cannot, that end reads a private copy.
//       copy_threshold 0 with a side untrusted means kDefaultCopyThreshold (64 MiB).
//  (P4) Wake: seq_cst fence, then load consumer_sleeping. If set, bump the consumer's `doorbell`
//       word and FUTEX_WAKE it. A consumer redirected to a queue (doorbell_gen != 0) is woken
//       through the queue instead, (P4q) below; its consumer_sleeping stays 0.
//  (P4q) Queue wake: a MsgQueue sends the peer of each channel redirected to it a
//       CtlMsg::Doorbell with three fds (QueueReadyPage, QueueWaitPage, the queue's signal
//       socket) and the channel's slot index q < kQueueCapacity in CtlMsg::id. The producer maps
//       the ready page read-write and the wait page read-only, each only if it is a memfd of at
//       least a page sealed against shrinking (a truncated page would SIGBUS us), and checks that
//       the signal fd is a socket; else a protocol error. After pushing a descriptor (P3):
//         0. seq_cst fence; if hot == q + 1 (read-only page): the queue polls our ring on every
//            look: skip step 1 (the single busy channel pays no bitmap traffic);
//         1. old = ready[q / 64].fetch_or(bit q % 64); if old == 0: summary[q / 4096]
//            .fetch_or(bit (q / 64) % 64)  (both acq_rel, after the ring entry's release);
//            then a seq_cst fence (pairs with the queue's fence in P6q);
//         2. s = sleepers (relaxed, read-only page); if s & kQueueSleepersMask: fetch_add(1,
//            release) on the ready page's `word`, FUTEX_WAKE(word, 1); if s & kQueueArmed: send
//            one byte on the signal socket, MSG_DONTWAIT (it never blocks; a full socket is
//            already readable).
//       No system call while the queue is awake. The producer keeps the fds, so that an end moved
//       to another process (HandleMeta doorbell_gen) wakes the same queue.
//  (P5) Receive: acquire-load ring[h % cap].seq; if it is h + 1, copy the Desc to a local and
//       store-release head (pairs with the producer's acquire load in P3's space check); a
//       batch copies each entry so, then stores head once, after the last.
//       Validate the Desc: kind known; for Request/OneWay the buffer must be the peer's, not held
//       by us already; for Reply/Return it must be ours, lent, with a matching generation; size
//       within capacity. Anything else is a protocol error: the channel closes, nothing else does.
//  (P5b) Untrusted receive: an untrusted side copies a payload of up to copy_threshold bytes (a
//       pool slot, or an extent it maps read-only) into its private memory when it takes the
//       message, before the application sees a byte; a peer writing on afterwards changes
//       nothing the application sees. Its answer is copied back (memcpy into the slot, pwrite
//       into the extent). A larger payload must name an extent whose fd came with kExtentSealed
//       and has F_SEAL_WRITE|F_SEAL_SHRINK|F_SEAL_GROW|F_SEAL_SEAL (F_SEAL_FUTURE_WRITE is not
//       enough: it leaves writable mappings); it is mapped copy-on-write, zero copies. Anything
//       else is a protocol error. Replies to an untrusted caller follow the same rule.
//  (P6) Sleep: read the wake word, store consumer_sleeping = 1, seq_cst fence, re-check the ring
//       and the peer-closed flag, validate tail (garbage there is a protocol error), then
//       FUTEX_WAIT(word, value read). The fence pairs with P4's: at least one side sees the
//       other's store, so a wake-up is never lost.
//  (P6q) Queue wait: the queue exchanges to 0 each non-zero summary word, then each ready word
//       it names, and polls the channels of the bits it got (P5), round-robin: a channel that
//       delivered goes to the back of a private list, and stays there until a poll finds it
//       empty. Sleeping: read `word`, store sleepers (+1), seq_cst fence, look once more,
//       FUTEX_WAIT(word, value read, at most QueueCore::kSafetyNetNs, 1 s), store sleepers (-1).
//       The fd (MsgQueue::fd(), the signal socket's other end): a wait() that finds nothing drains
//       the socket, sets kQueueArmed, fences and looks once more before it returns TimedOut; the
//       next wait() clears kQueueArmed. The ready bits are hints written by every peer of the
//       queue: a peer can set or clear other channels' bits. Setting costs spurious polls; clearing
//       is caught by a poll of every channel (a "full scan") after a wake-up that found no bit,
//       every 10 ms while the queue looks, and 1 s after it last looked (a sleep's timeout; a timer
//       that makes an armed fd readable).
//  (P7) Reply: the callee writes the answer into the same buffer and sends Desc{Reply} naming it;
//       the buffer returns to the caller (state 1 of DESIGN.md's buffer life), no allocation.
//       A request released without an answer is replied to with status NoReply; a one-way message
//       is given back with Desc{Return}.
//  (P7r) Slot return: a one-way message in a pool slot is given back without a descriptor. The
//       consumer, dropping it, sets the slot's bit (slot k: bit k % 64 of word k / 64) in
//       `returned` of the producer's Direction (fetch_or, seq_cst: its reads of the payload happen
//       before; one per word for a batch), then loads producer_waiting and, if set, bumps `room`
//       and FUTEX_WAKEs it. The producer harvests the words of its slots (each non-zero one:
//       exchange 0, acquire) only when it has no free slot: one line transfer per up to
//       slots_per_side messages, none per message. Extents still come back with Desc{Return}
//       (their mapping and fd are per-id state the producer must see in ring order).
//  (P6r) Waiting for room (Channel::buffer with a deadline, when the pool is exhausted): spin per
//       the WaitPolicy looking at `returned`, the inbound ring and local frees; then read `room`,
//       producer_waiting += 1, seq_cst fence, look once more, FUTEX_WAIT(room, value read, the
//       deadline), producer_waiting -= 1. The fence pairs with the consumer's seq_cst fetch_or:
//       either the producer sees the bit, or the consumer sees the waiter.
//  (P7b) Replacement reply: an answer cannot be written into a sealed memfd. The replier puts
//       it (size bytes) into a fresh memfd of its own (pwrite, no mapping), sealed as in P3c if
//       the caller is untrusted and size > copy_threshold, sends it as CtlMsg::Extent{caller's
//       extent id, its gen, kExtentReplace}, then Desc{Reply | kDescReplaced}. The caller checks
//       it like P5b, maps it, and gives its extent the new fd and a new generation. A
//       cooperative side answering an untrusted caller with more than copy_threshold bytes does
//       the same, sealed.
//  (P8) Close / death: the control socket's hang-up (the peer closed its end, exited or was
//       killed) is seen by a per-process watcher thread (ipc/peer_watch) sleeping in epoll; it
//       marks the endpoint closed and wakes its waiters. Outstanding calls then return
//       PeerClosed (the "automatic reply", the call's buffer is its caller's again); every other
//       buffer lent to the dead peer (requests sent through a queue, one-way messages, buffers of
//       calls that timed out) returns to our pool, and lent extents are unmapped and closed, when
//       the end is found closed (the queue delivers its final PeerClosed, a call or receive
//       returns, or the end is closed locally). Nothing is named in the filesystem, so nothing
//       is left behind.
//
// Control socket rules (who may block, what is bounded):
//  - Writes are non-blocking (MSG_DONTWAIT) and never made while waiting. Each end asks for a
//    416 KiB send buffer (555 small packets, 333 of 8 handles). Every packet precedes the
//    descriptor that needs it, and the receiver reads packets (in order) when it takes that
//    descriptor. So when a write finds the socket full: if the peer has not taken all our
//    descriptors, it is slow, and the send returns WouldBlock with nothing sent (back-pressure,
//    as a full ring; a reply is kept for a retry, never dropped); if it has taken them all, it
//    does not read its control socket: the channel is closed with a protocol error. Never a
//    blocked write, never a dropped packet (which would desynchronize the two streams).
//  - Reads are lazy and stop at what a descriptor needs (control messages travel in descriptor
//    order). Kept meanwhile: one extent fd and one replacement fd per extent id, one doorbell,
//    and handle packets up to 2 * (slots + extents) packets and kMaxStashedHandleFds fds (more is
//    a protocol error).
//  - Ring room: each direction's ring can always take every descriptor that names a buffer
//    (2 * (slots_per_side + kMaxExtents) <= kRingCapacity); ReleaseExtent hints are only pushed
//    beyond that reserve. So a reply or a return never finds the ring full unless the peer
//    published a head behind what it read (a protocol error, never a dropped answer).
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace mbmq::shm {

inline constexpr std::uint64_t kMagic = 0x31'51'4d'42'4d'42'4d'00ull;  // "\0MBMBMQ1"
inline constexpr std::uint32_t kLayoutVersion = 9;    // bump on any change to this file
inline constexpr std::uint32_t kRingCapacity = 1024;  // descriptors per direction (power of two)
inline constexpr std::uint32_t kMaxExtents = 64;      // extent ids per side
// As many as the ring's reserve allows (2 * (slots + extents) <= kRingCapacity, "Ring room"
// above): a stream is as deep as its pool (#14; 64 before layout v9).
inline constexpr std::uint32_t kMaxSlotsPerSide = 448;
inline constexpr std::uint32_t kReturnedWords = kMaxSlotsPerSide / 64;  // Direction::returned
inline constexpr std::uint32_t kMinSlotSize = 64;
inline constexpr std::uint32_t kMaxSlotSize = 16u << 20;
inline constexpr std::uint32_t kExtentBit = 0x8000'0000u;  // Desc::buffer: an extent id, not a slot
inline constexpr std::uint64_t kMaxExtentSize = 0xFFFF'F000ull;  // sizes travel as uint32
// copy_threshold when the creator asked for none (0) and a side is untrusted: payloads up to 64
// MiB are copied (P5b), larger ones sealed (P3c). Measured on a 4 KiB-page machine, one copy
// costs less than the fresh, mapped pages a sealed memfd needs per message (README, trust modes).
// Not every size: a peer announcing a sparse 4 GiB payload would make the untrusted end allocate
// and fill a 4 GiB private copy (found by review).
inline constexpr std::uint32_t kDefaultCopyThreshold = 64u << 20;
// An untrusted end keeps the private copies of extents it no longer holds for reuse (no fresh
// pages per message) up to this many bytes in all; beyond, they are freed.
inline constexpr std::uint64_t kRetainedCopyBytes = std::uint64_t{2} * kDefaultCopyThreshold;
inline constexpr std::uint32_t kMaxHandles = 8;  // fds / channel ends attached to one message

enum class DescKind : std::uint16_t {
  Request = 1,        // buffer owned by the sender; expects a Reply in the same buffer (P3, P7)
  Reply = 2,          // buffer owned by the receiver, coming back with the answer (P7)
  OneWay = 3,         // buffer owned by the sender; the receiver gives it back with Return
  Return = 4,         // buffer owned by the receiver, given back unanswered (P7)
  ReleaseExtent = 5,  // the sender freed extent `buffer`; the receiver may unmap it
};

enum class DescStatus : std::uint16_t { Ok = 0, NoReply = 1 };

// Desc::kind bit: handles travel with this message (Request, OneWay or Reply only): a
// CtlMsg::Handles for the same buffer and generation was sent on the control socket before the
// descriptor was published (P3b).
inline constexpr std::uint16_t kDescHasHandles = 0x8000;
// Desc::kind bit (Reply only): the answer is in a new memfd that replaces the caller's extent,
// sent as CtlMsg::Extent with kExtentReplace before the descriptor (P7b).
inline constexpr std::uint16_t kDescReplaced = 0x4000;
inline constexpr std::uint16_t kDescFlags = kDescHasHandles | kDescReplaced;

// One message descriptor, as the two ends handle it in private memory. It travels packed in a
// RingEntry (RingEntry::store / load): the same values, 12 bytes beside the entry's seq.
struct Desc {
  std::uint32_t buffer;  // slot index, or kExtentBit | extent id
  std::uint32_t size;    // payload bytes
  std::uint32_t gen;     // generation of the buffer (slot reuse count / extent generation)
  std::uint16_t kind;    // DescKind, | kDescHasHandles, kDescReplaced
  std::uint16_t status;  // DescStatus (Reply only)
};
static_assert(std::is_standard_layout_v<Desc> && std::is_trivially_copyable_v<Desc>);
static_assert(sizeof(Desc) == 16 && alignof(Desc) == 4);

// RingEntry::buffer: an extent (its id in the low bits), else a slot index.
inline constexpr std::uint16_t kWireExtentBit = 0x8000;
// RingEntry::kind: DescKind and its flags, with DescStatus in bits 8-11 (values <= 15 travel,
// so a status the receiver does not know is seen, and refused, as it is).
inline constexpr std::uint16_t kWireStatusShift = 8;
inline constexpr std::uint16_t kWireStatusMask = 0x0f00;
static_assert((kWireStatusMask & kDescFlags) == 0);
static_assert(2 * kMaxSlotsPerSide <= kWireExtentBit && kMaxExtents <= kWireExtentBit);

// One ring entry, four to a cache line. The consumer polls `seq` of the entry at its head: one
// cache-line transfer tells it both that a message is there and what it is (a separate tail
// index would cost a second, serial, transfer per message), and a consumer that lags behind its
// producer takes four descriptors per transfer.
struct RingEntry {
  // Producer: store-release of (position + 1) after writing the fields below (P3). Consumer:
  // acquire load; the entry at position h is ready when seq == h + 1 (earlier laps left
  // h + 1 - k * capacity).
  std::atomic<std::uint32_t> seq;
  // Plain fields: the producer writes them before seq's store-release, the consumer copies them
  // (load()) after seq's acquire load. A hostile writer racing with the copy only produces a
  // torn value that validation (P5) rejects.
  std::uint32_t size;    // Desc::size
  std::uint32_t gen;     // Desc::gen
  std::uint16_t buffer;  // Desc::buffer: slot index, or kWireExtentBit | extent id
  std::uint16_t kind;    // Desc::kind | Desc::status << kWireStatusShift

  // Writes d's fields (not seq). d.buffer is one of ours: a slot index below 2 *
  // kMaxSlotsPerSide or kExtentBit | an id below kMaxExtents; d.status <= 15.
  void store(const Desc& d) noexcept {
    size = d.size;
    gen = d.gen;
    buffer = static_cast<std::uint16_t>((d.buffer & kExtentBit) != 0
                                            ? kWireExtentBit | (d.buffer & (kWireExtentBit - 1))
                                            : d.buffer & (kWireExtentBit - 1));
    kind = static_cast<std::uint16_t>((d.kind & ~kWireStatusMask) |
                                      ((d.status << kWireStatusShift) & kWireStatusMask));
  }
  // The descriptor, each field read once (a hostile peer may be writing them).
  Desc load() const noexcept {
    Desc d;
    d.size = size;
    d.gen = gen;
    const std::uint16_t b = buffer;
    d.buffer = (b & kWireExtentBit) != 0 ? kExtentBit | (b & (kWireExtentBit - 1)) : b;
    const std::uint16_t k = kind;
    d.kind = static_cast<std::uint16_t>(k & ~kWireStatusMask);
    d.status = static_cast<std::uint16_t>((k & kWireStatusMask) >> kWireStatusShift);
    return d;
  }
};
static_assert(std::is_standard_layout_v<RingEntry>);
static_assert(sizeof(RingEntry) == 16 && offsetof(RingEntry, size) == 4 &&
              offsetof(RingEntry, gen) == 8 && offsetof(RingEntry, buffer) == 12 &&
              offsetof(RingEntry, kind) == 14);

// One direction of a channel: producer side p sends, consumer side 1-p receives.
struct Direction {
  // Producer: store-release after each entry's seq (P3). Consumer: reads it only to validate the
  // ring before sleeping (P6): tail - head must be <= capacity, and tail != head implies the head
  // entry is ready. Not read on the spinning path, so its line stays with the producer.
  alignas(64) std::atomic<std::uint32_t> tail;
  // Consumer: store-release after copying an entry (P5). Producer: acquire load, only when its
  // cached copy says the ring is full.
  alignas(64) std::atomic<std::uint32_t> head;
  // Consumer: 1 before sleeping, 0 after (store + seq_cst fence, P6). Producer: load after its
  // seq_cst fence (P4). A hint: a wrong value costs a spurious or a missed wake of this
  // channel's own consumer only (that consumer still wakes at its deadline or on the hang-up).
  alignas(64) std::atomic<std::uint32_t> consumer_sleeping;
  // Futex word the consumer sleeps on when not redirected to a queue. Producer: fetch_add(1,
  // release) then FUTEX_WAKE (P4). Consumer: acquire load before sleeping, FUTEX_WAIT on it (P6).
  std::atomic<std::uint32_t> doorbell;
  // Consumer: which word it sleeps on: 0 = `doorbell` above; g > 0 = the queue doorbell page sent
  // as CtlMsg::Doorbell with generation g. Store-release after sending that message; producer
  // acquire load in P4, then reads the control socket for the page (never blocking on it).
  std::atomic<std::uint32_t> doorbell_gen;
  std::uint32_t reserved0[13];
  // (P7r) Slots the consumer gives back, one bit per producer slot (the producer's k-th slot, k <
  // slots_per_side <= kMaxSlotsPerSide: bit k % 64 of word k / 64). Consumer: fetch_or(bits,
  // seq_cst) on a word when it drops one-way messages that arrived in its slots (its RMW is also
  // the fence before the load of producer_waiting below). Producer: exchange(0, acquire) of each
  // non-zero word of its slots when its free list is empty, then frees only bits whose slot it lent
  // one-way (others, and words or bits past slots_per_side, are ignored: the peer can only lose
  // its own messages by lying here). One line with the two words below, which the consumer keeps
  // between the producer's harvests.
  alignas(64) std::atomic<std::uint64_t> returned[kReturnedWords];
  // Producer: threads of the producer waiting for a buffer to come back (fetch_add(1) before the
  // seq_cst fence and its last look, fetch_sub(1) after). Consumer: relaxed load after its
  // fetch_or on `returned` (or after pushing a Return): if non-zero, fetch_add(1, release) on
  // `room` and FUTEX_WAKE it. A hint: a wrong value costs the producer a spurious or a missed
  // wake-up (it still wakes at its deadline or on the hang-up).
  std::atomic<std::uint32_t> producer_waiting;
  // The futex word the producer sleeps on for room (P6r). Written as above by the consumer, and by
  // the producer's own process on hang-up, close and local frees.
  std::atomic<std::uint32_t> room;
  // Producer writes, consumer reads (P3/P5).
  alignas(64) RingEntry ring[kRingCapacity];
};
static_assert(std::is_standard_layout_v<Direction>);
static_assert(offsetof(Direction, tail) == 0 && offsetof(Direction, head) == 64);
static_assert(offsetof(Direction, consumer_sleeping) == 128 &&
              offsetof(Direction, doorbell) == 132);
static_assert(offsetof(Direction, doorbell_gen) == 136 && offsetof(Direction, returned) == 192);
static_assert(offsetof(Direction, producer_waiting) == 248 && offsetof(Direction, room) == 252);
static_assert(offsetof(Direction, ring) == 256);
static_assert(sizeof(Direction) == 256 + sizeof(RingEntry) * kRingCapacity);
static_assert(std::atomic<std::uint64_t>::is_always_lock_free);
static_assert(kMaxSlotsPerSide % 64 == 0 && kReturnedWords == 7,
              "Direction::returned has one bit per slot, in one line with producer_waiting");
static_assert(2 * (kMaxSlotsPerSide + kMaxExtents) <= kRingCapacity, "the ring's reserve");
static_assert(std::atomic<std::uint32_t>::is_always_lock_free);
static_assert((kRingCapacity & (kRingCapacity - 1)) == 0);

// Written once by side 0 before the memfd is shared (P1); never written again. Side 1 validates a
// private copy; neither side reads it from shared memory after attach.
struct SegmentHeader {
  std::uint64_t magic;
  std::uint32_t version;
  std::uint32_t slots_per_side;
  std::uint32_t slot_size;
  std::uint32_t ring_capacity;
  std::uint64_t dir_offset[2];
  std::uint64_t pool_offset;
  std::uint64_t segment_size;
  // Limits both sides enforce (see include/mbmq/channel.h ChannelOptions): requests a side may
  // have outstanding (0: as many as it has buffers), handles per message (<= kMaxHandles).
  std::uint16_t max_in_flight;
  std::uint16_t max_handles;
  // Trust (P3c, P5b): bit s set = side s is untrusted of its peer: it copies payloads of up to
  // copy_threshold bytes into private memory and accepts larger ones only in sealed memfds.
  std::uint32_t untrusted_mask;
  std::uint32_t copy_threshold;  // >= slot_size when untrusted_mask != 0 (0 asked: 64 MiB)
  std::uint32_t reserved[15];
};
static_assert(std::is_standard_layout_v<SegmentHeader> && sizeof(SegmentHeader) == 128);
static_assert(offsetof(SegmentHeader, dir_offset) == 24 &&
              offsetof(SegmentHeader, segment_size) == 48 &&
              offsetof(SegmentHeader, max_in_flight) == 56 &&
              offsetof(SegmentHeader, untrusted_mask) == 60 &&
              offsetof(SegmentHeader, copy_threshold) == 64);

inline constexpr std::uint64_t kDirOffset = 128;
static_assert(kDirOffset % alignof(Direction) == 0);

// A MsgQueue's shared pages (P4q/P6q). Channels per queue: slot indices q < kQueueCapacity.
inline constexpr std::uint32_t kQueueCapacity = 16384;
inline constexpr std::size_t kQueuePageSize = 4096;
inline constexpr std::uint32_t kQueueArmed = 0x8000'0000u;         // QueueWaitPage::sleepers
inline constexpr std::uint32_t kQueueSleepersMask = 0x7fff'ffffu;  // waiters in FUTEX_WAIT

// Written by the queue and by the producer of every channel redirected to it (a memfd sealed
// against shrinking and growing, mapped read-write by all). Every field is a hint: validation of
// what a channel holds is its ring's (P5).
struct QueueReadyPage {
  // Bit i set: ready[i] may be non-zero. Producers: fetch_or(acq_rel) when they set the first bit
  // of ready[i]. The queue: exchange(0, acquire) after a relaxed load saw it non-zero. The first
  // four ready words share its cache line: a queue of up to 256 channels takes a message's bits
  // in one line transfer.
  alignas(64) std::atomic<std::uint64_t> summary[kQueueCapacity / 4096];
  // Bit q % 64 of ready[q / 64]: channel q may have messages. Producers: fetch_or(acq_rel) after
  // publishing the descriptor. The queue: exchange(0, acquire) for each summary bit it took.
  std::atomic<std::uint64_t> ready[kQueueCapacity / 64];
  // Futex word of the queue's sleeping waiters. Producers: fetch_add(1, release) then FUTEX_WAKE
  // (P4q step 3). Waiters: acquire load before announcing, FUTEX_WAIT on the value (P6q).
  alignas(64) std::atomic<std::uint32_t> word;
};
static_assert(std::is_standard_layout_v<QueueReadyPage>);
static_assert(offsetof(QueueReadyPage, summary) == 0 && offsetof(QueueReadyPage, ready) == 32 &&
              offsetof(QueueReadyPage, word) == 2112);
static_assert(sizeof(QueueReadyPage) <= kQueuePageSize);
static_assert(std::atomic<std::uint64_t>::is_always_lock_free);

// Written by the queue only, read by producers: a memfd sealed with F_SEAL_FUTURE_WRITE after the
// queue mapped it, so no peer can map it writable (a peer that cleared it would stop every wake).
struct QueueWaitPage {
  // Bits 0-30: the queue's waiters asleep in FUTEX_WAIT; kQueueArmed: the owner may be in
  // epoll/poll on the fd. The queue: relaxed store (under its mutex), then a seq_cst fence before
  // its last look (P6q). Producers: relaxed load after their seq_cst fence (P4q step 2).
  alignas(64) std::atomic<std::uint32_t> sleepers;
  // q + 1: the queue polls channel q's ring on every look (the last two messages came from it),
  // so its producer need not mark it (P4q step 1 is skipped); 0: none. The queue: relaxed store,
  // seq_cst fence, then one more poll of the slot it replaced. Producers: relaxed load after
  // their fence (P4q step 0).
  std::atomic<std::uint32_t> hot;
};
static_assert(std::is_standard_layout_v<QueueWaitPage> && offsetof(QueueWaitPage, sleepers) == 0 &&
              offsetof(QueueWaitPage, hot) == 4);
static_assert(sizeof(QueueWaitPage) <= kQueuePageSize);

// Control-socket message (SOCK_SEQPACKET, one per packet). Extent and Doorbell carry one fd;
// Handles carries `count` HandleMeta records after the CtlMsg and their fds in the same order.
// The socket is private to the two processes, but its sender may be hostile: every field, size
// and fd count is checked against the others before anything is kept.
enum class CtlType : std::uint32_t {
  Extent = 1,    // fd = extent memfd for (id, gen)
  Doorbell = 2,  // fds = the queue's ready page, wait page, signal socket (P4q); id = slot, gen
  Handles = 3,   // (P3b) handles of the message naming buffer (id, gen)
};
// CtlMsg::aux bits of an Extent message.
inline constexpr std::uint32_t kExtentSealed = 1;   // the memfd is immutable (P3c); checked
inline constexpr std::uint32_t kExtentReplace = 2;  // replaces the receiver's own extent (P7b)
struct CtlMsg {
  std::uint32_t type;  // CtlType
  std::uint32_t id;  // extent id (Extent); buffer id, as in Desc::buffer (Handles); slot (Doorbell)
  std::uint32_t gen;  // extent generation, doorbell generation, or buffer generation
  // Handles: count in bits 0-7; bit 8 set when the buffer belongs to the receiver (a Reply).
  std::uint32_t aux;
};
static_assert(std::is_standard_layout_v<CtlMsg> && sizeof(CtlMsg) == 16);
inline constexpr std::uint32_t kHandlesForReply = 0x100;

// The wire kind of a handle (HandleMeta::kind). The application sees mbmq::HandleKind.
enum class WireHandle : std::uint32_t { Fd = 1, ChannelEnd = 2, FileRange = 3 };
// One handle of a CtlType::Handles packet. Fd: one fd, the rest zero. ChannelEnd: two fds (the
// segment memfd, the control socket) and the end's private state, as Channel::send_over sends it,
// plus three more when doorbell_gen != 0: the queue doorbell the end's peer sent (CtlMsg::Doorbell
// with that generation and slot doorbell_slot: ready page, wait page, signal socket), which the
// end had already taken off its control socket. The wait policy does not travel: it is the
// receiving process's own choice.
struct HandleMeta {
  std::uint32_t kind;  // WireHandle
  std::uint32_t side;
  std::uint32_t tx_tail;
  std::uint32_t rx_head;
  std::uint32_t next_extent_gen;
  std::uint32_t doorbell_gen;   // 0: no doorbell fds follow
  std::uint32_t doorbell_slot;  // with doorbell_gen != 0: the slot index (P4q), else 0
  std::uint32_t reserved;       // 0
};
static_assert(std::is_standard_layout_v<HandleMeta> && sizeof(HandleMeta) == 32);
static_assert(offsetof(HandleMeta, doorbell_slot) == 24);
// fds of one ChannelEnd handle: segment, control socket, and the three of a queue doorbell.
inline constexpr std::uint32_t kChannelEndFds = 2;
inline constexpr std::uint32_t kDoorbellFds = 3;

// HandleMeta's bytes for kind FileRange (one fd): a range of a regular file. Written by the
// sender into the Handles packet; the receiver checks at take time that the fd is a regular
// file and the range lies within its size (Buffer::take_file).
struct FileRangeMeta {
  std::uint32_t kind;  // WireHandle::FileRange
  std::uint32_t reserved;
  std::uint64_t offset;
  std::uint64_t length;
  std::uint64_t reserved2;
};
static_assert(std::is_standard_layout_v<FileRangeMeta> && sizeof(FileRangeMeta) == 32 &&
              offsetof(FileRangeMeta, offset) == 8 && offsetof(FileRangeMeta, length) == 16);

}  // namespace mbmq::shm
