// Fuzz target: a segment a peer hands us (P1): its size, its seals and every byte of its header.
// Attach must reject it or describe a layout inside it; an accepted one must then survive an
// endpoint built on it.
#include <cstring>

#include "fuzz_common.h"
#include "ipc/endpoint.h"
#include "os/mapping.h"
#include "os/memfd.h"
#include "os/unix_socket.h"
#include "shm/segment.h"

using namespace mbmq;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  FuzzedDataProvider in(data, size);
  fuzz::warm_up();
  const std::size_t fds0 = os::open_fd_count();
  {
    const std::size_t file_size = in.ConsumeIntegralInRange<std::size_t>(0, 1 << 20);
    std::vector<std::uint8_t> bytes = in.ConsumeRemainingBytes<std::uint8_t>();
    auto fd = os::make_sealed_memfd("fuzz-segment", file_size);
    if (!fd) return 0;
    if (file_size > 0 && !bytes.empty()) {
      auto map = os::Mapping::map_shared(fd->get(), file_size, os::Access::ReadWrite);
      if (!map) return 0;
      std::memcpy(map->data(), bytes.data(), std::min(bytes.size(), file_size));
    }
    auto seg = shm::Segment::attach(std::move(*fd));
    if (seg) {
      const shm::Geometry& g = seg->geometry();
      // Everything it describes lies inside the file.
      if (g.segment_size != file_size || g.pool_offset > file_size ||
          g.pool_offset + 2ull * g.slots_per_side * g.slot_size > file_size)
        std::abort();
      auto sock = os::seqpacket_pair();
      if (!sock) return 0;
      auto ep = detail::Endpoint::make({std::move(*seg), std::move(sock->first), 1});
      if (ep) {
        Message m;
        (void)(*ep)->poll(&m);
        (*ep)->close_local();
      }
    }
  }
  fuzz::expect_fds(fds0);
  return 0;
}
