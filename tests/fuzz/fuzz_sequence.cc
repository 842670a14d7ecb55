// Fuzz target: stateful sequences against a victim that both sends and receives. The attacker
// interleaves, in any order: control packets (extents, replacements, doorbells, handles, junk),
// descriptors naming them, its own consumer state (consumer_sleeping and doorbell_gen of the
// victim's outgoing direction, so the victim's wake path (P4) reads and maps the announced
// doorbell), truncation of memfds it already sent (a doorbell or extent that shrinks after the
// check must not SIGBUS the victim), and consumption of what the victim sent. The victim
// meanwhile receives, sends one-way messages and requests in slots and extents, and calls with a
// short deadline. Every inconsistency must be a protocol error of that channel; the victim never
// crashes, hangs or leaks an fd (the count comes back).
#include <cstring>
#include <vector>

#include "fuzz_common.h"
#include "ipc/test_access.h"
#include "mbmq/mbmq.h"
#include "os/file.h"
#include "os/memfd.h"
#include "os/unix_socket.h"

using namespace mbmq;

namespace {

// A memfd of `size` bytes: sealed against shrinking (as the protocol requires) or, to test the
// checks, not (then the attacker may truncate it later).
os::UniqueFd make_fd(FuzzedDataProvider& in, std::vector<int>* truncatable) {
  const std::size_t size = in.ConsumeIntegralInRange<std::size_t>(0, 3) * 4096;
  if (in.ConsumeBool()) {
    auto m = os::make_sealed_memfd("fuzz-seq", size);
    if (!m) return {};
    if (in.ConsumeBool()) (void)os::add_seals(m->get(), os::kSealsImmutable);
    return std::move(*m);
  }
  auto m = os::make_memfd("fuzz-seq-unsealed", 0);
  if (!m) return {};
  if (size > 0) (void)os::truncate_file(m->get(), size);
  truncatable->push_back(m->get());
  return std::move(*m);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  FuzzedDataProvider in(data, size);
  fuzz::warm_up();
  const std::size_t fds0 = os::open_fd_count();
  {
    ChannelOptions opt;
    opt.slots_per_side = in.ConsumeIntegralInRange<std::uint32_t>(1, 8);
    if (in.ConsumeBool()) opt.trust[0] = Trust::Untrusted;  // the victim's end
    if (in.ConsumeBool()) opt.trust[1] = Trust::Untrusted;  // the victim seals what it sends
    opt.wait = WaitPolicy{WaitMode::Sleep};
    auto ends = Channel::pair(opt);
    if (!ends) return 0;
    auto& [victim, attacker] = *ends;
    const int ctl = detail::TestAccess::control_fd(attacker);
    auto seg = detail::TestAccess::segment(attacker);
    // dir[0]: victim -> attacker (the attacker consumes); dir[1]: attacker -> victim.
    auto* out = reinterpret_cast<shm::Direction*>(seg.data() + shm::kDirOffset);
    auto* into =
        reinterpret_cast<shm::Direction*>(seg.data() + shm::kDirOffset + sizeof(shm::Direction));
    std::uint32_t tail = 0;
    std::vector<os::UniqueFd> kept;  // fds the attacker keeps after sending (to truncate later)
    std::vector<int> truncatable;
    std::vector<Buffer> held;  // buffers the victim holds on to for a while
    for (int step = 0; step < 32 && in.remaining_bytes() > 0; ++step) {
      switch (in.ConsumeIntegralInRange<int>(0, 8)) {
        case 0: {  // a well-formed-looking control packet with one fd
          shm::CtlMsg h{in.ConsumeIntegralInRange<std::uint32_t>(1, 3),
                        in.ConsumeIntegralInRange<std::uint32_t>(0, 66),
                        in.ConsumeIntegralInRange<std::uint32_t>(0, 4),
                        in.ConsumeIntegralInRange<std::uint32_t>(0, 3)};
          os::UniqueFd fd = make_fd(in, &truncatable);
          int raw = fd.get();
          (void)os::send_msg(ctl, {reinterpret_cast<const std::byte*>(&h), sizeof h},
                             {&raw, fd ? 1u : 0u}, os::Blocking::No);
          if (fd) kept.push_back(std::move(fd));
          break;
        }
        case 1: {  // a handles packet: 1..8 Fd handles, or a wrong count
          struct {
            shm::CtlMsg h;
            shm::HandleMeta meta[shm::kMaxHandles];
          } pkt{};
          const std::uint32_t count = in.ConsumeIntegralInRange<std::uint32_t>(1, 8);
          pkt.h = shm::CtlMsg{static_cast<std::uint32_t>(shm::CtlType::Handles),
                              in.ConsumeIntegralInRange<std::uint32_t>(0, 20) |
                                  (in.ConsumeBool() ? shm::kExtentBit : 0u),
                              in.ConsumeIntegralInRange<std::uint32_t>(0, 4),
                              count | (in.ConsumeBool() ? shm::kHandlesForReply : 0u)};
          std::vector<os::UniqueFd> fds;
          std::vector<int> raw;
          for (std::uint32_t k = 0; k < count; ++k) {
            pkt.meta[k].kind = static_cast<std::uint32_t>(shm::WireHandle::Fd);
            auto p = os::make_pipe();
            if (!p) break;
            raw.push_back(p->first.get());
            fds.push_back(std::move(p->first));
          }
          if (in.ConsumeBool() && !raw.empty()) raw.pop_back();  // an fd short
          (void)os::send_msg(ctl,
                             {reinterpret_cast<const std::byte*>(&pkt),
                              sizeof(shm::CtlMsg) + count * sizeof(shm::HandleMeta)},
                             raw, os::Blocking::No);
          break;
        }
        case 2: {  // a descriptor from the attacker
          shm::RingEntry& e = into->ring[tail % shm::kRingCapacity];
          const bool ext = in.ConsumeBool();
          e.store(shm::Desc{
              (ext ? shm::kExtentBit : opt.slots_per_side) +
                  in.ConsumeIntegralInRange<std::uint32_t>(0, ext ? 3 : opt.slots_per_side),
              in.ConsumeIntegralInRange<std::uint32_t>(0, 3 * 4096),
              in.ConsumeIntegral<std::uint8_t>() % 5u,
              static_cast<std::uint16_t>(in.ConsumeIntegralInRange<int>(1, 5) |
                                         (in.ConsumeBool() ? shm::kDescHasHandles : 0) |
                                         (in.ConsumeBool() ? shm::kDescReplaced : 0)),
              static_cast<std::uint16_t>(in.ConsumeIntegralInRange<int>(0, 2))});
          e.seq.store(++tail, std::memory_order_release);
          into->tail.store(tail, std::memory_order_release);
          break;
        }
        case 3:  // the attacker "sleeps" on a doorbell it announced (or never sent)
          out->doorbell_gen.store(in.ConsumeIntegralInRange<std::uint32_t>(0, 4),
                                  std::memory_order_release);
          out->consumer_sleeping.store(1, std::memory_order_relaxed);
          break;
        case 4:  // shrink a memfd sent earlier (legal only for unsealed ones: the victim's checks)
          if (!truncatable.empty())
            (void)os::truncate_file(
                truncatable[in.ConsumeIntegralInRange<std::size_t>(0, truncatable.size() - 1)], 0);
          break;
        case 5: {  // the victim sends a one-way message or a request (slot or extent)
          auto b = victim.buffer(in.ConsumeBool() ? 64 : 70000);
          if (!b) break;
          std::memset(b->data().data(), 0x5a, b->size());
          if (in.ConsumeBool())
            (void)victim.send(std::move(*b));
          else
            (void)victim.send_request(std::move(*b));
          break;
        }
        case 6: {  // the victim calls with a short deadline
          auto b = victim.buffer(in.ConsumeBool() ? 64 : 70000);
          if (!b) break;
          (void)victim.call(*b, Deadline::after(std::chrono::milliseconds(1)));
          break;
        }
        case 7: {  // the victim receives; keeps or drops the buffer
          auto m = victim.receive(Deadline::immediate());
          if (m && m->kind != Kind::PeerClosed && m->buffer.valid()) {
            volatile std::byte sink{};
            for (std::size_t i = 0; i < m->buffer.size(); i += 512) sink = m->buffer.data()[i];
            (void)sink;
            if (in.ConsumeBool() && held.size() < 4) held.push_back(std::move(m->buffer));
          }
          break;
        }
        default:  // the attacker consumes (or skips) what the victim sent
          out->head.store(out->tail.load(std::memory_order_acquire) -
                              in.ConsumeIntegralInRange<std::uint32_t>(0, 2),
                          std::memory_order_release);
          break;
      }
    }
    held.clear();
  }
  fuzz::expect_fds(fds0);
  return 0;
}
