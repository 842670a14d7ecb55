// tests/net/net_pair.h: what the mbmq::net tests share (beside net_util.h's Pipe): a listener's
// URL; a listener and a client of it in this process; a bridge and a remote client of it; buffers
// of a size; raw UCX ends that send what mbmq::net never would; a helper test run as a program of
// its own; the heap's size; a thread serving a MsgQueue. Including it loads nothing: UCX is loaded
// at the first use of net.
#pragma once

#include <arpa/inet.h>
#include <errno.h>  // program_invocation_short_name
#include <gtest/gtest.h>
#include <malloc.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/wait.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "mbmq/mbmq.h"
#include "mbmq/net.h"
#include "mbmq/net_bridge.h"
#include "net/core.h"
#include "os/process.h"
#include "test_util.h"

namespace mbmq::test {

inline std::string url(std::uint32_t port, const char* service = "svc") {
  return "ucx://127.0.0.1:" + std::to_string(port) + "/" + service;
}

// A listener and one client of it, connected in this process (connect() on a thread while the
// listener accepts: each side's worker is progressed by its own caller).
struct Pair {
  net::Listener l;
  net::Channel server, client;
};

inline std::optional<Pair> make_pair(const net::ListenOptions& lo = {},
                                     const net::ConnectOptions& co = {}) {
  auto l = net::listen("ucx://127.0.0.1:0/svc", lo);
  EXPECT_TRUE(l) << l.error().message();
  if (!l) return std::nullopt;
  std::optional<Result<net::Channel>> c;
  std::thread t([&] { c.emplace(net::connect(url(l->port()), secs(10), co)); });
  auto s = l->accept(secs(10));
  t.join();
  EXPECT_TRUE(s) << s.error().message();
  EXPECT_TRUE(*c) << (*c).error().message();
  if (!s || !*c) return std::nullopt;
  return Pair{std::move(*l), std::move(*s), std::move(**c)};
}

// The same with no keeper serving either end (both peer_timeouts 0, whatever lo and co say): a
// listener's peer_timeout 0 alone is not enough, as the client's own, sent in its hello, has the
// server's keeper progress the server's worker (K1). Nothing progresses either worker then but
// the test's own threads (and a lingering close, K5).
inline std::optional<Pair> make_pair_without_keepers(net::ListenOptions lo = {},
                                                     net::ConnectOptions co = {}) {
  lo.peer_timeout = std::chrono::milliseconds(0);
  co.peer_timeout = std::chrono::milliseconds(0);
  return make_pair(lo, co);
}

// A listener's accepted channel and its client, connected here (connect() on a thread while the
// listener accepts); both empty, and a test failure, if either failed.
struct Remote {
  net::Channel server, client;
};
inline Remote connect_one(net::Listener& l, const net::ConnectOptions& co = {}) {
  std::optional<Result<net::Channel>> c;
  std::thread t([&] { c.emplace(net::connect(url(l.port()), secs(10), co)); });
  auto s = l.accept(secs(10));
  t.join();
  EXPECT_TRUE(s) << s.error().message();
  EXPECT_TRUE(*c) << (*c).error().message();
  if (!s || !*c) return {};
  return Remote{std::move(*s), std::move(**c)};
}

// A net::Listener and an mbmq::Channel connected to it with mbmq::connect, the server's end as
// an mbmq::Channel too (net::as_channel of accept()).
struct RemotePair {
  net::Listener l;
  Channel server, client;
};

inline std::optional<RemotePair> remote_pair(const net::ListenOptions& lo = {}) {
  auto l = net::listen("ucx://127.0.0.1:0/svc", lo);
  EXPECT_TRUE(l) << l.error().message();
  if (!l) return std::nullopt;
  std::optional<Result<Channel>> c;
  std::thread t([&] { c.emplace(mbmq::connect(url(l->port()), secs(10))); });
  auto s = l->accept(secs(10));
  t.join();
  EXPECT_TRUE(s) << s.error().message();
  EXPECT_TRUE(*c) << (*c).error().message();
  if (!s || !*c) return std::nullopt;
  auto server = net::as_channel(std::move(*s));
  EXPECT_TRUE(server) << server.error().message();
  if (!server) return std::nullopt;
  return RemotePair{std::move(*l), std::move(*server), std::move(**c)};
}

// A remote call of `size` bytes of `c` (answered by test::QueueServer or the like): true if it
// came back within `d` with each byte + 1 (a failed call is also a test failure).
inline bool remote_call(net::Channel& ch, std::size_t size, char c, Deadline d = secs(10)) {
  auto b = ch.buffer(size);
  if (!b) return false;
  if (size != 0) std::memset(b->data().data(), c, size);  // (no vector at 0 bytes)
  Status s = ch.call(*b, d);
  if (!s) {
    ADD_FAILURE() << "call: " << s.error().message();
    return false;
  }
  if (b->size() != size) return false;
  for (std::byte x : b->data())
    if (x != static_cast<std::byte>(c + 1)) return false;
  return true;
}

// Threads of this process now.
inline int task_count() { return static_cast<int>(os::dir_listing("/proc/self/task").size()); }

// A listener with `n` accepted channels (all on the listener's one worker) and their clients.
struct Many {
  net::Listener l;
  std::vector<net::Channel> server, client;
};

inline std::optional<Many> make_many(int n, const net::ListenOptions& lo,
                                     const net::ConnectOptions& co) {
  auto l = net::listen("ucx://127.0.0.1:0/svc", lo);
  EXPECT_TRUE(l) << l.error().message();
  if (!l) return std::nullopt;
  Many m{std::move(*l), {}, {}};
  for (int i = 0; i < n; ++i) {
    std::optional<Result<net::Channel>> c;
    std::atomic<bool> connected{false};
    std::thread t([&] {
      c.emplace(net::connect(url(m.l.port()), secs(10), co));
      connected.store(true);
    });
    auto s = m.l.accept(secs(10));
    // With peer_timeout 0 no keeper progresses the listener's worker: accept() returns with the
    // HelloAck maybe not yet out, so progress it (a short receive) until the client has it.
    while (s && !connected.load()) (void)s->receive(Deadline::after(std::chrono::milliseconds(2)));
    t.join();
    EXPECT_TRUE(s) << s.error().message();
    EXPECT_TRUE(*c) << (*c).error().message();
    if (!s || !*c) return std::nullopt;
    m.server.push_back(std::move(*s));
    m.client.push_back(std::move(**c));
  }
  return m;
}

// A bridge on a listener of 127.0.0.1 (any free port) serving `service`.
inline Result<net::Bridge> make_bridge(const net::BridgeOptions& opt = {},
                                       const char* service = "svc") {
  auto l = net::listen(url(0, service));
  if (!l) return fail(l.error());
  return net::Bridge::create(std::move(*l), opt);
}

// A remote client connected to the bridge, and the server's end of it. connect() runs on a
// thread while this one is in accept(): the listener answers hellos as accept() progresses it.
struct Connected {
  Result<net::Channel> remote = fail(Errc::TimedOut, "connect: not run");
  Result<Channel> end = fail(Errc::TimedOut, "accept: not run");
};
inline Connected connect_and_accept(net::Bridge& bridge, const char* service = "svc") {
  Connected c;
  const std::string u = url(bridge.port(), service);
  std::thread t([&] { c.remote = net::connect(u, secs(10)); });
  c.end = bridge.accept(secs(10));
  t.join();
  return c;
}

// A buffer of `size` bytes of ch (empty, and a test failure, if there is none).
inline net::Buffer sized(net::Channel& ch, std::size_t size) {
  auto b = ch.buffer(size);
  EXPECT_TRUE(b) << b.error().message();
  return b ? std::move(*b) : net::Buffer{};
}
// A buffer of `size` bytes of ch whose first 4 hold `i` (empty, and a test failure, if there is
// none), and the number a buffer holds.
inline net::Buffer numbered(net::Channel& ch, std::size_t size, std::uint32_t i) {
  auto b = ch.buffer(size);
  EXPECT_TRUE(b) << b.error().message();
  if (!b) return {};
  std::memcpy(b->data().data(), &i, sizeof i);
  return std::move(*b);
}
inline std::uint32_t number_of(const net::Buffer& b) {
  std::uint32_t i = 0;
  if (b.size() >= sizeof i) std::memcpy(&i, b.data().data(), sizeof i);
  return i;
}

// The same, every byte `c`.
inline net::Buffer filled(net::Channel& ch, std::size_t size, char c = 'x') {
  net::Buffer b = sized(ch, size);
  if (b.size() != 0) std::memset(b.data().data(), c, b.size());  // data() of an empty one: null
  return b;
}

// Runs this test binary again, as a program of its own (not a fork: UCX, once loaded, cannot be
// used in a forked child), to run only the helper test `test` ("Suite.DISABLED_Name"), with `env`
// ("NAME=value" entries) added to its environment.
inline Result<pid_t> spawn_helper(const std::string& test, const std::vector<std::string>& env) {
  const std::vector<std::string> args = {
      program_invocation_short_name, "--gtest_also_run_disabled_tests", "--gtest_filter=" + test};
  return os::spawn_program("/proc/self/exe", args, -1, -1, -1, env);
}

// Waits for a helper `pid` up to `limit`: its raw wait status, or -1 (then it is killed and
// reaped: a hang).
inline int wait_for_exit(pid_t pid, std::chrono::milliseconds limit) {
  int st = 0;
  for (const Deadline d = Deadline::after(limit); !d.expired(); os::sleep_ns(5'000'000))
    if (::waitpid(pid, &st, WNOHANG) == pid) return st;
  ::kill(pid, SIGKILL);
  (void)::waitpid(pid, &st, 0);
  return -1;
}

// Bytes the C heap holds now (arena + mmapped chunks).
inline std::int64_t heap_bytes() {
  const struct mallinfo2 mi = ::mallinfo2();
  return static_cast<std::int64_t>(mi.uordblks + mi.hblkhd);
}

// A server loop on a thread of its own, serving `q` until destroyed (a wait of 20 ms at a time):
// every request's bytes + 1 back, in the buffer it came in; one-way messages' first 4 bytes
// recorded per key, in order; each key's first PeerClosed kept, every one counted, with how many
// one-way messages of that key came before the first. Keys from `remote_from` on are remote
// channels': a message of theirs (but a PeerClosed, or 0 bytes: no vector) not over the vector
// UCX received into is counted (not_foreign: not a remote message at all; copied: over a copy).
class QueueServer {
 public:
  explicit QueueServer(MsgQueue& q, std::uint64_t remote_from = 100)
      : q_(q), remote_from_(remote_from), t_([this] { run(); }) {}
  ~QueueServer() {
    stop_.store(true);
    t_.join();
  }
  QueueServer(const QueueServer&) = delete;
  QueueServer& operator=(const QueueServer&) = delete;

