// The hostile review of #18 (live introspection), the topic wait without the lock (1413d66) and the
// CI config (98863ea). Each test asserts the correct behaviour: it fails while its bug is real.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <functional>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "ipc/rendezvous_wire.h"
#include "ipc/stat_wire.h"
#include "mbmq/introspect.h"
#include "mbmq/mbmq.h"
#include "os/process.h"
#include "os/unix_socket.h"
#include "topic_util.h"

namespace mbmq {
namespace {

using namespace std::chrono_literals;

#ifdef MBMQ_TOOL
const std::string kTool = MBMQ_TOOL;
constexpr bool kHaveTool = true;
#else
const std::string kTool;
constexpr bool kHaveTool = false;
#endif

std::string unique_name(const char* what) {
  static int n = 0;
  return std::string("r18-") + what + "-" + std::to_string(os::current_pid()) + "-" +
         std::to_string(n++);
}

// The tool's exit status: its exit code, or -1 if it did not exit (killed by a signal: a crash).
// Its stdout in *text if given.
int run_tool(const std::vector<std::string>& args, std::string* text = nullptr) {
  auto out = os::make_pipe();
  if (!out) return -2;
  auto pid = os::spawn_program(kTool, args, out->second.get());
  out->second.reset();
  if (!pid) return -2;
  char buf[65536];
  for (long n; (n = os::read_once(out->first.get(), buf, sizeof buf)) > 0;)
    if (text != nullptr) text->append(buf, static_cast<std::size_t>(n));
  auto st = os::wait_process(*pid);
  return st && WIFEXITED(*st) ? WEXITSTATUS(*st) : -1;
}

// A listener that is not mbmq: it answers each stat query with what `answer` makes of it, for
// at most max_pages queries, then goes away.
class FakeListener {
 public:
  using Answer = std::function<std::vector<std::byte>(const detail::StatQuery&)>;
  FakeListener(const std::string& name, Answer answer, int max_pages)
      : answer_(std::move(answer)), max_pages_(max_pages) {
    auto fd = os::listen_abstract(detail::socket_name(name), 64);
    EXPECT_TRUE(fd) << fd.error().message();
    if (fd) fd_ = std::move(*fd);
    thread_ = std::thread([this] { loop(); });
  }
  ~FakeListener() {
    stop_.store(true);
    thread_.join();
  }
  int pages() const { return pages_.load(); }

