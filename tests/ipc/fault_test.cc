// Fault injection (src/os/fault.h): every crash point compiled into the library, hit on the side
// that owns it while the other side survives; and failing system calls, one at a time.
//
// Crash points run in separately exec'd peers (tests/helpers/test_peer.cc) armed through
// MBMQ_CRASH_AT. The survivor must report the right error within its deadline (no hang), and its
// fd and mbmq-mapping counts must be back where they were; so must this process's, and /dev/shm.
#include "os/fault.h"

#include <gtest/gtest.h>

#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "os/process.h"
#include "peer_util.h"
#include "test_util.h"

namespace mbmq {
namespace {

using test::Lines;
using test::secs;

std::string name_for(const std::string& point) {
  return "fault-" + std::to_string(os::current_pid()) + "-" + point;
}

// The server survives a client that crashes at `point`: it keeps serving (a second, healthy
// client makes its calls) and, once every client has gone, its counts are back at its baseline.
void client_crashes(const std::string& point, const std::vector<std::string>& client_args) {
  SCOPED_TRACE(point);
  const std::string name = name_for(point);
  Lines out;
  pid_t server = test::start_peer(out, {"server", name});
  ASSERT_EQ(out.next(secs(10)), "ready");
  std::vector<std::string> args = {"client", name};
  args.insert(args.end(), client_args.begin(), client_args.end());
  pid_t victim = test::start_peer(out, args, {"MBMQ_CRASH_AT=" + point});
  EXPECT_EQ(test::join(victim), 128 + SIGKILL) << "the crash point was not reached";
  pid_t healthy = test::start_peer(out, {"client", name, "--calls", "50"});
  EXPECT_EQ(test::join(healthy), 0);
  // Lines: the victim's "connected" (maybe), the healthy client's, the server's "peer-closed"
  // reports. The server is clean once a report says 0 0 after the healthy client closed.
  bool saw_ok = false, clean = false;
  std::string seen;
  std::string last_report;
  for (std::string line; !clean && !(line = out.next(secs(10))).empty();) {
    seen += line + "; ";
    if (line.rfind("closed ok", 0) == 0) saw_ok = true;
    if (line.rfind("peer-closed", 0) == 0) last_report = line;
    // Both clients are gone (joined above): the server is clean once its latest report says so.
    clean = saw_ok && last_report == "peer-closed 0 0";
  }
  EXPECT_TRUE(saw_ok) << "the healthy client did not finish its calls: " << seen;
  EXPECT_TRUE(clean) << "the server's fds or mappings did not come back: " << seen;
  std::printf("fault: crash point %-20s client killed there; server kept serving: %s, clean: %s\n",
              point.c_str(), saw_ok ? "yes" : "NO", clean ? "yes" : "NO");
  (void)os::kill_process(server, SIGKILL);
  EXPECT_EQ(test::join(server), 128 + SIGKILL) << "the server exited by itself";
}

// A client survives a server that crashes at `point`: its connect or call fails with the given
// error (no hang), and its own counts are back at its baseline.
void server_crashes(const std::string& point, const std::set<std::string>& accepted) {
  SCOPED_TRACE(point);
  const std::string name = name_for(point);
  Lines out;
  pid_t server = test::start_peer(out, {"server", name}, {"MBMQ_CRASH_AT=" + point});
  ASSERT_EQ(out.next(secs(10)), "ready");
  pid_t client = test::start_peer(out, {"client", name});
  std::string last;
  for (std::string line; !(line = out.next(secs(15))).empty();) {
    last = line;
    if (line.rfind("closed", 0) == 0 || line.rfind("connect-failed", 0) == 0) break;
  }
  EXPECT_EQ(test::join(server), 128 + SIGKILL) << "the crash point was not reached";
  std::istringstream in(last);
  std::string word, code;
  long long t = 0, calls = 0, dfd = -1, dmap = -1;
  in >> word >> code;
  EXPECT_TRUE(word == "closed" || word == "connect-failed") << "client said: " << last;
  EXPECT_TRUE(accepted.count(code)) << "client said: " << last;
  if (word == "closed") {
    in >> t >> calls >> dfd >> dmap;
    EXPECT_EQ(dfd, 0) << last;
    EXPECT_EQ(dmap, 0) << last;
  }
  int rc = test::join(client);
  EXPECT_TRUE(rc == 0 || rc == 2) << "client exit " << rc;
  std::printf("fault: crash point %-20s server killed there; client got: %s %s, clean: %s\n",
              point.c_str(), word.c_str(), code.c_str(),
              word == "connect-failed" || (dfd == 0 && dmap == 0) ? "yes" : "NO");
}

TEST(Fault, EveryCrashPointIsSurvivedByThePeer) {
  const test::Snapshot before = test::snapshot();
  // Client side.
  client_crashes("connect.sent_hello", {});
  client_crashes("connect.got_verdict", {});
  client_crashes("call.sent", {});
  client_crashes("call.got_reply", {});
  client_crashes("send.sent", {"--oneway"});
  client_crashes("close.before", {"--calls", "5"});
  // Server side: the listener's handshake steps, holding a request, replying.
  const std::set<std::string> gone = {"peer-closed"};
  server_crashes("listen.got_hello", gone);
  server_crashes("listen.sent_verdict", gone);
  server_crashes("receive.got_request", gone);
  server_crashes("reply.before_send", gone);
  server_crashes("reply.sent", gone);
  EXPECT_EQ(test::settled(before), before) << "this process's fds, mappings or /dev/shm changed";
}

TEST(Fault, TheWalkCoversEveryCrashPointInTheLibrary) {
  // A crash point added to the library without a case above fails here.
  const std::set<std::string> walked = {
      "connect.sent_hello",  "connect.got_verdict", "call.sent",        "call.got_reply",
      "send.sent",           "close.before",        "listen.got_hello", "listen.sent_verdict",
      "receive.got_request", "reply.before_send",   "reply.sent"};
  std::string list(os::crash_points_list());
  std::set<std::string> listed;
  for (std::size_t pos = 0; pos <= list.size();) {
    std::size_t c = list.find(',', pos);
    listed.insert(list.substr(pos, c == std::string::npos ? std::string::npos : c - pos));
    if (c == std::string::npos) break;
    pos = c + 1;
  }
  EXPECT_EQ(listed, walked);
}

// ---- failing system calls, in this process ---------------------------------------------------

struct Disarm {
  ~Disarm() { os::disarm_failures(); }
};

TEST(Fault, ChannelCreationFailsCleanlyWhenAnyOfItsSystemCallsFails) {
  auto warm = Channel::pair();  // the watcher thread and its epoll exist before the baseline
  ASSERT_TRUE(warm);
  const test::Snapshot before = test::snapshot();
  Disarm disarm;
  struct Case {
    os::Fault fault;
    std::uint32_t after;
  };
  // Every call of each kind that Channel::pair() makes: memfd, its size, two mappings, the
  // socket pair, two watcher registrations.
  const Case cases[] = {{os::Fault::MemfdCreate, 0}, {os::Fault::Ftruncate, 0},
                        {os::Fault::Mmap, 0},        {os::Fault::Mmap, 1},
                        {os::Fault::SocketPair, 0},  {os::Fault::EpollCtl, 0},
                        {os::Fault::EpollCtl, 1}};
  for (const Case& c : cases) {
    SCOPED_TRACE(std::string(os::fault_name(c.fault)) + " after " + std::to_string(c.after));
    os::arm_failure(c.fault, c.after, 1, 0);
    auto p = Channel::pair();
    os::disarm_failures();
    ASSERT_FALSE(p);
    EXPECT_EQ(p.error().code, Errc::System);
    EXPECT_EQ(test::settled(before), before) << "a failed pair() leaked";
    std::printf("fault: %s failing (call %u) in Channel::pair(): %s, no leak\n",
                os::fault_name(c.fault), c.after + 1, errc_name(p.error().code));
    EXPECT_TRUE(Channel::pair()) << "the next pair() must work";
    EXPECT_EQ(test::settled(before), before);
  }
}

TEST(Fault, AFailedSendOfALargeBufferLeavesItWithTheCaller) {
  auto ends = Channel::pair();
  ASSERT_TRUE(ends);
  Disarm disarm;
  auto buf = ends->first.buffer(1 << 20);  // an extent: its memfd travels by sendmsg
  ASSERT_TRUE(buf);
  os::arm_failure(os::Fault::SendMsg, 0, 1, 0);
  auto s = ends->first.send(std::move(*buf));
  os::disarm_failures();
  ASSERT_FALSE(s);
  EXPECT_EQ(s.error().code, Errc::System);
  ASSERT_TRUE(buf->valid()) << "the buffer must still be the caller's";
  ASSERT_TRUE(ends->first.send(std::move(*buf)));
  auto m = ends->second.receive(secs(5));
  ASSERT_TRUE(m);
  EXPECT_EQ(m->kind, Kind::Message);
  EXPECT_EQ(m->buffer.size(), 1u << 20);
}

TEST(Fault, FailingFutexCallsCostTimeNotCorrectness) {
  ChannelOptions opt;
  opt.wait.mode = WaitMode::Sleep;
  auto ends = Channel::pair(opt);
  ASSERT_TRUE(ends);
  auto& [client, server] = *ends;
  pid_t pid = test::spawn([&] {
    client = Channel();
    // This server's wake-ups are all lost: its caller must still end at its deadline.
    os::arm_failure(os::Fault::FutexWake, 0, 0, 0);
    for (int i = 0; i < 40; ++i) {
      // Short: the watcher's wake-up at our client's close is lost too (all our wakes fail).
      auto m = server.receive(Deadline::after(std::chrono::seconds(1)));
      if (!m || m->kind != Kind::Request) return i == 0 ? 30 : 0;
      (void)MsgQueue::reply(std::move(*m));
    }
    return 0;
  });
  server = Channel();
  Disarm disarm;
  // Our futex waits fail at once: the wait loop keeps looking instead of sleeping.
  os::arm_failure(os::Fault::FutexWait, 0, 0, 0);
  auto buf = client.buffer(64);
  ASSERT_TRUE(buf);
  int ok = 0, timed_out = 0;
  for (int i = 0; i < 20; ++i) {
    auto r = client.call(*buf, Deadline::after(std::chrono::milliseconds(200)));
    if (r) {
      ++ok;
    } else {
      ASSERT_EQ(r.error().code, Errc::TimedOut) << r.error().message();
      ++timed_out;
      auto b = client.buffer(64);  // a timed-out call gives its buffer up
      ASSERT_TRUE(b);
      *buf = std::move(*b);
    }
  }
  // With our waits failing we never sleep, so a lost wake-up cannot strand us: every call ends.
  EXPECT_EQ(ok + timed_out, 20);
  EXPECT_GT(ok, 0);
  client = Channel();
  EXPECT_EQ(test::join(pid), 0);
}

}  // namespace
}  // namespace mbmq