  std::mutex mu;                                               // guards the maps
  std::map<std::uint64_t, std::vector<std::uint32_t>> oneway;  // per key, the numbers in order
  std::map<std::uint64_t, Message> ends;                       // per key, its first PeerClosed
  std::map<std::uint64_t, int> end_counts;                     // per key, its PeerCloseds
  std::map<std::uint64_t, std::size_t> oneway_before_end;      // per key, one-way ones before it
  std::atomic<int> requests{0}, copied{0}, not_foreign{0};

  // Whether `key`'s end came within `limit` (polled every millisecond).
  bool wait_end(std::uint64_t key, std::chrono::seconds limit) {
    for (const Deadline d = Deadline::after(limit); !d.expired(); os::sleep_ns(1'000'000)) {
      std::lock_guard lock(mu);
      if (ends.count(key) != 0) return true;
    }
    return false;
  }
  std::size_t oneway_count(std::uint64_t key) {
    std::lock_guard lock(mu);
    return oneway[key].size();
  }
  int end_count(std::uint64_t key) {
    std::lock_guard lock(mu);
    return end_counts[key];
  }

 private:
  void run() {
    while (!stop_.load()) {
      auto m = q_.wait(Deadline::after(std::chrono::milliseconds(20)));
      if (!m) continue;
      if (m->key >= remote_from_) {  // a remote channel's: over the vector UCX received into
        const std::byte* v = net::detail::queued_vector(m->buffer);
        if (m->kind != Kind::PeerClosed && m->buffer.size() != 0) {  // (0 bytes: no vector)
          if (v == nullptr) ++not_foreign;
          if (v != nullptr && v != m->buffer.data().data()) ++copied;
        }
      }
      if (m->kind == Kind::Request) {
        ++requests;
        for (std::byte& b : m->buffer.data())
          b = static_cast<std::byte>(std::to_integer<int>(b) + 1);
        (void)MsgQueue::reply(std::move(*m));
      } else if (m->kind == Kind::Message) {
        std::uint32_t n = 0;
        if (m->buffer.size() >= 4) std::memcpy(&n, m->buffer.data().data(), 4);
        std::lock_guard lock(mu);
        oneway[m->key].push_back(n);
      } else if (m->kind == Kind::PeerClosed) {
        std::lock_guard lock(mu);
        if (end_counts[m->key]++ == 0) oneway_before_end[m->key] = oneway[m->key].size();
        ends.emplace(m->key, std::move(*m));  // (a later one: dropped)
      }
    }
  }
  MsgQueue& q_;
  const std::uint64_t remote_from_;
  std::atomic<bool> stop_{false};
  std::thread t_;
};

// One end speaking raw UCX, on a worker of its own (of this process's context), to send what
// mbmq::net never would: what RawClient and a test's raw server share.
struct RawEnd {
  const net::detail::Ucx* u = nullptr;
  std::shared_ptr<net::detail::WorkerCore> w;
  ucp_ep_h ep = nullptr;