 private:
  void loop() {
    while (!stop_.load() && pages_.load() < max_pages_ && fd_) {
      auto ready = os::wait_readable(fd_.get(), 20'000'000);
      if (!ready || !*ready) continue;
      auto conn = os::accept_conn(fd_.get());
      if (!conn) continue;
      auto in = os::wait_readable(conn->get(), 1'000'000'000);
      if (!in || !*in) continue;
      std::array<std::byte, 16> q{};
      std::array<os::UniqueFd, 1> fds;
      auto r = os::recv_msg(conn->get(), q, fds, os::Blocking::No);
      if (!r || r->bytes != sizeof(detail::StatQuery)) continue;
      detail::StatQuery sq{};
      std::memcpy(&sq, q.data(), sizeof sq);
      std::vector<std::byte> reply = answer_(sq);
      (void)os::send_msg(conn->get(), reply, {}, os::Blocking::Yes);
      pages_.fetch_add(1);
    }
    fd_.reset();  // the name is gone: the next query fails
  }
  Answer answer_;
  int max_pages_;
  os::UniqueFd fd_;
  std::atomic<int> pages_{0};
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

ListenerStat good_head() {
  ListenerStat h{};
  h.magic = detail::kStatMagic;
  h.version = detail::kStatVersion;
  h.header_size = sizeof(ListenerStat);
  h.channel_size = sizeof(ChannelStat);
  h.last_refused_uid = ~0u;
  return h;
}

std::vector<std::byte> reply_of(const ListenerStat& h, std::uint32_t channels, const char* why) {
  std::vector<std::byte> out(sizeof(ListenerStat) + channels * sizeof(ChannelStat));
  std::memcpy(out.data(), &h, sizeof h);
  for (std::uint32_t i = 0; i < channels; ++i) {
    ChannelStat c{};
    c.id = i + 1;
    c.wait_mode = 0xee;  // out of range
    c.state = 0xee;
    std::strncpy(c.why, why, sizeof c.why - 1);
    std::memcpy(out.data() + sizeof(ListenerStat) + i * sizeof(ChannelStat), &c, sizeof c);
  }
  return out;
}

// Finding 1. query_stats() pages while first + channels < total_channels, with total_channels
// taken from each (untrusted) reply, in uint32 arithmetic that wraps. A listener (anyone can bind
// an abstract mbmq: name) that claims 2^32-1 channels makes `mbmq stat` fetch page after page,
// holding 64 KiB more per page, until its deadline (2 s in the tool: gigabytes). The client must
// bound what it collects (here: it must give up long before 1100 pages, 275 000 records).
TEST(Review18, StatClientBoundsWhatAHostileListenerMakesItHold) {
  const std::string name = unique_name("hoard");
  FakeListener fake(
      name,
      [](const detail::StatQuery& q) {
        ListenerStat h = good_head();
        h.max_connections = ~0u;
        h.total_channels = ~0u;
        h.first_channel = q.first_channel;
        h.channels = detail::kStatChannelsPerReply;
        return reply_of(h, h.channels, "");
      },
      1500);
  auto r = query_stats(name, StatChannels::Yes, Deadline::after(4s));
  EXPECT_LE(fake.pages(), 1100) << "the client kept paging for a listener's claim";
  if (r) {
    EXPECT_LE(r->channels.size(), std::size_t{1100} * detail::kStatChannelsPerReply);
  }
}

// Finding 2. `mbmq stat --json` puts the reply's strings (name, policy, why) into nlohmann::json,
// whose dump() throws on bytes that are not UTF-8: uncaught, the tool aborts. A hostile listener's
// reply must not crash it (exit 0 or 1, any text).
TEST(Review18, StatJsonSurvivesBytesThatAreNotUtf8) {
  if (!kHaveTool) GTEST_SKIP() << "no mbmq command in this build";
  const std::string name = unique_name("utf8");
  FakeListener fake(
      name,
      [](const detail::StatQuery& q) {
        ListenerStat h = good_head();
        std::strcpy(h.name, "bad\xff\xfe");
        std::strcpy(h.policy, "\xc3");
        std::strcpy(h.last_why, "\x80\x80");
        h.total_channels = 1;
        h.first_channel = q.first_channel;
        h.channels = q.first_channel == 0 ? 1 : 0;
        return reply_of(h, h.channels, "\xff why");
      },
      4);
  const int code = run_tool({"stat", name, "--json"});
  EXPECT_TRUE(code == 0 || code == 1)
      << "mbmq stat --json exited with " << code << " (-1: killed by a signal)";
}

// Finding 2b. The same through a real mbmq Listener of ours: its name is any bytes but NUL (the
// library accepts "\xff"); `mbmq ls --json` lists it and aborts.
TEST(Review18, LsJsonSurvivesAListenerNameThatIsNotUtf8) {
  if (!kHaveTool) GTEST_SKIP() << "no mbmq command in this build";
  const std::string name = unique_name("ls") + "\xff";
  auto l = Listener::create(name);
  ASSERT_TRUE(l) << l.error().message();
  const int code = run_tool({"ls", "--json"});
  EXPECT_EQ(code, 0) << "mbmq ls --json exited with " << code << " (-1: killed by a signal)";
}

// Finding 2c. `mbmq stat` (text) prints the reply's strings as they came: a listener (any local
// user can bind an abstract mbmq: name) writes terminal escapes (retitle, clear, OSC 52 clipboard
// writes on some terminals) to the terminal of whoever looks at it. They must not reach stdout.
TEST(Review18, StatTextDoesNotPassTerminalEscapes) {
  if (!kHaveTool) GTEST_SKIP() << "no mbmq command in this build";
  const std::string name = unique_name("esc");
  FakeListener fake(
      name,
      [](const detail::StatQuery& q) {
        ListenerStat h = good_head();
        std::strcpy(h.name, "x\x1b]0;owned\x07\x1b[2J");
        std::strcpy(h.policy, "\x1b[31m");
        std::strcpy(h.last_why, "\x1b[8m");
        h.protocol = 1;
        h.total_channels = 1;
        h.first_channel = q.first_channel;
        h.channels = q.first_channel == 0 ? 1 : 0;
        return reply_of(h, h.channels, "\x1b]52;c;cm0gLXJmIH4K\x07");
      },
      4);
  std::string text;
  const int code = run_tool({"stat", name}, &text);
  EXPECT_EQ(code, 0);
  EXPECT_EQ(text.find('\x1b'), std::string::npos) << text;
  EXPECT_EQ(text.find('\x07'), std::string::npos) << text;
}

// Finding 3. An end's counters are added to the listener's totals when it is closed
// (close_local -> retire_locked), but the registry still lists the end while its object lives
// (Channel::close() keeps it allocated, as do Buffers taken from it), and answer_query() adds the
// live ends' counters to the totals again: every message is counted twice.
TEST(Review18, ClosedButStillHeldServerEndIsCountedOnce) {
  const std::string name = unique_name("twice");
  auto l = Listener::create(name);
  ASSERT_TRUE(l) << l.error().message();
  auto client = connect(name, Deadline::after(5s));
  ASSERT_TRUE(client) << client.error().message();
  auto server = l->accept(Deadline::after(5s));
  ASSERT_TRUE(server) << server.error().message();
  constexpr int kN = 10;
  for (int i = 0; i < kN; ++i) {
    auto b = client->buffer(8);
    ASSERT_TRUE(b);
    ASSERT_TRUE(client->send(std::move(*b)));
  }
  for (int i = 0; i < kN; ++i) {
    auto m = server->receive(Deadline::after(5s));
    ASSERT_TRUE(m) << m.error().message();
  }
  server->close();  // closed, not yet destroyed
  auto s = query_stats(name, StatChannels::Yes, Deadline::after(5s));
  ASSERT_TRUE(s) << s.error().message();
  EXPECT_EQ(s->listener.oneway_in, std::uint64_t{kN});
  EXPECT_EQ(s->listener.bytes_in, std::uint64_t{kN} * 8);
}

// Finding 4 (suspected). More live channels than one reply holds (kStatChannelsPerReply, 256): the
// reply of a full page (66 KB) must fit the socket, and the pages must cover every channel once.
TEST(Review18, StatPagesThroughMoreChannelsThanOneReplyHolds) {
  const std::string name = unique_name("pages");
  auto l = Listener::create(name);
  ASSERT_TRUE(l) << l.error().message();
  constexpr std::size_t kN = 300;
  std::vector<Channel> clients;
  for (std::size_t i = 0; i < kN; ++i) {
    auto c = connect(name, Deadline::after(5s));
    ASSERT_TRUE(c) << i << ": " << c.error().message();
    clients.push_back(std::move(*c));
  }
  auto s = query_stats(name, StatChannels::Yes, Deadline::after(5s));
  ASSERT_TRUE(s) << s.error().message();
  EXPECT_EQ(s->listener.total_channels, kN);
  std::vector<std::uint64_t> ids;
  for (const ChannelStat& c : s->channels) ids.push_back(c.id);
  std::sort(ids.begin(), ids.end());
  EXPECT_EQ(std::unique(ids.begin(), ids.end()) - ids.begin(), static_cast<std::ptrdiff_t>(kN));
  EXPECT_EQ(s->channels.size(), kN);
  EXPECT_EQ(s->listener.queries_dropped, 0u);
}

// Finding 5. `mbmq ls` asks every mbmq: name in turn, each with 200 ms to answer: sockets that
// listen and never answer (anyone can bind one) stall it 200 ms each. 8 of them must not make
// it take 1.6 s.
TEST(Review18, LsIsNotStalledBySilentListeners) {
  if (!kHaveTool) GTEST_SKIP() << "no mbmq command in this build";
  std::vector<os::UniqueFd> silent;
  for (int i = 0; i < 8; ++i) {
    auto fd = os::listen_abstract(detail::socket_name(unique_name("silent")), 16);
    ASSERT_TRUE(fd) << fd.error().message();
    silent.push_back(std::move(*fd));
  }
  const std::int64_t t0 = monotonic_ns();
  EXPECT_EQ(run_tool({"ls"}), 0);
  EXPECT_LT((monotonic_ns() - t0) / 1'000'000, 1000) << "mbmq ls waited on each silent listener";
}

// Finding 6 (suspected data race, for TSan). The watcher reads an end's counters and gauges while
// its owner's threads send and receive: every read is atomic or under mu_; after the traffic
// stops, the numbers are exact.
TEST(Review18, QueriesDuringTrafficAreRaceFreeAndExactAfter) {
  const std::string name = unique_name("traffic");
  auto l = Listener::create(name);
  ASSERT_TRUE(l) << l.error().message();
  auto client = connect(name, Deadline::after(5s));
  ASSERT_TRUE(client) << client.error().message();
  auto server = l->accept(Deadline::after(5s));
  ASSERT_TRUE(server) << server.error().message();
  constexpr int kN = 3000;
  std::thread rx([&] {
    for (int i = 0; i < kN; ++i) {
      auto m = server->receive(Deadline::after(10s));
      ASSERT_TRUE(m) << m.error().message();
    }
  });
  std::thread tx([&] {
    for (int i = 0; i < kN; ++i) {
      auto b = client->buffer(16, Deadline::after(10s));
      ASSERT_TRUE(b) << b.error().message();
      ASSERT_TRUE(client->send(std::move(*b)));
    }
  });
  for (int q = 0; q < 20; ++q) {
    auto s = query_stats(name, StatChannels::Yes, Deadline::after(5s));
    ASSERT_TRUE(s) << s.error().message();
    EXPECT_LE(s->listener.oneway_in, std::uint64_t{kN});
  }
  tx.join();
  rx.join();
  auto s = query_stats(name, StatChannels::Yes, Deadline::after(5s));
  ASSERT_TRUE(s) << s.error().message();
  EXPECT_EQ(s->listener.oneway_in, std::uint64_t{kN});
  EXPECT_EQ(s->listener.bytes_in, std::uint64_t{kN} * 16);
  ASSERT_EQ(s->channels.size(), 1u);
  EXPECT_EQ(s->channels[0].oneway_in, std::uint64_t{kN});
}

// ---- Topics: publish()/buffer()/serve() wait without the publisher's lock (1413d66) ----------

std::uint8_t first_byte(const Sample& s) { return std::to_integer<std::uint8_t>(s.data()[0]); }

Buffer filled(Publisher& pub, std::uint8_t v) {
  auto b = pub.buffer(8, test::secs(2));
  EXPECT_TRUE(b) << b.error().message();
  if (!b) return Buffer{};
  b->data()[0] = std::byte{v};
  return std::move(*b);
}

// Finding T1 (suspected lost wake-up). Two threads wait for room at once (room_waiters_ 2). The
// subscriber's release kicks once; the flag must stay up for the second waiter, whichever thread
// took the kick, and both samples arrive, each once.
TEST(Review18, TwoPublishersWaitingForRoomBothGetThrough) {
  const std::string name = test::topic_name("r18-", "two-waiters");
  TopicOptions o;
  o.samples = 8;
  o.sample_size = 64;
  o.keep = 1;
  o.policy = SlowSubscriber::Block;
  auto pub = Publisher::create(name, o);
  ASSERT_TRUE(pub) << pub.error().message();
  Result<Subscriber> sub = test::join_one(*pub, name);
  ASSERT_TRUE(sub) << sub.error().message();
  ASSERT_TRUE(pub->publish(filled(*pub, 1), test::secs(2)));  // full now (keep 1)
  Buffer b2 = filled(*pub, 2), b3 = filled(*pub, 3);
  std::optional<Status> r2, r3;
  std::thread t2([&] { r2 = pub->publish(std::move(b2), test::secs(10)); });
  std::thread t3([&] { r3 = pub->publish(std::move(b3), test::secs(10)); });
  std::this_thread::sleep_for(50ms);
  std::vector<int> got;
  const std::int64_t t0 = monotonic_ns();
  for (int i = 0; i < 3; ++i) {
    Result<Sample> s = sub->receive(test::secs(5));
    ASSERT_TRUE(s) << s.error().message();
    got.push_back(first_byte(*s));
  }  // each released at once: the next waiter gets the room
  t2.join();
  t3.join();
  EXPECT_LT((monotonic_ns() - t0) / 1'000'000, 2000);
  ASSERT_TRUE(r2 && r3);
  EXPECT_TRUE(*r2) << r2->error().message();
  EXPECT_TRUE(*r3) << r3->error().message();
  std::sort(got.begin(), got.end());
  EXPECT_EQ(got, (std::vector<int>{1, 2, 3}));
  const TopicStats st = pub->stats();
  EXPECT_EQ(st.published, 3u);
  EXPECT_EQ(st.deliveries, 3u);
}

// Finding T2 (suspected stale state after re-locking). A subscriber joins while a publish() waits
// for room without the lock: once room comes, the sample goes to the newcomer too (skip_ and
// live_end_ taken after the wait), and the first subscriber gets it once.
TEST(Review18, SubscriberJoiningWhilePublishWaitsGetsTheSample) {
  const std::string name = test::topic_name("r18-", "join-while-waiting");
  TopicOptions o;
  o.samples = 8;
  o.sample_size = 64;
  o.keep = 1;
  o.policy = SlowSubscriber::Block;
  auto pub = Publisher::create(name, o);
  ASSERT_TRUE(pub) << pub.error().message();
  Result<Subscriber> sub1 = test::join_one(*pub, name);
  ASSERT_TRUE(sub1) << sub1.error().message();
  ASSERT_TRUE(pub->publish(filled(*pub, 1), test::secs(2)));  // sub1 full
  Buffer b2 = filled(*pub, 2);
  std::optional<Status> r2;
  // jthread: ends by its deadline, also after a failed ASSERT (else terminate, the finding lost)
  std::jthread t([&] { r2 = pub->publish(std::move(b2), test::secs(10)); });
  // The waiting publish() takes the join (serve() is not called by anyone else).
  Result<Subscriber> sub2 = test::connect_retry(name);
  ASSERT_TRUE(sub2) << sub2.error().message();
  for (Deadline d = test::secs(5); pub->subscribers() < 2 && !d.expired();)
    std::this_thread::sleep_for(1ms);
  ASSERT_EQ(pub->subscribers(), 2u);
  {
    Result<Sample> s = sub1->receive(test::secs(5));
    ASSERT_TRUE(s);
    EXPECT_EQ(first_byte(*s), 1);
  }
  t.join();
  ASSERT_TRUE(r2);
  ASSERT_TRUE(*r2) << r2->error().message();
  Result<Sample> a = sub1->receive(test::secs(5));
  ASSERT_TRUE(a) << a.error().message();
  EXPECT_EQ(first_byte(*a), 2);
  Result<Sample> b = sub2->receive(test::secs(5));
  ASSERT_TRUE(b) << b.error().message();
  EXPECT_EQ(first_byte(*b), 2);
}

}  // namespace
}  // namespace mbmq
