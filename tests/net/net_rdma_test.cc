// mbmq::net over UCX's RDMA transports (issue #19; docs/rdma.md). Skips, saying why, where the
// kernel has no RDMA device (no /sys/class/infiniband entries: no InfiniBand, RoCE or Soft-RoCE),
// which is the case on the machine this was written on: nothing below the skip has been run
// there. Where a device exists it selects RDMA-only transports (UCX_TLS, default "rc": rc_mlx5 and
// rc_verbs, with ud as their auxiliary) and makes real calls between two processes, eager and
// rendezvous payloads, each reply checked byte for byte. With only RDMA transports allowed, a
// call that succeeds went over RDMA (UCX's connection manager, tcp or rdmacm, only sets it up).
//
// Environment (all optional; scripts/rdma-check.sh sets them):
//   MBMQ_RDMA_TLS      UCX_TLS for this test (default "rc"; e.g. "rc_x", "dc_x", "rc_v", "ud").
//   MBMQ_RDMA_ADDR     the IPv4 address to listen on and call (default 127.0.0.1; the address of
//                      the RDMA device's netdev makes the rdmacm connection manager usable).
//   MBMQ_REQUIRE_RDMA  "1": no device, or UCX unable to use it, is a failure, not a skip.
//   MBMQ_RDMA_SERVE    "ADDR:PORT": two hosts, this host serves one client of MBMQ_RDMA_PEER.
//   MBMQ_RDMA_PEER     "ADDR:PORT": two hosts, this host calls the server there.
//   MBMQ_RDMA_SYSFS    where to look for devices instead of /sys/class/infiniband (only to try
//                      the test's and the script's own paths on a host without RDMA, with
//                      MBMQ_RDMA_TLS=tcp: then nothing goes over RDMA).
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <system_error>
#include <vector>

#include "mbmq/net.h"
#include "net/net_util.h"
#include "test_util.h"