  // Loads UCX (u) and makes the worker (w); false if either fails.
  bool make_worker() {
    auto x = net::detail::ucx();
    if (!x) return false;
    u = *x;
    auto wk = net::detail::WorkerCore::make(u);
    if (!wk) return false;
    w = *wk;
    return true;
  }
  // Starts an AM send on ep; returns the request (nullptr: done at once).
  void* send(const net::detail::WireHeader& h, const void* data, std::size_t n,
             std::uint32_t flags = 0) {
    os::LockGuard lock(w->mu);
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    p.flags = UCP_AM_SEND_FLAG_REPLY | flags;
    ucs_status_ptr_t r = u->ucp_am_send_nbx(ep, net::detail::kAmId, &h, sizeof h, data, n, &p);
    return UCS_PTR_IS_PTR(r) ? r : nullptr;
  }
  // Progresses the worker for `d`, sleeping `pause_ns` between rounds.
  void progress_for(std::chrono::milliseconds d, std::int64_t pause_ns = 200'000) {
    const std::int64_t until = monotonic_ns() + std::chrono::nanoseconds(d).count();
    while (monotonic_ns() < until) {
      {
        os::LockGuard lock(w->mu);
        (void)u->ucp_worker_progress(w->worker);
      }
      os::sleep_ns(pause_ns);
    }
  }
  // Waits (progressing) for request r, then frees it.
  void finish(void* r) {
    if (r == nullptr) return;
    const std::int64_t until = monotonic_ns() + 3'000'000'000;
    for (;;) {
      os::LockGuard lock(w->mu);
      if (u->ucp_request_check_status(r) != UCS_INPROGRESS || monotonic_ns() > until) break;
      (void)u->ucp_worker_progress(w->worker);
    }
    os::LockGuard lock(w->mu);
    u->ucp_request_free(r);
  }

