// Fuzz target: a peer that sends arbitrary control-socket packets (P3, P3b, P3c, P7b): extent
// and doorbell messages (sealed or not, replacements), handle packets with fds and file ranges,
// truncated and oversized ones, each perhaps followed by a descriptor that names it, to a victim
// that is cooperative or untrusted (P5b). The victim must take or close every fd it is sent
// (checked: the fd count comes back), and treat every inconsistency as a protocol error of that
// channel.
#include <cstring>

#include "fuzz_common.h"
#include "ipc/test_access.h"
#include "mbmq/mbmq.h"
#include "os/file.h"
#include "os/memfd.h"
#include "os/unix_socket.h"

using namespace mbmq;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  FuzzedDataProvider in(data, size);
  fuzz::warm_up();
  const std::size_t fds0 = os::open_fd_count();
  {
    ChannelOptions opt;
    if (in.ConsumeBool()) opt.trust[0] = Trust::Untrusted;  // the victim's end
    auto ends = Channel::pair(opt);
    if (!ends) return 0;
    auto& [victim, attacker] = *ends;
    const int ctl = detail::TestAccess::control_fd(attacker);
    auto seg = detail::TestAccess::segment(attacker);
    auto* dir =
        reinterpret_cast<shm::Direction*>(seg.data() + shm::kDirOffset + sizeof(shm::Direction));
    std::uint32_t tail = 0;
    for (int step = 0; step < 16 && in.remaining_bytes() > 0; ++step) {
      // A packet: a header that is often well-formed, then arbitrary bytes.
      std::vector<std::uint8_t> pkt(in.ConsumeIntegralInRange<std::size_t>(0, 300));
      shm::CtlMsg h{in.ConsumeIntegralInRange<std::uint32_t>(0, 4),
                    in.ConsumeIntegralInRange<std::uint32_t>(0, 70) |
                        (in.ConsumeBool() ? shm::kExtentBit : 0u),
                    in.ConsumeIntegralInRange<std::uint32_t>(0, 3),
                    in.ConsumeIntegralInRange<std::uint32_t>(0, 0x1ff)};
      if (pkt.size() >= sizeof h) std::memcpy(pkt.data(), &h, sizeof h);
      for (std::size_t i = sizeof h; i < pkt.size(); ++i)
        pkt[i] = in.ConsumeIntegral<std::uint8_t>();
      // Up to 4 fds: memfds (sealed or not, of any size) and pipe ends.
      std::vector<os::UniqueFd> owned;
      const int nfds = in.ConsumeIntegralInRange<int>(0, 4);
      for (int k = 0; k < nfds; ++k) {
        if (in.ConsumeBool()) {
          auto m =
              os::make_sealed_memfd("fuzz-ctl", in.ConsumeIntegralInRange<std::size_t>(0, 1 << 16));
          if (m && in.ConsumeBool())  // immutable, as P3c makes it (or a subset of it)
            (void)os::add_seals(m->get(), in.ConsumeBool() ? os::kSealsImmutable : os::kSealWrite);
          if (m) owned.push_back(std::move(*m));
        } else {
          auto p = os::make_pipe();
          if (p) owned.push_back(std::move(p->first));
        }
      }
      std::vector<int> fds;
      for (auto& f : owned) fds.push_back(f.get());
      (void)os::send_msg(ctl, {reinterpret_cast<const std::byte*>(pkt.data()), pkt.size()}, fds);
      if (in.ConsumeBool()) {  // and a descriptor that refers to it
        shm::RingEntry& e = dir->ring[tail % shm::kRingCapacity];
        e.store(shm::Desc{h.id, in.ConsumeIntegralInRange<std::uint32_t>(0, 1 << 17), h.gen,
                          static_cast<std::uint16_t>(in.ConsumeIntegralInRange<int>(1, 5) |
                                                     (in.ConsumeBool() ? shm::kDescHasHandles : 0) |
                                                     (in.ConsumeBool() ? shm::kDescReplaced : 0)),
                          0});
        e.seq.store(++tail, std::memory_order_release);
        dir->tail.store(tail, std::memory_order_release);
      }
      auto m = victim.receive(Deadline::immediate());
      if (m && m->kind != Kind::PeerClosed) {
        for (std::size_t i = 0; i < m->buffer.handle_count(); ++i) {
          if (in.ConsumeBool()) continue;  // left in the buffer: closed with it
          if (m->buffer.handle_kind(i) == HandleKind::Fd) {
            auto fd = m->buffer.take_fd(i);
            if (fd) os::UniqueFd close_it(*fd);
          } else if (m->buffer.handle_kind(i) == HandleKind::File) {
            auto r = m->buffer.take_file(i);  // checked against the file: often Protocol
            if (r) (void)r->map(true);
          } else if (m->buffer.handle_kind(i) == HandleKind::Channel) {
            auto c = m->buffer.take_channel(i);  // usually Protocol: our fds are not an end
            (void)c;
          }
        }
      }
    }
  }
  fuzz::expect_fds(fds0);
  return 0;
}
