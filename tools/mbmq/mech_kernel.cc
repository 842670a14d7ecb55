// tools/mbmq/mech_kernel.cc: the kernel's byte pipes. Each copies the payload twice per request
// (the sender's buffer into the kernel, the kernel into the receiver's buffer).
//   pipe           two pipes, write() + read()
//   uds            a Unix stream socket pair
//   uds-seqpacket  a Unix SOCK_SEQPACKET pair (records of at most 64 KiB: the kernel's limit on
//                  one record is the socket buffer)
//   tcp            a TCP connection over loopback, TCP_NODELAY
// Frame: an 8-byte length, then the payload. Reply: the 8-byte sum. A length of ~0 stops.
#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include "bench.h"
#include "os/process.h"
#include "os/tcp.h"
#include "os/unix_socket.h"

namespace mbmq::tool {
namespace {

enum class Kind { Pipe, Uds, UdsSeqpacket, Tcp };

constexpr std::size_t kRecord = 64 * 1024;

// Writes buf in records of at most `record` bytes (a byte stream: one write_full).
Status send_all(int fd, std::span<const std::byte> buf, std::size_t record) {
  if (record == 0) return os::write_full(fd, buf);
  for (std::size_t off = 0; off < buf.size(); off += record)
    MBMQ_TRY(os::write_full(fd, buf.subspan(off, std::min(record, buf.size() - off))));
  return {};
}
// Reads exactly buf.size() bytes. On a SEQPACKET socket, each read takes one record.
bool recv_all(int fd, std::span<std::byte> buf, bool records) {
  if (!records) {
    auto got = os::read_full(fd, buf);
    return got && *got == buf.size();
  }
  std::size_t off = 0;
  while (off < buf.size()) {
    long n = os::read_once(fd, buf.data() + off, std::min(kRecord, buf.size() - off));
    if (n <= 0) return false;
    off += static_cast<std::size_t>(n);
  }
  return true;
}

Mechanism stream_mechanism(Kind kind) {
  struct State {
    os::UniqueFd c_in, c_out, s_in, s_out;  // client reads c_in, writes c_out; server the reverse
    std::vector<std::byte> cbuf, sbuf;
  };
  auto st = std::make_shared<State>();
  const bool records = kind == Kind::UdsSeqpacket;
  const std::size_t record = records ? kRecord : 0;
  Mechanism m;
  m.name = kind == Kind::Pipe           ? "pipe"
           : kind == Kind::Uds          ? "uds"
           : kind == Kind::UdsSeqpacket ? "uds-seqpacket"
                                        : "tcp";
  m.copies_by_design = "2: write() copies into the kernel, read() copies out";
  m.setup = [st, kind](std::size_t size) -> Status {
    std::pair<os::UniqueFd, os::UniqueFd> p;
    if (kind == Kind::Pipe) {
      auto [r1, w1] = MBMQ_TRY(os::make_pipe());  // client -> server
      auto [r2, w2] = MBMQ_TRY(os::make_pipe());  // server -> client
      st->c_out = std::move(w1);
      st->s_in = std::move(r1);
      st->s_out = std::move(w2);
      st->c_in = std::move(r2);
    } else {
      p = kind == Kind::Uds            ? MBMQ_TRY(os::stream_pair())
          : kind == Kind::UdsSeqpacket ? MBMQ_TRY(os::seqpacket_pair())
                                       : MBMQ_TRY(os::tcp_loopback_pair());
      st->c_out = MBMQ_TRY(os::dup_fd(p.first.get()));
      st->c_in = std::move(p.first);
      st->s_out = MBMQ_TRY(os::dup_fd(p.second.get()));
      st->s_in = std::move(p.second);
    }
    st->cbuf.assign(size + 8, std::byte{0});
    st->sbuf.assign(size + 8, std::byte{0});
    return {};
  };
  m.serve = [st, records](std::size_t, ServerCounter& count) -> int {
    st->c_in.reset();
    st->c_out.reset();
    for (;;) {
      std::uint64_t len = 0;
      std::byte* payload = st->sbuf.data();
      if (records) {
        if (!recv_all(st->s_in.get(), {reinterpret_cast<std::byte*>(&len), 8}, records)) return 1;
        if (len == ~std::uint64_t{0}) return count.stop(), 0;
        if (len > st->sbuf.size()) return 2;
        if (!recv_all(st->s_in.get(), {payload, len}, records)) return 3;
      } else {
        // A byte stream: one read takes the whole frame (length + payload) when it is there, as
        // a buffered server would; the client sent it with one write and sends nothing more
        // before the answer, so nothing of a next frame is read. The rest, if short, after.
        // (It read the length and the payload with two reads before: one system call per round
        // trip more than the client's write needs, a handicap mbmq did not have.)
        long got = os::read_once(st->s_in.get(), st->sbuf.data(), st->sbuf.size());
        if (got <= 0) return 1;
        auto n = static_cast<std::size_t>(got);
        if (n < 8 && !recv_all(st->s_in.get(), {st->sbuf.data() + n, 8 - n}, false)) return 1;
        n = std::max<std::size_t>(n, 8);
        std::memcpy(&len, st->sbuf.data(), 8);
        if (len == ~std::uint64_t{0}) return count.stop(), 0;
        if (len > st->sbuf.size() - 8) return 2;
        if (n < 8 + len && !recv_all(st->s_in.get(), {st->sbuf.data() + n, 8 + len - n}, false))
          return 3;
        payload = st->sbuf.data() + 8;
      }
      std::uint64_t sum = read_payload(payload, len);
      if (!os::write_full(st->s_out.get(), {reinterpret_cast<std::byte*>(&sum), 8})) return 4;
      count.tick();
    }
  };
  m.after_fork_parent = [st]() -> Status {
    st->s_in.reset();
    st->s_out.reset();
    return {};
  };
  m.client_rtt = [st, records, record](std::uint64_t iter) -> bool {
    std::size_t size = st->cbuf.size() - 8;
    std::uint64_t len = size;
    write_payload(st->cbuf.data() + 8, size, iter);
    if (records) {  // the length is its own record
      if (!os::write_full(st->c_out.get(), {reinterpret_cast<std::byte*>(&len), 8})) return false;
      if (!send_all(st->c_out.get(), {st->cbuf.data() + 8, size}, record)) return false;
    } else {
      std::memcpy(st->cbuf.data(), &len, 8);
      if (!os::write_full(st->c_out.get(), {st->cbuf.data(), size + 8})) return false;
    }
    std::uint64_t sum = 0;
    if (!recv_all(st->c_in.get(), {reinterpret_cast<std::byte*>(&sum), 8}, records)) return false;
    return sum == expected_sum(size, iter);
  };
  m.stop = [st] {
    std::uint64_t stop = ~std::uint64_t{0};
    (void)os::write_full(st->c_out.get(), {reinterpret_cast<std::byte*>(&stop), 8});
  };
  m.teardown = [st] {
    st->c_in.reset();
    st->c_out.reset();
    st->cbuf = {};
    st->sbuf = {};
  };
  return m;
}

}  // namespace

std::vector<Mechanism> kernel_mechanisms() {
  return {stream_mechanism(Kind::Pipe), stream_mechanism(Kind::Uds),
          stream_mechanism(Kind::UdsSeqpacket), stream_mechanism(Kind::Tcp)};
}

}  // namespace mbmq::tool
