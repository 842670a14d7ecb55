// Fuzz target: the rendezvous handshake (R1-R4) from both sides. A listener gets an arbitrary
// hello; connect() gets an arbitrary verdict and transfer message (with fds) from a fake
// listener. Either side must answer with an error or a working channel, leak nothing and never
// hang (every wait has a deadline).
#include <cstring>
#include <string>
#include <thread>

#include "fuzz_common.h"
#include "mbmq/mbmq.h"
#include "os/mapping.h"
#include "os/memfd.h"
#include "os/unix_socket.h"

using namespace mbmq;
using namespace std::chrono_literals;

namespace {
std::string unique_name() {
  static int n = 0;
  return "fuzz-hs-" + std::to_string(os::current_pid()) + "-" + std::to_string(n++);
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  FuzzedDataProvider in(data, size);
  fuzz::warm_up();
  const std::size_t fds0 = os::open_fd_count();
  if (in.ConsumeBool()) {
    // The listener's side: a raw client says anything.
    const std::string name = unique_name();
    ListenOptions opt;
    opt.handshake_timeout = 20ms;
    auto l = Listener::create(name, opt);
    if (!l) return 0;
    auto sock = os::connect_abstract("mbmq:" + name);
    if (sock) {
      std::vector<std::uint8_t> hello =
          in.ConsumeBytes<std::uint8_t>(in.ConsumeIntegralInRange<std::size_t>(0, 64));
      if (hello.size() >= 12 && in.ConsumeBool()) {  // often the right magic, any version
        const std::uint64_t magic = 0x4f4c'4548'514d'424dull;
        std::memcpy(hello.data(), &magic, 8);
      }
      (void)os::send_msg(sock->get(),
                         {reinterpret_cast<const std::byte*>(hello.data()), hello.size()}, {});
      auto ch = l->accept(Deadline::after(30ms));
      (void)ch;
    }
  } else {
    // The client's side: a fake listener answers anything.
    const std::string name = unique_name();
    auto lsock = os::listen_abstract("mbmq:" + name, 4);
    if (!lsock) return 0;
    Result<Channel> got = fail(Errc::System, "not run");
    std::thread client([&] { got = connect(name, Deadline::after(50ms)); });
    auto ready = os::wait_readable(lsock->get(), 1'000'000'000);
    auto conn = ready && *ready ? os::accept_conn(lsock->get())
                                : Result<os::UniqueFd>(fail(Errc::System, "x"));
    if (conn) {
      std::byte hello[16];
      std::array<os::UniqueFd, 1> none;
      if (os::wait_readable(conn->get(), 100'000'000).value_or(false))
        (void)os::recv_msg(conn->get(), hello, none, os::Blocking::No);
      for (int k = 0; k < 2 && in.remaining_bytes() > 0; ++k) {
        std::vector<std::uint8_t> msg =
            in.ConsumeBytes<std::uint8_t>(in.ConsumeIntegralInRange<std::size_t>(0, 64));
        if (k == 0 && msg.size() >= 16 && in.ConsumeBool()) {  // a verdict with the right magic
          const std::uint64_t magic = 0x5443'4944'514d'424dull;
          std::memcpy(msg.data(), &magic, 8);
        }
        std::vector<os::UniqueFd> owned;
        for (int f = in.ConsumeIntegralInRange<int>(0, 2); f > 0; --f) {
          auto m =
              os::make_sealed_memfd("fuzz-hs", in.ConsumeIntegralInRange<std::size_t>(0, 1 << 16));
          if (m) owned.push_back(std::move(*m));
        }
        std::vector<int> fds;
        for (auto& o : owned) fds.push_back(o.get());
        (void)os::send_msg(conn->get(),
                           {reinterpret_cast<const std::byte*>(msg.data()), msg.size()}, fds);
      }
    }
    client.join();
    (void)got;
  }
  fuzz::expect_fds(fds0);
  return 0;
}
