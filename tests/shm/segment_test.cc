// Segment creation and the validation a receiving process applies before trusting any offset.
#include "shm/segment.h"

#include <gtest/gtest.h>

#include <cstring>

#include "os/fd.h"
#include "os/memfd.h"
#include "os/process.h"

namespace mbmq::shm {
namespace {

TEST(Segment, AttachAcceptsWhatCreateMade) {
  auto s = Segment::create(8, 4096);
  ASSERT_TRUE(s) << s.error().message();
  auto fd = os::dup_fd(s->fd());
  ASSERT_TRUE(fd);
  auto a = Segment::attach(std::move(*fd));
  ASSERT_TRUE(a) << a.error().message();
  EXPECT_EQ(a->geometry().slots_per_side, 8u);
  EXPECT_EQ(a->geometry().slot_size, 4096u);
  // Both mappings show the same bytes.
  s->slot(3)[0] = std::byte{42};
  EXPECT_EQ(a->slot(3)[0], std::byte{42});
}

TEST(Segment, CreateRejectsOutOfRangePools) {
  EXPECT_EQ(Segment::create(0, 4096).error().code, Errc::InvalidArgument);
  EXPECT_EQ(Segment::create(kMaxSlotsPerSide + 1, 4096).error().code, Errc::InvalidArgument);
  EXPECT_EQ(Segment::create(4, 100).error().code, Errc::InvalidArgument);
}

TEST(Segment, AttachRejectsBadMagic) {
  auto s = Segment::create(4, 4096);
  ASSERT_TRUE(s);
  std::memset(s->base(), 0x77, 8);
  auto fd = os::dup_fd(s->fd());
  auto a = Segment::attach(std::move(*fd));
  ASSERT_FALSE(a);
  EXPECT_EQ(a.error().code, Errc::Protocol);
}

TEST(Segment, AttachRejectsHeaderThatLiesAboutItsGeometry) {
  auto s = Segment::create(4, 4096);
  ASSERT_TRUE(s);
  SegmentHeader h;
  std::memcpy(&h, s->base(), sizeof(h));
  h.slots_per_side = 64;  // would put the pool past the end of the memfd
  std::memcpy(s->base(), &h, sizeof(h));
  auto a = Segment::attach(std::move(*os::dup_fd(s->fd())));
  ASSERT_FALSE(a);
  EXPECT_EQ(a.error().code, Errc::Protocol);
}

TEST(Segment, AttachRejectsAnFdThatIsNotASealedMemfd) {
  // Only a memfd sealed against shrinking is safe to map: a pipe is not a memfd at all, and
  // F_GET_SEALS fails with EINVAL.
  auto p = os::make_pipe();
  ASSERT_TRUE(p);
  auto a = Segment::attach(std::move(p->first));
  ASSERT_FALSE(a);
  EXPECT_EQ(a.error().code, Errc::System);
}

}  // namespace
}  // namespace mbmq::shm
