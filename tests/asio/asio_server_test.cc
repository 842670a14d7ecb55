// examples/asio_server, run as its own program: TCP echo clients and mbmq clients drive it at
// once, every answer is checked, and SIGTERM ends it with exit code 0.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <atomic>
#include <csignal>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "mbmq/mbmq.h"
#include "os/process.h"
#include "os/tcp.h"

#ifndef MBMQ_ASIO_SERVER
#error "MBMQ_ASIO_SERVER: the path of the asio_server example"
#endif

namespace mbmq {
namespace {

using namespace std::chrono_literals;

struct Running {
  pid_t pid = -1;
  std::uint16_t port = 0;
  std::string name;
  // A test that fails half-way leaves no server behind.
  ~Running() {
    if (pid > 0 && os::kill_process(pid, SIGKILL)) (void)os::wait_process(pid);
  }
};

// Starts the example and reads its "asio_server: tcp 127.0.0.1:PORT mbmq NAME" line.
void start_server(Running& s) {
  s.name = "asio-server-test-" + std::to_string(os::current_pid());
  auto pipe = os::make_pipe();
  EXPECT_TRUE(pipe);
  if (!pipe) return;
  auto pid = os::spawn_program(MBMQ_ASIO_SERVER, {s.name, "0"}, pipe->second.get());
  EXPECT_TRUE(pid) << pid.error().message();
  if (!pid) return;
  s.pid = *pid;
  pipe->second.reset();
  std::string line;
  for (;;) {
    std::byte c{};
    auto n = os::read_full(pipe->first.get(), {&c, 1});
    if (!n || *n == 0 || static_cast<char>(c) == '\n') break;
    line += static_cast<char>(c);
  }
  const auto at = line.find("127.0.0.1:");
  EXPECT_NE(at, std::string::npos) << "the server said: '" << line << "'";
  if (at != std::string::npos)
    s.port = static_cast<std::uint16_t>(std::stoul(line.substr(at + 10)));
}

std::vector<std::byte> pattern(std::mt19937& rng, std::size_t n) {
  std::vector<std::byte> v(n);
  for (auto& b : v) b = static_cast<std::byte>(rng());
  return v;
}

// One TCP client: `rounds` echoes of random sizes and bytes, each checked.
void tcp_client(std::uint16_t port, unsigned seed, int rounds, std::atomic<int>& ok) {
  auto fd = os::tcp_connect("127.0.0.1", port);
  ASSERT_TRUE(fd) << fd.error().message();
  std::mt19937 rng(seed);
  for (int i = 0; i < rounds; ++i) {
    std::vector<std::byte> out = pattern(rng, 1 + rng() % 3000), in(out.size());
    ASSERT_TRUE(os::write_full(fd->get(), out));
    auto n = os::read_full(fd->get(), in);
    ASSERT_TRUE(n && *n == in.size()) << "tcp client " << seed << " round " << i;
    ASSERT_EQ(in, out) << "tcp client " << seed << " round " << i << ": wrong echo";
    ++ok;
  }
}

// One mbmq client: `rounds` calls of random sizes and bytes; each answer is the request reversed.
// reconnect: a new connection every 10 calls (the server adopts and drops channels meanwhile).
void mbmq_client(const std::string& name, unsigned seed, int rounds, bool reconnect,
                 std::atomic<int>& ok) {
  std::mt19937 rng(seed);
  Channel ch;
  for (int i = 0; i < rounds; ++i) {
    if (!ch.valid() || (reconnect && i % 10 == 0)) {
      auto c = connect(name, Deadline::after(5s));
      ASSERT_TRUE(c) << c.error().message();
      ch = std::move(*c);
    }
    const std::size_t n = 1 + rng() % 5000;
    std::vector<std::byte> req = pattern(rng, n);
    auto buf = ch.buffer(n);
    ASSERT_TRUE(buf) << buf.error().message();
    std::memcpy(buf->data().data(), req.data(), n);
    Status s = ch.call(*buf, Deadline::after(5s));
    ASSERT_TRUE(s) << "mbmq client " << seed << " call " << i << ": " << s.error().message();
    ASSERT_EQ(buf->size(), n);
    std::vector<std::byte> rev(req.rbegin(), req.rend());
    ASSERT_EQ(0, std::memcmp(buf->data().data(), rev.data(), n))
        << "mbmq client " << seed << " call " << i << ": wrong answer";
    ++ok;
  }
}

TEST(AsioServer, ServesTcpAndMbmqClientsAtOnceAndStopsOnSigterm) {
  Running s;
  start_server(s);
  ASSERT_GT(s.pid, 0);
  ASSERT_NE(s.port, 0);
  constexpr int kTcp = 4, kMbmq = 4, kRounds = 300;
  std::atomic<int> tcp_ok{0}, mbmq_ok{0};
  std::vector<std::thread> clients;
  for (int i = 0; i < kTcp; ++i)
    clients.emplace_back(
        [&, i] { tcp_client(s.port, 100u + static_cast<unsigned>(i), kRounds, tcp_ok); });
  for (int i = 0; i < kMbmq; ++i)
    clients.emplace_back(
        [&, i] { mbmq_client(s.name, 200u + static_cast<unsigned>(i), kRounds, i == 0, mbmq_ok); });
  for (auto& t : clients) t.join();
  EXPECT_EQ(tcp_ok.load(), kTcp * kRounds);
  EXPECT_EQ(mbmq_ok.load(), kMbmq * kRounds);
  ASSERT_TRUE(os::kill_process(s.pid, SIGTERM));
  auto st = os::wait_process(s.pid);
  ASSERT_TRUE(st);
  s.pid = -1;
  EXPECT_TRUE(WIFEXITED(*st) && WEXITSTATUS(*st) == 0) << "wait status " << *st;
}

}  // namespace
}  // namespace mbmq
