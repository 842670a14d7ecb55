// The parts Endpoint is composed of, each on its own (ipc/buffer_id.h, buffer_table.h,
// sideband.h, peer_trust.h, wait_step.h): what each promises, without a channel around it.
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <vector>

#include "ipc/buffer_id.h"
#include "ipc/buffer_table.h"
#include "ipc/handles.h"
#include "ipc/peer_trust.h"
#include "ipc/queue_bell.h"
#include "ipc/sideband.h"
#include "ipc/wait_step.h"
#include "os/memfd.h"
#include "os/unix_socket.h"
#include "shm/segment.h"

namespace mbmq::detail {
namespace {

using shm::Desc;
using shm::DescKind;

shm::Segment segment(std::uint32_t slots = 4, shm::Limits limits = {}) {
  auto s = shm::Segment::create(slots, 256, limits);
  EXPECT_TRUE(s) << s.error().message();
  return std::move(*s);
}

Desc desc(BufferId id, std::uint32_t size, std::uint32_t gen, DescKind k, std::uint16_t flags = 0,
          std::uint16_t status = 0) {
  return Desc{id.raw(), size, gen,
              static_cast<std::uint16_t>(static_cast<std::uint16_t>(k) | flags), status};
}

// ---- BufferId ----

TEST(BufferIdTest, SlotsAndExtentsAreTellApartAndRoundTrip) {
  EXPECT_FALSE(BufferId::slot(5).is_extent());
  EXPECT_EQ(BufferId::slot(5).slot_index(), 5u);
  EXPECT_TRUE(BufferId::extent(5).is_extent());
  EXPECT_EQ(BufferId::extent(5).extent_index(), 5u);
  EXPECT_EQ(BufferId::from_wire(BufferId::extent(9).raw()), BufferId::extent(9));
  EXPECT_NE(BufferId::slot(9), BufferId::extent(9));
}

// ---- BufferTable ----

TEST(BufferTableTest, SlotsComeFromOurSideAndRunOut) {
  auto seg = segment(4);
  BufferTable t(seg, 1, 1);
  for (int i = 0; i < 4; ++i) {
    auto a = t.alloc(100);
    ASSERT_TRUE(a);
    EXPECT_FALSE(a->id.is_extent());
    EXPECT_GE(a->id.slot_index(), 4u);  // side 1 owns [4, 8)
    EXPECT_EQ(*t.own_state(a->id), OwnState::App);
  }
  auto none = t.alloc(100);
  ASSERT_FALSE(none);
  EXPECT_EQ(none.error().code, Errc::NoBuffers);
  EXPECT_EQ(t.own_state(BufferId::slot(0)), nullptr);  // the peer's slot is not ours
}

TEST(BufferTableTest, FreeingAnExtentTheGenerationThePeerMapsAsksForARelease) {
  auto seg = segment();
  BufferTable t(seg, 0, 1);
  auto a = t.alloc(10000);
  ASSERT_TRUE(a);
  ASSERT_TRUE(a->id.is_extent());
  EXPECT_EQ(t.free_own(a->id), 0u);  // never sent: nothing for the peer to unmap
  auto b = t.alloc(10000);
  ASSERT_TRUE(b);
  t.own_extent(b->id).sent_gen = t.own_extent(b->id).gen;
  EXPECT_EQ(t.free_own(b->id), b->gen);
  EXPECT_EQ(*t.own_state(b->id), OwnState::Free);
}

TEST(BufferTableTest, ExtentGenerationsSkipZero) {
  auto seg = segment();
  BufferTable t(seg, 0, 0xFFFF'FFFFu);
  EXPECT_EQ(t.take_extent_gen(), 0xFFFF'FFFFu);
  EXPECT_EQ(t.take_extent_gen(), 1u);
}

TEST(BufferTableTest, ARepliedBufferIsCheckedThenCommitted) {
  auto seg = segment();
  BufferTable t(seg, 0, 1);
  auto a = t.alloc(10);
  ASSERT_TRUE(a);
  const Desc reply = desc(a->id, 10, a->gen, DescKind::Reply);
  EXPECT_NE(t.check_back(reply, false, &a->id), nullptr);  // not lent yet
  *t.own_state(a->id) = OwnState::LentCall;
  t.request_sent();
  const BufferId other = BufferId::slot(1);
  EXPECT_NE(t.check_back(reply, false, &other), nullptr);   // another call waits
  EXPECT_NE(t.check_back(reply, false, nullptr), nullptr);  // no call waits
  EXPECT_NE(t.check_back(desc(a->id, 10, a->gen + 1, DescKind::Reply), false, &a->id), nullptr);
  EXPECT_NE(t.check_back(desc(a->id, 10, a->gen, DescKind::Reply, 0, 7), false, &a->id), nullptr);
  EXPECT_EQ(*t.own_state(a->id), OwnState::LentCall);  // nothing committed by a check
  ASSERT_EQ(t.check_back(reply, false, &a->id), nullptr);
  EXPECT_EQ(t.take_reply(a->id), OwnState::LentCall);
  EXPECT_EQ(*t.own_state(a->id), OwnState::App);
  EXPECT_EQ(t.requests_out(), 0u);
}

TEST(BufferTableTest, AReturnIsOnlyForAOneWayMessageInAnExtent) {
  auto seg = segment();
  BufferTable t(seg, 0, 1);
  auto x = t.alloc(seg.geometry().slot_size + 1);  // an extent
  ASSERT_TRUE(x);
  ASSERT_TRUE(x->id.is_extent());
  *t.own_state(x->id) = OwnState::LentRequest;
  EXPECT_NE(t.check_back(desc(x->id, 0, x->gen, DescKind::Return), true, nullptr), nullptr);
  *t.own_state(x->id) = OwnState::LentOneWay;
  EXPECT_EQ(t.check_back(desc(x->id, 0, x->gen, DescKind::Return), true, nullptr), nullptr);
  EXPECT_NE(
      t.check_back(desc(x->id, 0, x->gen, DescKind::Return, shm::kDescHasHandles), true, nullptr),
      nullptr);
  // A slot comes back through `returned` (P7r), never with a Return.
  auto a = t.alloc(10);
  ASSERT_TRUE(a);
  *t.own_state(a->id) = OwnState::LentOneWay;
  EXPECT_NE(t.check_back(desc(a->id, 0, a->gen, DescKind::Return), true, nullptr), nullptr);
}

// (P7r) Only bits of slots lent one-way free anything: the peer's other bits are ignored.
TEST(BufferTableTest, ReturnedBitsFreeOnlySlotsLentOneWay) {
  auto seg = segment(4);
  BufferTable t(seg, 0, 1);
  std::vector<BufferTable::Allocated> a;
  for (int i = 0; i < 4; ++i) a.push_back(*t.alloc(10));
  EXPECT_FALSE(t.has_free_slot());
  *t.own_state(a[0].id) = OwnState::LentOneWay;
  *t.own_state(a[1].id) = OwnState::LentRequest;
  *t.own_state(a[2].id) = OwnState::LentCall;              // a[3] stays App
  EXPECT_EQ(t.take_returned(0, ~std::uint64_t{0}), 1u);    // every bit, slots beyond n_ included
  for (std::uint32_t w = 1; w < shm::kReturnedWords; ++w)  // words past the pool: nothing
    EXPECT_EQ(t.take_returned(w, ~std::uint64_t{0}), 0u) << w;
  EXPECT_EQ(*t.own_state(a[0].id), OwnState::Free);
  EXPECT_EQ(*t.own_state(a[1].id), OwnState::LentRequest);
  EXPECT_EQ(*t.own_state(a[2].id), OwnState::LentCall);
  EXPECT_EQ(*t.own_state(a[3].id), OwnState::App);
  EXPECT_TRUE(t.has_free_slot());
  EXPECT_EQ(t.take_returned(0, 1), 0u);  // freed already: a second bit is ignored
  auto again = t.alloc(10);
  ASSERT_TRUE(again);
  EXPECT_EQ(again->id.raw(), a[0].id.raw());
  EXPECT_FALSE(t.alloc(10));
}

// (P7r, layout v9) Word w names slots 64 * w ...: a slot in the last word of the deepest pool
// comes back through its own word only.
TEST(BufferTableTest, ReturnedWordsNameTheirOwnSlots) {
  auto seg = segment(shm::kMaxSlotsPerSide);
  BufferTable t(seg, 1, 1);  // side 1: its slots follow side 0's in the segment
  std::vector<BufferTable::Allocated> a;
  for (std::uint32_t i = 0; i < shm::kMaxSlotsPerSide; ++i) a.push_back(*t.alloc(10));
  EXPECT_FALSE(t.has_free_slot());
  const std::uint32_t last = shm::kMaxSlotsPerSide - 1;  // bit 63 of the last word
  const BufferTable::Allocated* x = nullptr;
  for (const auto& al : a)
    if (al.id.slot_index() == shm::kMaxSlotsPerSide + last) x = &al;
  ASSERT_NE(x, nullptr);
  *t.own_state(x->id) = OwnState::LentOneWay;
  for (std::uint32_t w = 0; w + 1 < shm::kReturnedWords; ++w)
    EXPECT_EQ(t.take_returned(w, std::uint64_t{1} << 63), 0u) << w;
  EXPECT_EQ(t.take_returned(shm::kReturnedWords - 1, std::uint64_t{1} << 63), 1u);
  EXPECT_EQ(*t.own_state(x->id), OwnState::Free);
}

TEST(BufferTableTest, ThePeersBuffersAreHeldOnceAndWithinTheInFlightLimit) {
  auto seg = segment(4);
  BufferTable t(seg, 0, 1);
  const Desc req = desc(BufferId::slot(4), 10, 1, DescKind::Request);
  ASSERT_EQ(t.check_lent(req, 1), nullptr);
  t.take_lent(req);
  EXPECT_TRUE(t.held(BufferId::slot(4)));
  EXPECT_NE(t.check_lent(req, 0), nullptr);  // sent twice
  EXPECT_NE(t.check_lent(desc(BufferId::slot(5), 10, 1, DescKind::Request), 1), nullptr);  // limit
  EXPECT_EQ(t.check_lent(desc(BufferId::slot(5), 10, 1, DescKind::OneWay), 1), nullptr);
  EXPECT_NE(t.check_lent(desc(BufferId::slot(0), 10, 1, DescKind::OneWay), 0), nullptr);   // ours
  EXPECT_NE(t.check_lent(desc(BufferId::slot(5), 257, 1, DescKind::OneWay), 0), nullptr);  // size
  EXPECT_NE(t.check_lent(desc(BufferId::extent(shm::kMaxExtents), 1, 1, DescKind::OneWay), 0),
            nullptr);
}

TEST(BufferTableTest, WhenThePeerIsGoneLentBuffersComeBackAndTheAppKeepsItsOwn) {
  auto seg = segment(4);
  BufferTable t(seg, 0, 1);
  auto lent = t.alloc(10), mine = t.alloc(10);
  ASSERT_TRUE(lent && mine);
  *t.own_state(lent->id) = OwnState::LentOneWay;
  EXPECT_NE(t.busy(), nullptr);
  t.reclaim_lent();
  EXPECT_EQ(*t.own_state(lent->id), OwnState::Free);
  EXPECT_EQ(*t.own_state(mine->id), OwnState::App);
}

TEST(PendingDescsTest, FirstInFirstOut) {
  PendingDescs p;
  for (std::uint32_t i = 0; i < 5; ++i) p.push(Desc{i, 0, 0, 0, 0});
  Desc d;
  for (std::uint32_t i = 0; i < 5; ++i) {
    ASSERT_TRUE(p.pop(&d));
    EXPECT_EQ(d.buffer, i);
  }
  EXPECT_FALSE(p.pop(&d));
}

// ---- Sideband ----

struct SidebandPair {
  SidebandPair(Sideband::Limits limits = {shm::kMaxHandles, 4, 8}) {
    auto p = os::seqpacket_pair();
    EXPECT_TRUE(p);
    a = std::make_unique<Sideband>(std::move(p->first), limits);
    b = std::make_unique<Sideband>(std::move(p->second), limits);
  }
  std::unique_ptr<Sideband> a, b;
};

os::UniqueFd memfd(std::size_t size = 4096) {
  auto fd = os::make_sealed_memfd("parts-test", size);
  EXPECT_TRUE(fd);
  return std::move(*fd);
}

TEST(SidebandTest, AnExtentFdIsStashedUntilItsDescriptorTakesIt) {
  SidebandPair p;
  auto fd = memfd();
  ASSERT_TRUE(p.a->send_extent(3, 17, shm::kExtentSealed, fd.get()));
  EXPECT_FALSE(p.b->has_extent(3, 17));  // nothing read before it is needed
  EXPECT_TRUE(p.b->drain_until([](const Sideband& s) { return s.has_extent(3, 17); }));
  EXPECT_FALSE(p.b->has_replacement(3, 17));
  Stashed st = p.b->take_extent(3);
  EXPECT_TRUE(st.fd);
  EXPECT_TRUE(st.sealed);
  EXPECT_FALSE(p.b->has_extent(3, 17));
}

TEST(SidebandTest, AMalformedPacketIsBadAndDroppedAndOnlyFailingTheChannelStopsReading) {
  SidebandPair p;
  const std::byte junk[3]{};
  ASSERT_TRUE(p.a->send(junk, {}));
  auto fd = memfd();
  ASSERT_TRUE(p.a->send_extent(0, 1, 0, fd.get()));
  ASSERT_TRUE(p.a->send_extent(1, 1, 0, fd.get()));
  EXPECT_EQ(p.b->read_once(), Sideband::Read::Bad);
  EXPECT_NE(p.b->take_failure(), nullptr);
  EXPECT_EQ(p.b->take_failure(), nullptr);  // taken
  // After a hang-up the owner reads on past a bad packet: what the peer queued is delivered.
  EXPECT_EQ(p.b->read_once(), Sideband::Read::Got);
  EXPECT_TRUE(p.b->has_extent(0, 1));
  p.b->fail_channel();
  EXPECT_EQ(p.b->read_once(), Sideband::Read::Nothing);  // no more reading
}

Handles one_fd_handle() {
  Handles hs;
  hs.items[0].meta.kind = static_cast<std::uint32_t>(shm::WireHandle::Fd);
  hs.items[0].fd = memfd();
  hs.count = 1;
  return hs;
}

TEST(SidebandTest, HandlesSentAheadAreBoundedAndClaimingFreesTheBudget) {
  SidebandPair p({shm::kMaxHandles, 2, 8});
  Handles hs = one_fd_handle();
  for (std::uint32_t id = 0; id < 3; ++id)
    ASSERT_TRUE(p.a->send_handles(BufferId::slot(id), 1, HandlesOf::Message, hs));
  EXPECT_EQ(p.b->read_once(), Sideband::Read::Got);
  EXPECT_EQ(p.b->read_once(), Sideband::Read::Got);
  EXPECT_TRUE(p.b->has_handles(BufferId::slot(0), 1, HandlesOf::Message));
  EXPECT_FALSE(p.b->has_handles(BufferId::slot(0), 1, HandlesOf::Reply));
  EXPECT_EQ(p.b->ahead_fds(), 2u);
  p.b->claim_handles(BufferId::slot(0), 1, HandlesOf::Message);
  EXPECT_EQ(p.b->ahead_fds(), 1u);
  EXPECT_EQ(p.b->read_once(), Sideband::Read::Got);  // room again after the claim
  HandlesPtr h = p.b->take_handles(BufferId::slot(0), 1, HandlesOf::Message);
  ASSERT_TRUE(h);
  EXPECT_EQ(h->count, 1u);
  EXPECT_TRUE(h->items[0].incoming);
  ASSERT_TRUE(p.a->send_handles(BufferId::slot(3), 1, HandlesOf::Message, hs));
  EXPECT_EQ(p.b->read_once(), Sideband::Read::Bad);  // a third packet ahead
}

TEST(SidebandTest, MoreHandlesThanTheChannelAllowsAreTheSendersMistake) {
  SidebandPair p({1, 4, 8});
  Handles hs = one_fd_handle();
  hs.items[1].meta.kind = static_cast<std::uint32_t>(shm::WireHandle::Fd);
  hs.items[1].fd = memfd();
  hs.count = 2;
  auto r = p.a->send_handles(BufferId::slot(0), 1, HandlesOf::Reply, hs);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, Errc::InvalidArgument);
}

TEST(SidebandTest, FailingTheChannelDropsWhatThePeerParked) {
  SidebandPair p;
  auto fd = memfd();
  ASSERT_TRUE(p.a->send_extent(1, 1, 0, fd.get()));
  ASSERT_TRUE(p.a->send_extent(1, 1, shm::kExtentReplace, fd.get()));
  const int bell[3] = {fd.get(), fd.get(), fd.get()};
  ASSERT_TRUE(p.a->send_doorbell(2, 5, bell));
  while (p.b->read_once() == Sideband::Read::Got) {
  }
  EXPECT_TRUE(p.b->has_extent(1, 1));
  EXPECT_TRUE(p.b->has_replacement(1, 1));
  EXPECT_TRUE(p.b->has_doorbell(2));
  EXPECT_EQ(p.b->doorbell().slot, 5u);
  EXPECT_NE(p.b->busy(), nullptr);
  p.b->fail_channel();
  EXPECT_FALSE(p.b->has_extent(1, 1));
  EXPECT_FALSE(p.b->has_replacement(1, 1));
  EXPECT_FALSE(p.b->has_doorbell(2));
  EXPECT_EQ(p.b->busy(), nullptr);
}

TEST(SidebandTest, AFullSocketIsWouldBlockWithNothingSent) {
  SidebandPair p;
  const shm::CtlMsg m{};
  const std::span<const std::byte> bytes{reinterpret_cast<const std::byte*>(&m), sizeof m};
  int sent = 0;
  Status s;
  while ((s = p.a->send(bytes, {})) && sent < 1'000'000) ++sent;
  ASSERT_FALSE(s);
  EXPECT_EQ(s.error().code, Errc::WouldBlock);
  int read = 0;
  while (p.b->read_once() != Sideband::Read::Nothing) ++read;  // each is "type" bad, or read
  EXPECT_GT(sent, 0);
}

// ---- PeerTrust ----

TEST(PeerTrustTest, AnExtentMustBeSealedAgainstShrinkingAndImmutableIfAnnounced) {
  const int raw = ::memfd_create("unsealed", MFD_CLOEXEC | MFD_ALLOW_SEALING);
  ASSERT_GE(raw, 0);
  os::UniqueFd unsealed(raw);
  ASSERT_EQ(::ftruncate(raw, 4096), 0);
  os::Mapping map;
  bool sealed = false;
  EXPECT_NE(PeerTrust::map_extent_fd(raw, false, os::Access::ReadWrite, 10, &map, &sealed),
            nullptr);
  auto fixed = memfd();
  EXPECT_EQ(PeerTrust::map_extent_fd(fixed.get(), false, os::Access::ReadWrite, 10, &map, &sealed),
            nullptr);
  EXPECT_FALSE(sealed);
  EXPECT_NE(PeerTrust::map_extent_fd(fixed.get(), true, os::Access::ReadWrite, 10, &map, &sealed),
            nullptr);  // announced sealed, but writable
}

TEST(PeerTrustTest, ALargeAnswerToAnUntrustedPeerGoesBackSealed) {
  // Side 1 is untrusted; this is side 0's PeerTrust, answering it.
  auto seg = segment(4, shm::Limits{0, shm::kMaxHandles, 2, 256});  // threshold: the slot size
  BufferTable t(seg, 0, 1);
  PeerTrust trust(seg, 0, t);
  EXPECT_FALSE(trust.untrusted_me());
  EXPECT_FALSE(trust.must_seal(256));
  EXPECT_TRUE(trust.must_seal(257));
  std::vector<std::byte> answer(5000, std::byte{7});
  auto r = trust.make_replacement(answer.data(), 5000);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->aux, shm::kExtentReplace | shm::kExtentSealed);
  auto seals = os::get_seals(r->fd.get());
  ASSERT_TRUE(seals);
  EXPECT_EQ(*seals & os::kSealsImmutable, os::kSealsImmutable);
  os::Mapping map;
  bool sealed = false;
  // The untrusted side checks it: sealed, and large enough for the answer.
  BufferTable t1(seg, 1, 1);
  PeerTrust trust1(seg, 1, t1);
  EXPECT_EQ(trust1.check_replacement(r->fd.get(), true, 5000, &map, &sealed), nullptr);
  EXPECT_TRUE(sealed);
  EXPECT_EQ(std::memcmp(map.data(), answer.data(), 5000), 0);
  EXPECT_NE(trust1.check_replacement(r->fd.get(), true, 9000, &map, &sealed), nullptr);
  auto small = trust.make_replacement(answer.data(), 10);
  ASSERT_TRUE(small);
  EXPECT_EQ(small->aux, shm::kExtentReplace);  // at or below copy_threshold: not sealed
}

TEST(PeerTrustTest, AnUntrustedEndCopiesPayloadsUpTo64MiBByDefault) {
  // copy_threshold 0 with a side untrusted: kDefaultCopyThreshold (64 MiB): nothing up to it is
  // sealed by either side or required sealed; above it, sealed (a peer must not make us allocate
  // a private copy of any size it announces).
  auto seg = segment(4, shm::Limits{0, shm::kMaxHandles, 2, 0});
  EXPECT_EQ(seg.geometry().copy_threshold, shm::kDefaultCopyThreshold);
  BufferTable t0(seg, 0, 1), t1(seg, 1, 1);
  PeerTrust sender(seg, 0, t0), receiver(seg, 1, t1);
  EXPECT_TRUE(receiver.untrusted_me());
  for (std::uint32_t n : {257u, 1u << 20, 16u << 20, shm::kDefaultCopyThreshold}) {
    EXPECT_FALSE(sender.must_seal(n)) << n;
    EXPECT_FALSE(receiver.needs_sealed(n)) << n;
  }
  for (std::uint32_t n :
       {shm::kDefaultCopyThreshold + 1, static_cast<std::uint32_t>(shm::kMaxExtentSize)}) {
    EXPECT_TRUE(sender.must_seal(n)) << n;
    EXPECT_TRUE(receiver.needs_sealed(n)) << n;
  }
  // With both ends cooperative the threshold stays the slot size (unused).
  auto coop = segment(4, shm::Limits{0, shm::kMaxHandles, 0, 0});
  EXPECT_EQ(coop.geometry().copy_threshold, coop.geometry().slot_size);
}

// ---- PeerBell, QueueBell (P4q) ----

namespace {
BellFds dup_bell(const QueueBell& q) {
  BellFds b;
  b.ready = os::UniqueFd(::dup(q.ready_fd()));
  b.wait = os::UniqueFd(::dup(q.wait_fd()));
  if (auto s = q.new_sender()) b.signal = std::move(*s);
  return b;
}
}  // namespace

TEST(PeerBellTest, ADoorbellMustBeTwoSealedPagesAndASocketWithASlotInRange) {
  auto q = QueueBell::make();
  ASSERT_TRUE(q);
  {
    PeerBell ok;
    EXPECT_EQ(ok.open(dup_bell(*q), 1, 7), nullptr);
    EXPECT_TRUE(ok.is_open());
    EXPECT_EQ(ok.slot(), 7u);
  }
  {
    PeerBell bad;
    EXPECT_NE(bad.open(dup_bell(*q), 1, shm::kQueueCapacity), nullptr);  // slot out of range
    EXPECT_FALSE(bad.is_open());
  }
  const int raw = ::memfd_create("unsealed", MFD_CLOEXEC);
  ASSERT_GE(raw, 0);
  ASSERT_EQ(::ftruncate(raw, shm::kQueuePageSize), 0);
  {
    BellFds b = dup_bell(*q);
    b.ready = os::UniqueFd(::dup(raw));  // can be truncated under us: SIGBUS
    PeerBell bad;
    EXPECT_NE(bad.open(std::move(b), 1, 0), nullptr);
  }
  {
    BellFds b = dup_bell(*q);
    b.signal = os::UniqueFd(::dup(raw));  // not a datagram socket: a write could block
    PeerBell bad;
    EXPECT_NE(bad.open(std::move(b), 1, 0), nullptr);
  }
  ::close(raw);
}

TEST(PeerBellTest, NoPeerCanMapTheWaitPageWritable) {
  auto q = QueueBell::make();
  ASSERT_TRUE(q);
  const int wait_fd = q->wait_fd();
  void* p = ::mmap(nullptr, shm::kQueuePageSize, PROT_READ | PROT_WRITE, MAP_SHARED, wait_fd, 0);
  EXPECT_EQ(p, MAP_FAILED);
  EXPECT_EQ(errno, EPERM);
  void* ro = ::mmap(nullptr, shm::kQueuePageSize, PROT_READ, MAP_SHARED, wait_fd, 0);
  ASSERT_NE(ro, MAP_FAILED);
  EXPECT_NE(::mprotect(ro, shm::kQueuePageSize, PROT_READ | PROT_WRITE), 0);
  q->publish(3);  // the queue's own mapping stays writable
  EXPECT_EQ(static_cast<const std::atomic<std::uint32_t>*>(ro)->load(), 3u);
  ::munmap(ro, shm::kQueuePageSize);
}

TEST(PeerBellTest, RingingMarksTheSlotAndSignalsOnlyWhenArmed) {
  auto q = QueueBell::make();
  ASSERT_TRUE(q);
  PeerBell bell;
  ASSERT_EQ(bell.open(dup_bell(*q), 1, 4100), nullptr);
  bell.ring();  // nobody asleep, not armed: bits only
  shm::QueueReadyPage& page = q->ready();
  EXPECT_EQ(page.ready[4100 / 64].load(), std::uint64_t{1} << (4100 % 64));
  EXPECT_EQ(page.summary[1].load(), std::uint64_t{1} << ((4100 / 64) % 64));
  EXPECT_EQ(page.word.load(), 0u);
  pollfd pfd{q->signal_fd(), POLLIN, 0};
  EXPECT_EQ(::poll(&pfd, 1, 0), 0);
  q->publish(shm::kQueueArmed);
  bell.ring();
  EXPECT_EQ(::poll(&pfd, 1, 0), 1);
  EXPECT_EQ(page.word.load(), 0u);  // nobody in FUTEX_WAIT: the word is untouched
  q->drain();
  EXPECT_EQ(::poll(&pfd, 1, 0), 0);
  q->publish(1);
  bell.ring();
  EXPECT_EQ(page.word.load(), 1u);
  EXPECT_EQ(::poll(&pfd, 1, 0), 0);
}

// ---- SpinStep, sleep_once ----

TEST(SpinStepTest, SpinNeverSleepsAndStopsAtTheDeadline) {
  SpinStep step(WaitPolicy{WaitMode::Spin, {}}, Deadline::after(std::chrono::milliseconds(2)));
  SpinStep::Next n;
  while ((n = step.after_miss()) == SpinStep::Next::Look) {
  }
  EXPECT_EQ(n, SpinStep::Next::Expired);
}

TEST(SpinStepTest, AnUnknownModeIsAdaptive) {
  SpinStep step(WaitPolicy{static_cast<WaitMode>(7), std::chrono::microseconds(200)},
                Deadline::never());
  const std::int64_t start = monotonic_ns();
  while (step.after_miss() == SpinStep::Next::Look) {
  }
  EXPECT_GE(monotonic_ns() - start, 200'000);  // spun its budget, then asked to sleep
}

TEST(SpinStepTest, SleepSleepsAtOnceAndAdaptiveAfterItsSpin) {
  SpinStep sleep(WaitPolicy{WaitMode::Sleep, {}}, Deadline::never());
  EXPECT_EQ(sleep.after_miss(), SpinStep::Next::Sleep);
  SpinStep adaptive(WaitPolicy{WaitMode::Adaptive, std::chrono::microseconds(200)},
                    Deadline::never());
  const std::int64_t start = monotonic_ns();
  while (adaptive.after_miss() == SpinStep::Next::Look) {
  }
  EXPECT_GE(monotonic_ns() - start, 200'000);
}

TEST(SleepOnceTest, AnnouncesLooksAgainAndRetractsAndSleepsOnlyIfNothingCame) {
  std::atomic<std::uint32_t> word{0};
  std::vector<char> order;
  sleep_once(
      word, Deadline::never(), -1, [&] { order.push_back('a'); },
      [&] {
        order.push_back('l');
        return false;  // something came: no sleep (a never-deadline sleep would hang here)
      },
      [&] { order.push_back('r'); });
  EXPECT_EQ(std::string(order.begin(), order.end()), "alr");
  const std::int64_t start = monotonic_ns();
  sleep_once(
      word, Deadline::after(std::chrono::milliseconds(5)), -1, [] {}, [] { return true; }, [] {});
  EXPECT_GE(monotonic_ns() - start, 4'000'000);  // slept until about the deadline
  const std::int64_t start2 = monotonic_ns();
  sleep_once(
      word, Deadline::never(), 2'000'000, [] {}, [] { return true; }, [] {});
  EXPECT_GE(monotonic_ns() - start2, 1'000'000);  // max_ns bounds a never-deadline sleep
}

}  // namespace
}  // namespace mbmq::detail