namespace mbmq {
namespace {

using test::Pipe;
using test::secs;

constexpr const char* kNoDevice =
    "no RDMA device (the kernel has no InfiniBand/RoCE support here): see docs/rdma.md";

std::string env_or(const char* name, const char* fallback) {
  const char* v = std::getenv(name);  // NOLINT(concurrency-mt-unsafe): read before any thread
  return v != nullptr && *v != '\0' ? v : fallback;
}

bool required() { return env_or("MBMQ_REQUIRE_RDMA", "0") == "1"; }

// The kernel's RDMA devices (mlx5_0, rxe0, ...): the entries of /sys/class/infiniband, which
// exists once an RDMA driver (ib_core) is loaded and lists RoCE and Soft-RoCE devices too.
std::vector<std::string> rdma_devices() {
  std::vector<std::string> out;
  std::error_code ec;
  const std::string dir = env_or("MBMQ_RDMA_SYSFS", "/sys/class/infiniband");
  for (const auto& e : std::filesystem::directory_iterator(dir, ec))
    out.push_back(e.path().filename().string());
  return out;
}

std::string joined(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& x : v) s += (s.empty() ? "" : ",") + x;
  return s;
}

// The server's answer: every byte + 1, and one byte more (the caller checks both).
void answer(net::Buffer& b) {
  for (auto& x : b.data()) x = static_cast<std::byte>(static_cast<unsigned>(x) + 1);
  const std::size_t n = b.size();
  if (b.resize(n + 1)) b.data()[n] = std::byte{0x5a};
}

// Listens on addr:port (0: any), tells `port_pipe` the port (0 if listen() failed, after printing
// why), serves one client's calls until it leaves. 0 when all went as expected.
int serve(const std::string& addr, std::uint32_t port, const Pipe* port_pipe, int accept_s) {
  auto l = net::listen("ucx://" + addr + ":" + std::to_string(port) + "/rdma");
  if (!l) {
    std::fprintf(stderr, "net_rdma_test: server: %s\n", l.error().message().c_str());
    if (port_pipe != nullptr) port_pipe->put(0);
    return 10;
  }
  if (port_pipe != nullptr) port_pipe->put(l->port());
  auto ch = l->accept(secs(accept_s));
  if (!ch) {
    std::fprintf(stderr, "net_rdma_test: server: accept: %s\n", ch.error().message().c_str());
    return 11;
  }
  for (;;) {
    auto m = ch->receive(secs(60));
    if (!m) return 12;
    if (m->kind == Kind::PeerClosed) return m->error == Errc::PeerClosed ? 0 : 13;
    if (m->kind != Kind::Request) return 14;
    answer(m->buffer);
    if (!net::Channel::reply(std::move(*m))) return 15;
  }
}

// Calls the server at url with 64 B and 4 KiB (eager: UCX's registered bounce buffers) and 1 MiB
// and 8 MiB (rendezvous: the NIC reads the caller's buffer and writes the reply into it),
// checking every byte of every reply.
void call_sizes(const std::string& url) {
  auto ch = net::connect(url, secs(20));
  ASSERT_TRUE(ch) << ch.error().message() << " (UCX_TLS=" << env_or("UCX_TLS", "")
                  << "; ulimit -l too low? ucx_info -d lists the transports: docs/rdma.md)";
  for (std::size_t size :
       {std::size_t{64}, std::size_t{4096}, std::size_t{1} << 20, std::size_t{8} << 20}) {
    auto b = ch->buffer(size);
    ASSERT_TRUE(b) << b.error().message();
    test::fill(b->data(), size);
    auto st = ch->call(*b, secs(20));
    ASSERT_TRUE(st) << size << " B: " << st.error().message();
    ASSERT_EQ(b->size(), size + 1);
    std::size_t bad = size;
    for (std::size_t i = 0; i < size && bad == size; ++i)
      if (b->data()[i] != static_cast<std::byte>(static_cast<unsigned>(test::pattern(size, i)) + 1))
        bad = i;
    EXPECT_EQ(bad, size) << size << " B: first wrong byte of the reply";
    EXPECT_EQ(b->data()[size], std::byte{0x5a}) << size << " B";
  }
  ch->close();
}

bool split(const std::string& hp, std::string& host, std::uint32_t& port) {
  const auto colon = hp.rfind(':');
  if (colon == std::string::npos) return false;
  host = hp.substr(0, colon);
  port = static_cast<std::uint32_t>(std::strtoul(hp.c_str() + colon + 1, nullptr, 10));
  return !host.empty() && port != 0 && port < 65536;
}

TEST(NetRdma, CallsOverAnRdmaTransportReturnTheirPayloadsIntact) {
  const auto devices = rdma_devices();
  if (devices.empty()) {
    if (required()) FAIL() << kNoDevice << " (MBMQ_REQUIRE_RDMA=1)";
    GTEST_SKIP() << kNoDevice;
  }
  // Before UCX is loaded (first listen/connect): RDMA transports only, whatever UCX_TLS was.
  const std::string tls = env_or("MBMQ_RDMA_TLS", "rc");
  ASSERT_EQ(::setenv("UCX_TLS", tls.c_str(), 1), 0);  // NOLINT(concurrency-mt-unsafe)
  std::printf("RDMA devices: %s; UCX_TLS=%s\n", joined(devices).c_str(), tls.c_str());
  std::fflush(stdout);  // not copied into a forked child's buffer

  std::string host;
  std::uint32_t port = 0;
  if (const std::string s = env_or("MBMQ_RDMA_SERVE", ""); !s.empty()) {
    ASSERT_TRUE(split(s, host, port)) << "MBMQ_RDMA_SERVE=" << s << ": want ADDR:PORT";
    std::printf("serving ucx://%s:%u/rdma for one client (120 s)\n", host.c_str(), port);
    std::fflush(stdout);
    EXPECT_EQ(serve(host, port, nullptr, 120), 0);
    return;
  }
  if (const std::string p = env_or("MBMQ_RDMA_PEER", ""); !p.empty()) {
    ASSERT_TRUE(split(p, host, port)) << "MBMQ_RDMA_PEER=" << p << ": want ADDR:PORT";
    call_sizes("ucx://" + host + ":" + std::to_string(port) + "/rdma");
    return;
  }

  // One host: the server in a child forked before this process loads UCX.
  const std::string addr = env_or("MBMQ_RDMA_ADDR", "127.0.0.1");
  Pipe p = Pipe::make();
  const pid_t server = test::spawn([&] { return serve(addr, 0, &p, 30); });
  ASSERT_GT(server, 0);
  p.w.reset();  // a child that dies before writing: get() sees the end, not a hang
  port = p.get();
  if (port == 0) {
    const int rc = test::join(server);
    const std::string why = "RDMA device(s) " + joined(devices) +
                            " present, but UCX with UCX_TLS=" + tls + " could not listen on " +
                            addr + " (server exit " + std::to_string(rc) +
                            "; its error is above): check `ucx_info -d`, `ibv_devinfo` (port "
                            "PORT_ACTIVE) and `ulimit -l`; see docs/rdma.md";
    if (required()) FAIL() << why;
    GTEST_SKIP() << why;
  }
  call_sizes("ucx://" + addr + ":" + std::to_string(port) + "/rdma");
  EXPECT_EQ(test::join(server), 0) << "the server saw something other than calls and a close";
}

}  // namespace
}  // namespace mbmq
