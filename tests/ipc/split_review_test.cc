// Hostile review of the Endpoint split (d433593..review: BufferTable, Sideband, PeerTrust,
// SpinStep/sleep_once): a refactor that must not change behaviour. Each test pins down what the
// old single-class Endpoint (d433593) did, where the split code does something else. The peer is
// played by hand through the raw segment and control socket of the other end of a pair
// (ipc/test_access.h), as in hardening_test.cc.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <climits>
#include <cstring>
#include <thread>

#include "hostile_peer.h"
#include "ipc/endpoint.h"
#include "ipc/test_access.h"
#include "mbmq/mbmq.h"
#include "os/file.h"
#include "os/futex.h"
#include "os/memfd.h"
#include "os/unix_socket.h"
#include "shm/layout.h"
#include "test_util.h"

namespace mbmq {
namespace {

using namespace std::chrono_literals;
using test::secs;

using test::bytes_of;
using test::dir;
using test::raw_push;

std::uint16_t kind_bits(shm::DescKind k, std::uint16_t flags = 0) {
  return static_cast<std::uint16_t>(static_cast<std::uint16_t>(k) | flags);
}

// Until the watcher has seen the peer's hang-up (P8): a closed end allocates nothing.
bool wait_peer_closed(Channel& c) {
  const Deadline give_up = secs(5);
  while (!give_up.expired()) {
    auto b = c.buffer(64);
    if (!b) return b.error().code == Errc::PeerClosed;
    std::this_thread::sleep_for(1ms);
  }
  return false;
}

// ---------------------------------------------------------------------------------------------
// 1. Sideband's failure is sticky; the old read_control_once() was not.
//
// Old (d433593 endpoint.cc, read_control_once): a bad control packet called fail_protocol_locked()
// and returned false for that read only. On a channel already PeerClosed the CAS Open -> Protocol
// fails, so the state stays PeerClosed, and the next read goes on with the next packet: messages
// the peer queued before it hung up are still delivered (poll() keeps popping while the state is
// not Protocol).
// New (sideband.cc, read_once / bad): failure_ is set and every later read_once() returns
// Nothing ("nothing more is read"), although fail_protocol_locked() changed nothing: every later
// descriptor that needs a packet is rejected, and the peer's last messages are lost.
//
// The peer queues: a malformed packet (an Extent header with no fd), then extent 0's memfd at gen
// 1; on the ring, two OneWay descriptors naming extent 0 at gen 1. Then it hangs up. The first
// descriptor's drain reads the bad packet (rejected, in both versions); the second's reads the
// memfd: old delivers it, new does not.
TEST(SplitReview, AfterAHangUpABadControlPacketDoesNotStopLaterPacketsBeingRead) {
  auto p = Channel::pair();
  ASSERT_TRUE(p);
  auto& [us, peer] = *p;  // us: side 0, consumes dir[1]
  const int ctl = detail::TestAccess::control_fd(peer);
  constexpr std::uint32_t kSize = 64;
  auto mfd = os::make_sealed_memfd("split-review", 4096);
  ASSERT_TRUE(mfd);
  std::byte payload[kSize];
  test::fill(payload, 77);
  ASSERT_TRUE(os::pwrite_full(mfd->get(), payload, 0));
  const shm::CtlMsg ext{static_cast<std::uint32_t>(shm::CtlType::Extent), 0, 1, 0};
  ASSERT_TRUE(os::send_msg(ctl, bytes_of(ext), {}));  // malformed: an Extent packet without its fd
  const int raw = mfd->get();
  ASSERT_TRUE(os::send_msg(ctl, bytes_of(ext), {&raw, 1}));
  std::uint32_t tail = 0;
  shm::Direction& ring = dir(peer, 1);
  const shm::Desc d{shm::kExtentBit | 0, kSize, 1, kind_bits(shm::DescKind::OneWay), 0};
  raw_push(ring, &tail, d);
  raw_push(ring, &tail, d);
  peer.close();
  ASSERT_TRUE(wait_peer_closed(us));

  auto m = us.receive(secs(2));
  ASSERT_TRUE(m) << m.error().message();
  EXPECT_EQ(m->kind, Kind::Message)
      << "the peer's last message was dropped: the end stopped reading its control socket after "
         "one bad packet although the channel was only PeerClosed (why: \""
      << m->why << "\")";
  if (m->kind == Kind::Message) {
    ASSERT_EQ(m->buffer.size(), kSize);
    EXPECT_TRUE(test::check(m->buffer.data(), 77));
  }
}

// Same, with the malformed packet being one over the stash budget rather than a broken header:
// a handles packet for a buffer no descriptor names, repeated until the fd budget (128) is
// exceeded; afterwards extent 0's memfd and two descriptors as above.
TEST(SplitReview, AfterAHangUpAnOverBudgetHandlesPacketDoesNotStopLaterPacketsBeingRead) {
  auto p = Channel::pair();
  ASSERT_TRUE(p);
  auto& [us, peer] = *p;
  const int ctl = detail::TestAccess::control_fd(peer);
  auto devnull = os::open_read("/dev/null");
  ASSERT_TRUE(devnull);
  struct {
    shm::CtlMsg h;
    shm::HandleMeta meta[shm::kMaxHandles];
  } pkt{};
  // Slot 16 is the peer's first (16 slots per side); generation 0xdead is never used.
  pkt.h =
      shm::CtlMsg{static_cast<std::uint32_t>(shm::CtlType::Handles), 16, 0xdead, shm::kMaxHandles};
  std::vector<int> fds;
  for (auto& meta : pkt.meta) {
    meta.kind = static_cast<std::uint32_t>(shm::WireHandle::Fd);
    fds.push_back(devnull->get());
  }
  constexpr int kJunk = detail::kMaxStashedHandleFds / shm::kMaxHandles + 1;  // one over budget
  for (int k = 0; k < kJunk; ++k)
    ASSERT_TRUE(os::send_msg(ctl, {reinterpret_cast<const std::byte*>(&pkt), sizeof pkt}, fds));
  constexpr std::uint32_t kSize = 64;
  auto mfd = os::make_sealed_memfd("split-review", 4096);
  ASSERT_TRUE(mfd);
  std::byte payload[kSize];
  test::fill(payload, 78);
  ASSERT_TRUE(os::pwrite_full(mfd->get(), payload, 0));
  const shm::CtlMsg ext{static_cast<std::uint32_t>(shm::CtlType::Extent), 0, 1, 0};
  const int raw = mfd->get();
  ASSERT_TRUE(os::send_msg(ctl, bytes_of(ext), {&raw, 1}));
  std::uint32_t tail = 0;
  shm::Direction& ring = dir(peer, 1);
  const shm::Desc d{shm::kExtentBit | 0, kSize, 1, kind_bits(shm::DescKind::OneWay), 0};
  raw_push(ring, &tail, d);  // its drain reads the junk, and fails at the packet over budget
  raw_push(ring, &tail, d);  // its drain reads on: extent 0's memfd
  peer.close();
  ASSERT_TRUE(wait_peer_closed(us));

  auto m = us.receive(secs(2));
  ASSERT_TRUE(m) << m.error().message();
  EXPECT_EQ(m->kind, Kind::Message)
      << "the peer's last message was dropped (why: \"" << m->why << "\")";
  if (m->kind == Kind::Message) {
    ASSERT_EQ(m->buffer.size(), kSize);
    EXPECT_TRUE(test::check(m->buffer.data(), 78));
  }
}

// ---------------------------------------------------------------------------------------------
// 2. A WaitMode outside the enum (nothing validates WaitPolicy::mode at the API).
//
// d433593: Endpoint::wait_inbound spun forever for it (like Spin), QueueCore::wait slept after
// 64 looks. Since the split one step (SpinStep) serves both, and takes such a mode as Adaptive
// (the default): it spins its budget, then announces the sleep, on a channel and on a queue.
TEST(SplitReview, AnUnknownWaitModeOnAChannelWaitsAsAdaptive) {
  auto p = Channel::pair();
  ASSERT_TRUE(p);
  auto& [us, peer] = *p;
  us.set_wait_policy(WaitPolicy{static_cast<WaitMode>(7), 0ns});
  shm::Direction& inbound = dir(peer, 1);  // what `us` consumes
  std::atomic<bool> done{false};
  std::thread receiver([&] {
    auto m = us.receive(Deadline::after(300ms));
    (void)m;
    done = true;
  });
  bool slept = false;
  while (!done.load()) {
    if (inbound.consumer_sleeping.load(std::memory_order_relaxed) != 0) slept = true;
    std::this_thread::yield();
  }
  receiver.join();
  EXPECT_TRUE(slept) << "receive() with an unknown WaitMode never announced a sleep";
}

}  // namespace
}  // namespace mbmq
