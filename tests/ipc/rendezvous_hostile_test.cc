// The rendezvous against hostile neighbours: a process of another uid squatting a name, a full fd
// table, silent connections holding handshake slots, handshake deadlines of any length. Each
// test is the regression test of one attack; they use the public API of before the fixes (and
// os/ wrappers), so that each can be shown to fail without its fix.
#include <gtest/gtest.h>

#include <array>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "os/process.h"
#include "os/unix_socket.h"
#include "test_util.h"

namespace mbmq {
namespace {

using namespace std::chrono_literals;
using test::join;
using test::secs;
using test::spawn;

constexpr unsigned kNobody = 65534;

std::string unique_name(const char* what) {
  static int n = 0;
  return std::string("hostile-") + what + "-" + std::to_string(os::current_pid()) + "-" +
         std::to_string(n++);
}

// One byte through a pipe: "ready", "go". false if the writer went away first.
bool signal(int fd) {
  const std::byte one{1};
  return static_cast<bool>(os::write_full(fd, {&one, 1}));
}
bool await(int fd) {
  std::byte b{};
  auto n = os::read_full(fd, {&b, 1});
  return n && *n == 1;
}

// One call with pattern 0 that the servers below answer with pattern 1.
bool one_call(Channel& ch) {
  auto b = ch.buffer(128);
  if (!b) return false;
  test::fill(b->data(), 0);
  return ch.call(*b, secs(5)) && test::check(b->data(), 1);
}

// A server in a forked child whose soft RLIMIT_NOFILE is `fd_limit`: it adopts every connection
// into a queue and answers requests (pattern 1) until `quit_fd` is readable. Writes a byte to
// `ready_fd` once it listens.
int serve_with_fd_limit(const std::string& name, std::uint64_t fd_limit, const ListenOptions& opt,
                        int ready_fd, int quit_fd) {
  if (!os::set_fd_limit(fd_limit)) return 20;
  auto l = Listener::create(name, opt);
  auto q = MsgQueue::create();
  if (!l || !q || !l->redirect(*q, 0)) return 21;
  if (!signal(ready_fd)) return 22;
  std::uint64_t key = 1;
  for (;;) {
    auto quit = os::wait_readable(quit_fd, 0);
    if (quit && *quit) {
      const ListenerStats st = l->stats();
      std::fprintf(
          stderr, "server: accepted %llu, failed %llu, refused %llu, live %llu\n",
          static_cast<unsigned long long>(st.accepted), static_cast<unsigned long long>(st.failed),
          static_cast<unsigned long long>(l->refused()), static_cast<unsigned long long>(st.live));
      return 0;
    }
    auto m = q->wait(Deadline::after(50ms));
    if (!m) {
      if (m.error().code == Errc::TimedOut) continue;
      std::fprintf(stderr, "server: %s\n", m.error().message().c_str());
      return 23;
    }
    if (m->kind == Kind::Connection) {
      (void)q->adopt(std::move(m->channel), key++);  // may fail for want of fds: it is dropped
    } else if (m->kind == Kind::Request) {
      test::fill(m->buffer.data(), 1);
      (void)MsgQueue::reply(std::move(*m));
    }
  }
}

struct ForkedServer {
  pid_t pid = -1;
  os::UniqueFd quit;  // write end: a byte stops the server
};

// Forks the server above (before this process has a watcher thread, if it has none yet).
ForkedServer start_server(const std::string& name, std::uint64_t fd_limit,
                          const ListenOptions& opt) {
  auto ready = os::make_pipe();
  auto quit = os::make_pipe();
  if (!ready || !quit) return {};
  pid_t pid = spawn([&] {
    ready->first.reset();
    quit->second.reset();
    return serve_with_fd_limit(name, fd_limit, opt, ready->second.get(), quit->first.get());
  });
  ready->second.reset();
  quit->first.reset();
  if (!await(ready->first.get())) return {pid, {}};
  return {pid, std::move(quit->second)};
}

// One ordinary client first: a connection, a call, a hang-up. Besides checking the server, this
// runs each virtual call of the server's watcher once while its fd table has room: UBSan's vptr
// check (the asan preset) probes memory through a pipe() on a type-cache miss, and with a full fd
// table that fails and reports a bogus "invalid vptr" (fatal with -fno-sanitize-recover).
bool warm_up(const std::string& name) {
  {
    auto ch = connect(name, secs(5));
    if (!ch || !one_call(*ch)) return false;
  }
  std::this_thread::sleep_for(50ms);  // the server's watcher sees the hang-up
  return true;
}

int stop_server(ForkedServer& s) {
  if (s.quit) (void)signal(s.quit.get());
  return join(s.pid);
}

// CPU time (all threads) process `pid` uses while this one sleeps for `ms`.
std::int64_t cpu_ns_over(pid_t pid, int ms) {
  const std::int64_t c0 = os::process_cpu_ns(pid);
  std::this_thread::sleep_for(std::chrono::milliseconds(ms));
  return os::process_cpu_ns(pid) - c0;
}

// ---- Bug 2: name squatting -------------------------------------------------------------------

// A process of another uid binds the name first. Before the fix connect() never asked who
// listened: it sent its hello to the squatter (and, to a squatting mbmq Listener, its requests).
TEST(RendezvousHostile, ASquatterOfAnotherUidGetsNoHelloAndTheClientIsRefusedNamingItsUid) {
  if (os::current_uid() != 0) GTEST_SKIP() << "needs root to play another uid";
  const std::string name = unique_name("squat");
  auto ready = os::make_pipe();
  ASSERT_TRUE(ready);
  pid_t squatter = spawn([&] {
    ready->first.reset();
    if (!os::become_user(kNobody, kNobody)) return 30;
    auto l = os::listen_abstract("mbmq:" + name, 8);
    if (!l || !signal(ready->second.get())) return 31;
    auto r = os::wait_readable(l->get(), 10'000'000'000);
    if (!r || !*r) return 32;
    auto c = os::accept_conn(l->get());
    if (!c) return 33;
    // Everything the client sends, until it closes.
    std::size_t got = 0;
    for (;;) {
      auto rd = os::wait_readable(c->get(), 10'000'000'000);
      if (!rd || !*rd) return 34;
      std::array<std::byte, 256> buf{};
      std::array<os::UniqueFd, 4> fds;
      auto m = os::recv_msg(c->get(), buf, fds, os::Blocking::No);
      if (!m) {
        if (m.error().code == Errc::WouldBlock) continue;
        break;  // reset: closed
      }
      if (m->bytes == 0 && m->nfds == 0) break;
      got += m->bytes;
    }
    return got == 0 ? 0 : 40;  // 40: the client sent something to the squatter
  });
  ready->second.reset();
  ASSERT_TRUE(await(ready->first.get()));
  const auto t0 = monotonic_ns();
  auto ch = connect(name, secs(5));
  ASSERT_FALSE(ch) << "connected to a squatter of uid 65534";
  EXPECT_EQ(ch.error().code, Errc::Refused) << ch.error().message();
  EXPECT_NE(ch.error().message().find("uid 65534"), std::string::npos) << ch.error().message();
  EXPECT_LT(monotonic_ns() - t0, 1'000'000'000);  // at once, not at the deadline
  EXPECT_EQ(join(squatter), 0) << "40: the squatter received data";
}

// The same squatter as a real mbmq Listener that accepts anyone: before the fix the client got a
// working channel to it, and its calls went to the squatter.
TEST(RendezvousHostile, AListenerOfAnotherUidIsNotTrustedByDefault) {
  if (os::current_uid() != 0) GTEST_SKIP() << "needs root to play another uid";
  const std::string name = unique_name("squat-mbmq");
  auto ready = os::make_pipe();
  ASSERT_TRUE(ready);
  pid_t squatter = spawn([&] {
    ready->first.reset();
    if (!os::become_user(kNobody, kNobody)) return 30;
    ListenOptions opt;
    opt.access.allow_any = true;
    auto l = Listener::create(name, opt);
    if (!l || !signal(ready->second.get())) return 31;
    auto ch = l->accept(Deadline::after(1500ms));
    return ch ? 40 : 0;  // 40: a client handed the squatter a channel
  });
  ready->second.reset();
  ASSERT_TRUE(await(ready->first.get()));
  auto ch = connect(name, secs(5));
  ASSERT_FALSE(ch) << "connected to a squatter of uid 65534";
  EXPECT_EQ(ch.error().code, Errc::Refused) << ch.error().message();
  EXPECT_NE(ch.error().message().find("uid 65534"), std::string::npos) << ch.error().message();
  EXPECT_EQ(join(squatter), 0);
}

// ---- Bug 17: fd-table exhaustion ----------------------------------------------------------------

// A server whose connection limit is above what its fd table holds (max_connections = 1024, the
// old default, with 128 fds): idle clients and silent connections fill the table, and accept4()
// fails with EMFILE while connections wait in the backlog. Before the fix the level-triggered
// listening socket woke the watcher thread at once, forever (about 75% of a core); now it pauses,
// and an honest client gets in as soon as the idle ones leave.
TEST(RendezvousHostile, AFullFdTableMakesTheListenerPauseNotSpin) {
  const std::string name = unique_name("emfile");
  ListenOptions opt;
  opt.max_connections = 1024;
  opt.handshake_timeout = 10s;  // silent connections keep their fd for the whole test
  ForkedServer server = start_server(name, 128, opt);
  ASSERT_TRUE(server.quit) << "server failed to start: " << join(server.pid);
  ASSERT_TRUE(warm_up(name));
  std::vector<Channel> idle;
  Error last{};
  for (int i = 0; i < 400; ++i) {
    auto ch = connect(name, Deadline::after(500ms));
    if (!ch) {
      last = ch.error();
      break;
    }
    idle.push_back(std::move(*ch));
  }
  std::printf("idle connections before the server's fd table was full: %zu; then: %s\n",
              idle.size(), last.message().c_str());
  ASSERT_GT(idle.size(), 5u);
  ASSERT_LT(idle.size(), 400u);
  // A handshake needs 7 fds at its peak and a silent connection 1: silent ones take the last fds,
  // and the rest wait in the backlog, where accept4() fails with EMFILE.
  std::vector<os::UniqueFd> silent;
  for (int i = 0; i < 24; ++i) {
    auto c = os::connect_abstract("mbmq:" + name, 1'000'000'000);
    ASSERT_TRUE(c) << c.error().message();
    silent.push_back(std::move(*c));
  }
  std::this_thread::sleep_for(100ms);
  const std::int64_t cpu = cpu_ns_over(server.pid, 1000);
  std::printf("server CPU over 1 s with a full fd table: %.1f ms\n",
              static_cast<double>(cpu) / 1e6);
  EXPECT_LT(cpu, 200'000'000) << "the server spins on a full fd table";
  // The idle clients leave: their server ends close, and an honest client gets in.
  idle.clear();
  silent.clear();
  auto t0 = monotonic_ns();
  auto ch = connect(name, secs(5));
  ASSERT_TRUE(ch) << ch.error().message();
  std::printf("honest client connected %.1f ms after the idle ones left\n",
              static_cast<double>(monotonic_ns() - t0) / 1e6);
  EXPECT_TRUE(one_call(*ch));
  EXPECT_EQ(stop_server(server), 0);
}

// With the default limit (derived from RLIMIT_NOFILE) the same idle clients are refused with a
// clear error before the fd table is full, and the server stays idle. Before the fix the default
// was 1024 whatever the fd table: the clients hung until their deadline instead.
TEST(RendezvousHostile, IdleClientsAreRefusedAtTheDerivedLimitBeforeTheFdTableFills) {
  const std::string name = unique_name("derived");
  ForkedServer server = start_server(name, 128, ListenOptions{});
  ASSERT_TRUE(server.quit) << "server failed to start: " << join(server.pid);
  ASSERT_TRUE(warm_up(name));
  std::vector<Channel> idle;
  Result<Channel> refused = fail(Errc::System, "not run");
  std::int64_t refused_after_ns = 0;
  for (int i = 0; i < 400; ++i) {
    const auto t0 = monotonic_ns();
    auto ch = connect(name, secs(2));
    if (!ch) {
      refused = std::move(ch);
      refused_after_ns = monotonic_ns() - t0;
      break;
    }
    idle.push_back(std::move(*ch));
  }
  ASSERT_FALSE(refused);
  std::printf("idle connections accepted with 128 fds: %zu; then: %s\n", idle.size(),
              refused.error().message().c_str());
  EXPECT_GE(idle.size(), 1u);
  EXPECT_EQ(refused.error().code, Errc::Refused);
  EXPECT_NE(refused.error().message().find("connection limit"), std::string::npos);
  EXPECT_LT(refused_after_ns, 1'000'000'000);  // answered, not left to time out
  EXPECT_LT(cpu_ns_over(server.pid, 1000), 200'000'000);
  // The idle clients leave; their places are free once the server has dropped its ends (on its
  // PeerClosed messages), a moment later.
  idle.clear();
  auto ch = connect(name, secs(5));
  for (int i = 0; i < 200 && !ch && ch.error().code == Errc::Refused; ++i) {
    std::this_thread::sleep_for(10ms);
    ch = connect(name, secs(5));
  }
  ASSERT_TRUE(ch) << ch.error().message();
  EXPECT_TRUE(one_call(*ch));
  EXPECT_EQ(stop_server(server), 0);
}

// ---- Bug 18: handshake slots held before authentication -----------------------------------------

// A child that becomes uid 65534, waits for a byte on go_fd, opens `n` connections to `name` that
// never say hello, writes how many it opened (one byte) to done_fd and holds them until killed.
pid_t open_silent_connections(const std::string& name, int n, int go_fd, int done_fd) {
  return spawn([=] {
    if (!os::become_user(kNobody, kNobody)) return 30;
    if (!await(go_fd)) return 31;
    std::vector<os::UniqueFd> held;
    for (int i = 0; i < n; ++i) {
      auto c = os::connect_abstract("mbmq:" + name, 2'000'000'000);
      if (!c) break;
      held.push_back(std::move(*c));
    }
    const auto count = static_cast<std::byte>(held.size());
    if (!os::write_full(done_fd, {&count, 1})) return 32;
    for (;;) ::pause();
  });
}

// The hello of rendezvous v4 (include/mbmq/rendezvous.h, R1; v4 = segment layout v9) and the
// verdict, for raw clients.
struct RawHello {
  std::uint64_t magic = 0x4f4c'4548'514d'424dull;
  std::uint32_t version = 4, flags = 0;
};
struct RawVerdict {
  std::uint64_t magic = 0;
  std::uint32_t verdict = 0, reserved = 0;  // 1: accepted
};

Status send_hello(int sock, std::uint32_t version = 4) {
  RawHello hello;
  hello.version = version;
  return os::send_msg(sock, {reinterpret_cast<const std::byte*>(&hello), sizeof hello}, {});
}

// The verdict on a raw client's connection (0 if none came within 2 s). After "accepted" (1),
// also waits for the channel end that follows (and closes it): 0 if it does not come.
std::uint32_t read_verdict(int sock) {
  auto ready = os::wait_readable(sock, 2'000'000'000);
  if (!ready || !*ready) return 0;
  RawVerdict v;
  std::array<os::UniqueFd, 1> none;
  auto r = os::recv_msg(sock, {reinterpret_cast<std::byte*>(&v), sizeof v}, none, os::Blocking::No);
  if (!r || r->bytes != sizeof v) return 0;
  if (v.verdict != 1) return v.verdict;
  ready = os::wait_readable(sock, 2'000'000'000);
  if (!ready || !*ready) return 0;
  std::array<std::byte, 256> end{};
  std::array<os::UniqueFd, 4> fds;
  r = os::recv_msg(sock, end, fds, os::Blocking::No);
  return r && r->nfds >= 2 ? 1 : 0;
}

// `n` slow clients of this process's uid at once: each connects, is silent for 50 ms (the
// listener has accepted it by then, so it needs a handshake slot), then says hello. How many
// were accepted.
int slow_clients_accepted(const std::string& name, int n) {
  std::vector<os::UniqueFd> socks;
  for (int i = 0; i < n; ++i) {
    auto c = os::connect_abstract("mbmq:" + name, 1'000'000'000);
    if (c) socks.push_back(std::move(*c));
  }
  std::this_thread::sleep_for(50ms);
  for (auto& s : socks) (void)send_hello(s.get());
  int accepted = 0;
  for (auto& s : socks) accepted += read_verdict(s.get()) == 1 ? 1 : 0;
  return accepted;
}

// Runs `honest` connects from this process (root), then `slow` slow clients, while a uid-65534
// child holds `silent` silent connections; returns how many connects succeeded (the slowest in
// *max_ms) and, in *slow_ok, how many slow clients were accepted.
int honest_connects_beside_silent_ones(const std::string& name, const ListenOptions& opt,
                                       Listener* out, int silent, int honest, double* max_ms,
                                       int slow, int* slow_ok) {
  auto go = os::make_pipe();
  auto done = os::make_pipe();
  if (!go || !done) return -1;
  // Forked before the listener starts this process's watcher thread (if not started yet).
  pid_t attacker = open_silent_connections(name, silent, go->first.get(), done->second.get());
  go->first.reset();
  done->second.reset();
  auto l = Listener::create(name, opt);
  if (!l) return -2;
  std::byte opened{};
  if (!signal(go->second.get()) || !os::read_full(done->first.get(), {&opened, 1})) return -3;
  std::printf("uid 65534 holds %d silent connections\n", static_cast<int>(opened));
  int ok = 0;
  *max_ms = 0;
  for (int i = 0; i < honest; ++i) {
    const auto t0 = monotonic_ns();
    auto ch = connect(name, Deadline::after(1s));
    const double ms = static_cast<double>(monotonic_ns() - t0) / 1e6;
    if (ms > *max_ms) *max_ms = ms;
    if (ch) {
      ++ok;
    } else if (i == 0) {
      std::printf("honest connect: %s\n", ch.error().message().c_str());
    }
  }
  *slow_ok = slow_clients_accepted(name, slow);
  (void)os::kill_process(attacker, SIGKILL);
  (void)join(attacker);
  // A client has its channel a moment before the listener's thread counts it as accepted.
  const auto want = static_cast<std::uint64_t>(ok + *slow_ok);
  for (int i = 0; i < 1000 && l->stats().accepted < want; ++i) std::this_thread::sleep_for(1ms);
  *out = std::move(*l);
  return ok;
}

// Uid 65534, which the default policy refuses, opens 80 connections and never says hello.
// Before the fix each took a handshake slot until handshake_timeout (10 s here) and honest
// connects succeeded 0 of 40; now the uid is checked at accept and refused at once.
TEST(RendezvousHostile, SilentConnectionsOfARefusedUidDoNotLockOutHonestClients) {
  if (os::current_uid() != 0) GTEST_SKIP() << "needs root to play another uid";
  const std::string name = unique_name("preauth");
  ListenOptions opt;
  opt.handshake_timeout = 10s;  // the slots would stay held for the whole test
  Listener l;
  double max_ms = 0;
  int slow_ok = 0;
  const int ok = honest_connects_beside_silent_ones(name, opt, &l, 80, 40, &max_ms, 8, &slow_ok);
  std::printf("honest connects: %d of 40, slowest %.1f ms; slow clients accepted: %d of 8\n", ok,
              max_ms, slow_ok);
  EXPECT_EQ(ok, 40);
  EXPECT_LT(max_ms, 500.0);
  EXPECT_EQ(slow_ok, 8);
  EXPECT_EQ(l.stats().refused_policy, 80u);
  EXPECT_EQ(l.stats().accepted, 48u);
}

// Uid 65534 is allowed here, and opens 80 silent connections: more than the 64 handshake slots.
// Before the fix it held all of them and this process's uid (root) got none; now one uid holds at
// most max_handshakes / 4 = 16, the others are refused ("busy") at once, and root's clients,
// slow ones included (which need a slot), get in.
TEST(RendezvousHostile, OneAllowedUidCannotHoldEveryHandshakeSlot) {
  if (os::current_uid() != 0) GTEST_SKIP() << "needs root to play another uid";
  const std::string name = unique_name("peruid");
  ListenOptions opt;
  opt.access.allow_uids = {kNobody};
  opt.handshake_timeout = 10s;
  Listener l;
  double max_ms = 0;
  int slow_ok = 0;
  const int ok = honest_connects_beside_silent_ones(name, opt, &l, 80, 40, &max_ms, 8, &slow_ok);
  std::printf("honest connects: %d of 40, slowest %.1f ms; slow clients accepted: %d of 8\n", ok,
              max_ms, slow_ok);
  EXPECT_EQ(ok, 40);
  EXPECT_LT(max_ms, 500.0);
  EXPECT_EQ(slow_ok, 8);
  EXPECT_EQ(l.refused(), 80u - 16u);  // the rest wait in their uid's 16 slots
  EXPECT_EQ(l.stats().accepted, 48u);
}

// ---- Durations: handshake deadlines of any length -----------------------------------------------

// A hello sent 300 ms after connecting, to a listener whose handshake_timeout is far away: the
// connection is accepted, and the watcher thread sleeps meanwhile. Before the fix
// milliseconds::max() overflowed into a deadline in the past (the connection was dropped at once),
// and a deadline over ~24.8 days away made an int timeout wrap.
TEST(RendezvousHostile, AHandshakeTimeoutOfAnyLengthNeitherDropsEarlyNorSpins) {
  for (auto timeout : {std::chrono::milliseconds::max(),
                       std::chrono::duration_cast<std::chrono::milliseconds>(24h * 365 * 100),
                       std::chrono::milliseconds((std::int64_t{1} << 32) + 300),
                       std::chrono::duration_cast<std::chrono::milliseconds>(5h)}) {
    SCOPED_TRACE(std::to_string(timeout.count()) + " ms");
    const std::string name = unique_name("far");
    ListenOptions opt;
    opt.handshake_timeout = timeout;
    auto l = Listener::create(name, opt);
    ASSERT_TRUE(l);
    auto sock = os::connect_abstract("mbmq:" + name);
    ASSERT_TRUE(sock);
    const std::int64_t c0 = os::process_cpu_ns();
    std::this_thread::sleep_for(300ms);
    const std::int64_t cpu = os::process_cpu_ns() - c0;
    EXPECT_LT(cpu, 30'000'000) << "the watcher thread spins";
    EXPECT_EQ(l->stats().failed, 0u) << "the handshake was dropped before its deadline";
    ASSERT_TRUE(send_hello(sock->get()));
    EXPECT_EQ(read_verdict(sock->get()), 1u) << "not accepted";
    auto ch = l->accept(secs(5));
    EXPECT_TRUE(ch);
  }
}

// A client of the previous protocol (v3: segment layout v8) is refused at its hello with
// RefusedVersion (3), counted, and gets no channel end it could not read; the listener goes on
// accepting v4 clients.
TEST(RendezvousHostile, AClientOfThePreviousProtocolIsRefusedForItsVersionAndCounted) {
  const std::string name = unique_name("oldver");
  auto l = Listener::create(name);
  ASSERT_TRUE(l);
  auto old = os::connect_abstract("mbmq:" + name);
  ASSERT_TRUE(old);
  ASSERT_TRUE(send_hello(old->get(), 3));
  EXPECT_EQ(read_verdict(old->get()), 3u) << "not refused for its version";
  EXPECT_EQ(l->stats().refused_version, 1u);
  auto now = os::connect_abstract("mbmq:" + name);
  ASSERT_TRUE(now);
  ASSERT_TRUE(send_hello(now->get()));
  EXPECT_EQ(read_verdict(now->get()), 1u) << "a current client not accepted";
  EXPECT_TRUE(l->accept(secs(5)));
}

}  // namespace
}  // namespace mbmq