 protected:
  // Closes ep at once (no flush). Caller holds w->mu; ep is not null.
  void close_ep_locked() {
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    p.flags = UCP_EP_CLOSE_FLAG_FORCE;
    ucs_status_ptr_t r = u->ucp_ep_close_nbx(ep, &p);
    if (UCS_PTR_IS_PTR(r)) u->ucp_request_free(r);
  }
};

// A client speaking raw UCX (its own worker of this process's context).
struct RawClient : RawEnd {
  std::atomic<bool> failed{false};
  net::detail::WireHeader hello_header{};  // hello()'s, kept for its send
  std::vector<std::byte> hello_data;

  bool connect(std::uint32_t port) {
    if (!make_worker()) return false;
    sockaddr_in sa{};
    sa.sin_family = AF_INET;
    sa.sin_port = htons(static_cast<std::uint16_t>(port));
    (void)inet_pton(AF_INET, "127.0.0.1", &sa.sin_addr);
    os::LockGuard lock(w->mu);
    ucp_ep_params_t p{};
    p.field_mask = UCP_EP_PARAM_FIELD_FLAGS | UCP_EP_PARAM_FIELD_SOCK_ADDR |
                   UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE | UCP_EP_PARAM_FIELD_ERR_HANDLER;
    p.flags = UCP_EP_PARAMS_FLAGS_CLIENT_SERVER;
    p.sockaddr.addr = reinterpret_cast<const sockaddr*>(&sa);
    p.sockaddr.addrlen = sizeof sa;
    p.err_mode = UCP_ERR_HANDLING_MODE_PEER;
    p.err_handler.cb = [](void* arg, ucp_ep_h, ucs_status_t) {
      static_cast<RawClient*>(arg)->failed = true;
    };
    p.err_handler.arg = this;
    return u->ucp_ep_create(w->worker, &p, &ep) == UCS_OK;
  }
  // Sends a hello (this version, service "svc") granting the server `g`, and waits (progressing)
  // up to 3 s for it to go. It may not have gone by then (the endpoint is wired up only as the
  // listener's worker is progressed): the header and payload live on in hello_header and
  // hello_data, for the send still pending.
  void hello(net::detail::Grant g) {
    namespace d = net::detail;
    hello_data = d::hello_payload(g, "svc");
    hello_header = d::WireHeader{.magic = d::kMagic,
                                 .version = d::kVersion,
                                 .kind = static_cast<std::uint8_t>(d::WireKind::Hello),
                                 .status = 0,
                                 .seq = 0,
                                 .limit = 1u << 20};
    finish(send(hello_header, hello_data.data(), hello_data.size()));
  }
  ~RawClient() {
    if (ep == nullptr) return;
    os::LockGuard lock(w->mu);
    close_ep_locked();
  }
};

// A server speaking raw UCX (its own worker of this process's context), of one client (a second
// connection is rejected): records the AMs it gets (header only; a payload is never fetched),
// answers what the test says. Its worker is progressed only by its own calls (start() and its
// waits, progress_for(), RawEnd's send() and finish()): between them it is silent, its TCP
// connection up (a frozen peer, to the client).
struct RawServer : RawEnd {
  ucp_listener_h lis = nullptr;
  std::uint16_t port = 0;
  std::vector<net::detail::WireHeader> got;  // under w->mu

