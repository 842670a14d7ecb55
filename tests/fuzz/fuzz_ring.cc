// Fuzz target: a peer that writes arbitrary descriptors, sequence words and tail values into the
// ring it produces (P3/P5). The victim receives and replies; it must see messages whose buffers
// lie inside its mappings, or a protocol error for that channel, and never crash.
#include <cstring>

#include "fuzz_common.h"
#include "ipc/test_access.h"
#include "mbmq/mbmq.h"

using namespace mbmq;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  FuzzedDataProvider in(data, size);
  fuzz::warm_up();
  const std::size_t fds0 = os::open_fd_count();
  {
    ChannelOptions opt;
    opt.slots_per_side = in.ConsumeIntegralInRange<std::uint32_t>(1, 8);
    opt.slot_size = 64u << in.ConsumeIntegralInRange<int>(0, 4);
    auto ends = Channel::pair(opt);
    if (!ends) return 0;
    auto& [victim, attacker] = *ends;
    // Play side 1 by hand: its outbound direction is dir[1].
    auto seg = detail::TestAccess::segment(attacker);
    auto* dir =
        reinterpret_cast<shm::Direction*>(seg.data() + shm::kDirOffset + sizeof(shm::Direction));
    std::uint32_t tail = 0;
    for (int step = 0; step < 64 && in.remaining_bytes() > 0; ++step) {
      switch (in.ConsumeIntegralInRange<int>(0, 3)) {
        case 0: {  // a descriptor, published properly or not
          shm::Desc d{in.ConsumeIntegral<std::uint32_t>(), in.ConsumeIntegral<std::uint32_t>(),
                      in.ConsumeIntegral<std::uint32_t>(), in.ConsumeIntegral<std::uint16_t>(),
                      in.ConsumeIntegral<std::uint16_t>()};
          const bool plausible = in.ConsumeBool();
          if (plausible) {  // mostly plausible values, so that deeper paths are reached
            d.buffer = opt.slots_per_side + d.buffer % (opt.slots_per_side + 2);
            d.size %= opt.slot_size + 2;
            d.kind = static_cast<std::uint16_t>(1 + d.kind % 5) |
                     static_cast<std::uint16_t>(d.kind & shm::kDescHasHandles);
            d.gen %= 4;
          }
          shm::RingEntry& e = dir->ring[tail % shm::kRingCapacity];
          if (plausible) {
            e.store(d);
          } else {  // any bits in the packed fields
            e.size = d.size;
            e.gen = d.gen;
            e.buffer = static_cast<std::uint16_t>(d.buffer);
            e.kind = d.kind;
          }
          e.seq.store(in.ConsumeBool() ? tail + 1 : in.ConsumeIntegral<std::uint32_t>(),
                      std::memory_order_release);
          ++tail;
          dir->tail.store(in.ConsumeBool() ? tail : in.ConsumeIntegral<std::uint32_t>(),
                          std::memory_order_release);
          break;
        }
        case 1:  // scribble a control word
          dir->consumer_sleeping.store(in.ConsumeIntegral<std::uint32_t>());
          dir->doorbell_gen.store(in.ConsumeIntegralInRange<std::uint32_t>(0, 3));
          break;
        case 2: {  // the head of the victim's own outbound ring, which we consume
          auto* theirs = reinterpret_cast<shm::Direction*>(seg.data() + shm::kDirOffset);
          theirs->head.store(in.ConsumeIntegral<std::uint32_t>());
          break;
        }
        default: {  // the victim receives; it touches and answers what it gets
          auto m = victim.receive(Deadline::immediate());
          if (!m) break;
          volatile std::uint8_t sink = 0;
          for (std::byte b : m->buffer.data()) sink = sink ^ static_cast<std::uint8_t>(b);
          (void)sink;
          if (m->kind == Kind::Request) (void)MsgQueue::reply(std::move(*m));
          break;
        }
      }
    }
    auto last = victim.receive(Deadline::immediate());
    (void)last;
  }
  fuzz::expect_fds(fds0);
  return 0;
}
