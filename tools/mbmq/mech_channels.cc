// tools/mbmq/mech_channels.cc: `mbmq bench --channels N,...`: one server holding N channels, one
// of them active and N-1 idle (issue #13: how the receiving side's cost grows with idle channels).
//   mbmq-spin / mbmq-adaptive / mbmq-sleep   N Channel pairs; the server adopts its N ends into one
//              MsgQueue with that WaitPolicy (both sides), the client holds the N client ends and
//              calls on one of them
//   mbmq-fd    mbmq-sleep with the server in an event loop: epoll_wait on MsgQueue::fd(), then
//              wait(immediate) / reply_and_wait(immediate) until TimedOut
//   uds-epoll  N Unix stream socket pairs; the server waits on all N in one epoll set and answers
//              the active one (the framing of `uds`); the client does write() + read() on its end
// Everything is made in setup() (before the fork), adopted or registered by the server, and only
// then does the server say it is ready: none of that is in the measurement.
#include <cstring>
#include <memory>
#include <vector>

#include "bench.h"
#include "mbmq/mbmq.h"
#include "os/epoll.h"
#include "os/process.h"
#include "os/unix_socket.h"

namespace mbmq::tool {
namespace {

// The active channel. The queue scans round-robin from the channel after the last one that had
// a message, so which one is active does not matter: every wait passes the N-1 idle ones.
constexpr std::size_t kActive = 0;

// The server's "all N adopted, serving": one byte on a pipe, read by the client after the fork.
struct Ready {
  os::UniqueFd r, w;
  Status make() {
    auto [rd, wr] = MBMQ_TRY(os::make_pipe());
    r = std::move(rd);
    w = std::move(wr);
    return {};
  }
  bool signal() {  // server
    r.reset();
    std::byte b{1};
    return static_cast<bool>(os::write_full(w.get(), {&b, 1}));
  }
  Status wait() {  // client: EOF if the server failed before it was ready
    w.reset();
    std::byte b{};
    auto got = MBMQ_TRY(os::read_full(r.get(), {&b, 1}));
    r.reset();
    if (got != 1) return fail(Errc::PeerClosed, "channels: the server failed during its setup");
    return {};
  }
};

// `how`: the server in wait() (Block) or in epoll_wait on the queue's fd (Epoll).
Mechanism mbmq_channels(const char* name, WaitMode mode, QueueWait how, std::size_t n) {
  struct State {
    std::vector<Channel> client, server;
    Ready ready;
    Buffer buf;
    std::size_t size = 0;
  };
  auto st = std::make_shared<State>();
  Mechanism m;
  m.name = name;
  m.copies_by_design = "0: the payload is written once, in a buffer the server reads in place";
  m.setup = [st, mode, n](std::size_t size) -> Status {
    ChannelOptions opt;
    opt.wait.mode = mode;
    st->client.reserve(n);
    st->server.reserve(n);
    for (std::size_t i = 0; i < n; ++i) {
      auto p = Channel::pair(opt);
      if (!p) {  // run_cell() does not tear down after a failed setup: let go of them here
        st->client.clear();
        st->server.clear();
        return fail(p.error());
      }
      st->client.push_back(std::move(p->first));
      st->server.push_back(std::move(p->second));
    }
    st->size = size;
    return st->ready.make();
  };
  m.serve = [st, mode, how](std::size_t, ServerCounter& count) -> int {
    for (auto& c : st->client) c.close();
    WaitPolicy policy;
    policy.mode = mode;
    auto q = MsgQueue::create(policy);
    if (!q) return 1;
    for (std::size_t i = 0; i < st->server.size(); ++i)
      if (!q->adopt(std::move(st->server[i]), i)) return 1;
    if (q->channel_count() != st->server.size() || !st->ready.signal()) return 1;
    // An idle channel says nothing, not even PeerClosed (the client keeps them all open): a
    // message with another key fails the cell.
    return serve_queue(*q, how, kActive, count);
  };
  m.after_fork_parent = [st]() -> Status {
    for (auto& s : st->server) s.close();
    return st->ready.wait();
  };
  m.client_rtt = [st](std::uint64_t iter) -> bool {
    Channel& ch = st->client[kActive];
    if (!st->buf.valid()) {
      auto b = ch.buffer(st->size);
      if (!b) return false;
      st->buf = std::move(*b);
    }
    Buffer& b = st->buf;
    if (!b.resize(st->size)) return false;  // within capacity: no move, no allocation
    write_payload(b.data().data(), st->size, iter);
    if (!ch.call(b, Deadline::after(std::chrono::seconds(10)))) return false;
    std::uint64_t sum;
    std::memcpy(&sum, b.data().data(), 8);
    return b.size() == 8 && sum == expected_sum(st->size, iter);
  };
  m.stop = [st] {
    if (st->buf.valid() && st->buf.resize(0))
      (void)st->client[kActive].call(st->buf, Deadline::after(std::chrono::seconds(5)));
  };
  m.teardown = [st] {
    st->buf.reset();
    st->client.clear();
    st->server.clear();
    st->ready = {};
  };
  return m;
}

Mechanism uds_epoll(std::size_t n) {
  struct State {
    std::vector<os::UniqueFd> client, server;
    Ready ready;
    std::vector<std::byte> cbuf, sbuf;
  };
  auto st = std::make_shared<State>();
  Mechanism m;
  m.name = "uds-epoll";
  m.copies_by_design = "2: write() copies into the kernel, read() copies out";
  m.setup = [st, n](std::size_t size) -> Status {
    st->client.reserve(n);
    st->server.reserve(n);
    for (std::size_t i = 0; i < n; ++i) {
      auto p = os::stream_pair();
      if (!p) {  // as above
        st->client.clear();
        st->server.clear();
        return fail(p.error());
      }
      st->client.push_back(std::move(p->first));
      st->server.push_back(std::move(p->second));
    }
    st->cbuf.assign(size + 8, std::byte{0});
    st->sbuf.assign(size + 8, std::byte{0});
    return st->ready.make();
  };
  m.serve = [st](std::size_t, ServerCounter& count) -> int {
    st->client.clear();
    auto ep = os::Epoll::create();
    if (!ep) return 1;
    for (std::size_t i = 0; i < st->server.size(); ++i)
      if (!ep->add(st->server[i].get(), os::kEpollIn, i)) return 1;
    if (!st->ready.signal()) return 1;
    os::EpollEvent ev[64];
    for (;;) {
      auto got = ep->wait(ev, -1);
      if (!got) return 2;
      for (std::size_t k = 0; k < *got; ++k) {
        if (ev[k].data != kActive) return 5;  // an idle connection spoke (or hung up)
        const int fd = st->server[kActive].get();
        std::uint64_t len = 0;
        auto r = os::read_full(fd, {reinterpret_cast<std::byte*>(&len), 8});
        if (!r || *r != 8) return 1;
        if (len == ~std::uint64_t{0}) return count.stop(), 0;
        if (len > st->sbuf.size()) return 2;
        r = os::read_full(fd, {st->sbuf.data(), len});
        if (!r || *r != len) return 3;
        std::uint64_t sum = read_payload(st->sbuf.data(), len);
        if (!os::write_full(fd, {reinterpret_cast<std::byte*>(&sum), 8})) return 4;
        count.tick();
      }
    }
  };
  m.after_fork_parent = [st]() -> Status {
    st->server.clear();
    return st->ready.wait();
  };
  m.client_rtt = [st](std::uint64_t iter) -> bool {
    const int fd = st->client[kActive].get();
    std::size_t size = st->cbuf.size() - 8;
    std::uint64_t len = size;
    std::memcpy(st->cbuf.data(), &len, 8);
    write_payload(st->cbuf.data() + 8, size, iter);
    if (!os::write_full(fd, {st->cbuf.data(), size + 8})) return false;
    std::uint64_t sum = 0;
    auto got = os::read_full(fd, {reinterpret_cast<std::byte*>(&sum), 8});
    return got && *got == 8 && sum == expected_sum(size, iter);
  };
  m.stop = [st] {
    std::uint64_t stop = ~std::uint64_t{0};
    (void)os::write_full(st->client[kActive].get(), {reinterpret_cast<std::byte*>(&stop), 8});
  };
  m.teardown = [st] {
    st->client.clear();
    st->server.clear();
    st->ready = {};
    st->cbuf = {};
    st->sbuf = {};
  };
  return m;
}

}  // namespace

std::vector<Mechanism> channel_mechanisms(std::size_t n) {
  std::vector<Mechanism> v;
  v.push_back(mbmq_channels("mbmq-spin", WaitMode::Spin, QueueWait::Block, n));
  v.push_back(mbmq_channels("mbmq-adaptive", WaitMode::Adaptive, QueueWait::Block, n));
  v.push_back(mbmq_channels("mbmq-sleep", WaitMode::Sleep, QueueWait::Block, n));
  // As in the main bench (mech_shm.cc): a Sleep queue, so that wait(immediate) looks only once.
  v.push_back(mbmq_channels("mbmq-fd", WaitMode::Sleep, QueueWait::Epoll, n));
  v.push_back(uds_epoll(n));
  return v;
}

std::size_t fds_per_channel(const std::string& mechanism) {
  if (mechanism == "uds-epoll") return 2;  // a socket pair
  // The first channel of a process also starts the watcher (its epoll and eventfd), which is not
  // per channel: counted on the second.
  auto first = Channel::pair();
  const std::size_t before = os::open_fd_count();
  auto second = Channel::pair();
  const std::size_t after = os::open_fd_count();
  return after > before ? after - before : 1;
}

}  // namespace mbmq::tool