  // Listens on 127.0.0.1 (any free port: `port`). `on_am` (its arg this RawServer), if given,
  // handles the AMs instead of recording them.
  bool start(ucp_am_recv_callback_t on_am = nullptr) {
    if (!make_worker()) return false;
    os::LockGuard lock(w->mu);
    ucp_am_handler_param_t hp{};
    hp.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB |
                    UCP_AM_HANDLER_PARAM_FIELD_ARG | UCP_AM_HANDLER_PARAM_FIELD_FLAGS;
    hp.id = net::detail::kAmId;
    hp.cb = on_am != nullptr ? on_am : record;
    hp.arg = this;
    hp.flags = UCP_AM_FLAG_WHOLE_MSG;
    if (u->ucp_worker_set_am_recv_handler(w->worker, &hp) != UCS_OK) return false;
    sockaddr_in sa{};
    sa.sin_family = AF_INET;
    (void)inet_pton(AF_INET, "127.0.0.1", &sa.sin_addr);
    ucp_listener_params_t p{};
    p.field_mask = UCP_LISTENER_PARAM_FIELD_SOCK_ADDR | UCP_LISTENER_PARAM_FIELD_CONN_HANDLER;
    p.sockaddr.addr = reinterpret_cast<const sockaddr*>(&sa);
    p.sockaddr.addrlen = sizeof sa;
    p.conn_handler.cb = [](ucp_conn_request_h req, void* arg) {
      auto* self = static_cast<RawServer*>(arg);
      if (self->ep != nullptr) return (void)self->u->ucp_listener_reject(self->lis, req);
      ucp_ep_params_t ep_params{};
      ep_params.field_mask = UCP_EP_PARAM_FIELD_CONN_REQUEST |
                             UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE | UCP_EP_PARAM_FIELD_ERR_HANDLER;
      ep_params.conn_request = req;
      ep_params.err_mode = UCP_ERR_HANDLING_MODE_PEER;
      ep_params.err_handler.cb = [](void*, ucp_ep_h, ucs_status_t) {};  // the client closing
      (void)self->u->ucp_ep_create(self->w->worker, &ep_params, &self->ep);
    };
    p.conn_handler.arg = this;
    if (u->ucp_listener_create(w->worker, &p, &lis) != UCS_OK) return false;
    ucp_listener_attr_t a{};
    a.field_mask = UCP_LISTENER_ATTR_FIELD_SOCKADDR;
    if (u->ucp_listener_query(lis, &a) != UCS_OK) return false;
    sockaddr_in bound{};
    std::memcpy(&bound, &a.sockaddr, sizeof bound);
    port = ntohs(bound.sin_port);
    return true;
  }
  void progress_for(std::chrono::milliseconds d) { RawEnd::progress_for(d, 100'000); }
  // What it received so far (headers), without progressing its worker.
  std::vector<net::detail::WireHeader> received() {
    os::LockGuard lock(w->mu);
    return got;
  }
  // The first header of `kind` received, waiting (progressing) up to 5 s.
  std::optional<net::detail::WireHeader> wait_for(net::detail::WireKind kind) {
    for (Deadline d = secs(5); !d.expired();) {
      {
        os::LockGuard lock(w->mu);
        (void)u->ucp_worker_progress(w->worker);
        for (const net::detail::WireHeader& h : got)
          if (h.kind == static_cast<std::uint8_t>(kind)) return h;
      }
      os::sleep_ns(100'000);
    }
    return std::nullopt;
  }
  // An mbmq::net client of this raw server: its hello answered with HelloAck (grant {1000,
  // 4 GiB - 1}, limit 64 MiB, seq 0: no peer_timeout), progressing until connect() returns.
  Result<net::Channel> connect_client(const net::ConnectOptions& co) {
    namespace d = net::detail;
    std::optional<Result<net::Channel>> c;
    std::atomic<bool> done{false};
    std::thread t([&] {
      c.emplace(net::connect(url(port), secs(5), co));
      done.store(true);
    });
    void* r = nullptr;
    // Both read by UCX until finish(r): alive until then.
    const d::Grant g{1000, 0xffffffffu};
    const d::WireHeader ack{
        d::kMagic, d::kVersion, static_cast<std::uint8_t>(d::WireKind::HelloAck), 0, 0, 64u << 20};
    if (wait_for(d::WireKind::Hello)) {
      r = send(ack, &g, sizeof g);
      for (Deadline until = secs(5); !until.expired() && !done.load();)
        progress_for(std::chrono::milliseconds(1));
    }
    t.join();
    finish(r);
    return std::move(*c);
  }
  ~RawServer() {
    if (w == nullptr) return;
    os::LockGuard lock(w->mu);
    if (ep != nullptr) close_ep_locked();
    if (lis != nullptr) u->ucp_listener_destroy(lis);
  }

 private:
  // The default AM handler: records the header.
  static ucs_status_t record(void* arg, const void* header, std::size_t hl, void*, std::size_t,
                             const ucp_am_recv_param_t*) {
    net::detail::WireHeader h{};
    if (hl == sizeof h) {
      std::memcpy(&h, header, sizeof h);
      static_cast<RawServer*>(arg)->got.push_back(h);
    }
    return UCS_OK;
  }
};

}  // namespace mbmq::test
