// tests/helpers/test_peer.cc: mbmq-test-peer, a separately exec'd program for the tests that
// need unrelated processes (tests/ipc/crash_test.cc). It reports on stdout, one line per event
// (each line shorter than PIPE_BUF, so lines of many peers sharing one pipe do not interleave):
//
//   mbmq-test-peer server NAME          echo server on NAME       "ready"
//   mbmq-test-peer server NAME --hold   holds every request; when its client dies, replies to
//                                       it and reports "released <errc> <fd delta> <map delta>"
//                                       (deltas against before the first connection), exits 0
//   mbmq-test-peer client NAME [--calls N | --oneway]
//                                       calls until an error (or N calls), "connected" first,
//                                       then "closed <errc> <t_ns> <calls> <fd delta> <map delta>"
//                                       (t_ns: CLOCK_MONOTONIC when the error came back; errc
//                                       "ok" after N calls); --oneway sends one-way messages.
//                                       "connect-failed <errc>" if the connection fails.
// The echo server prints "peer-closed <fd delta> <map delta>" each time a client's channel ends
// (counts settled, against before its first connection).
// MBMQ_CRASH_AT / MBMQ_FAIL in the environment arm the library's fault injection (os/fault.h).
// Every peer dies with a 60 s watchdog and with its parent.
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>

#include "mbmq/mbmq.h"
#include "os/process.h"

namespace {

using namespace std::chrono_literals;

void say(const char* fmt, auto... args) {
  char line[256];
  int n = std::snprintf(line, sizeof line, fmt, args...);
  if (n > 0)
    (void)mbmq::os::write_full(
        1, {reinterpret_cast<const std::byte*>(line), static_cast<std::size_t>(n)});
}

long long delta(std::size_t now, std::size_t base) {
  return static_cast<long long>(now) - static_cast<long long>(base);
}

// Waits (at most 1 s) until the fd and mapping counts are back at the baseline. A channel closed
// while the watcher thread is still delivering its hang-up is freed when that delivery returns
// (microseconds, unless the thread is preempted), on the watcher thread.
void settle(std::size_t fds0, std::size_t maps0) {
  for (int i = 0; i < 1000; ++i) {
    if (mbmq::os::open_fd_count() == fds0 && mbmq::os::mapping_count("memfd:mbmq-") == maps0)
      return;
    ::usleep(1000);
  }
}

int server(const char* name, bool hold) {
  auto listener = mbmq::Listener::create(name);
  auto queue = mbmq::MsgQueue::create();
  if (!listener || !queue || !listener->redirect(*queue, 0)) return 2;
  const std::size_t fds0 = mbmq::os::open_fd_count(),
                    maps0 = mbmq::os::mapping_count("memfd:mbmq-");
  say("ready\n");
  std::map<std::uint64_t, mbmq::Message> held;
  for (std::uint64_t next_key = 1;;) {
    auto msg = queue->wait(mbmq::Deadline::never());
    if (!msg) return 3;
    switch (msg->kind) {
      case mbmq::Kind::Connection: {
        auto r = queue->adopt(std::move(msg->channel), next_key++);
        if (r) break;
        if (r.error().code != mbmq::Errc::PeerClosed) return 4;
        // The client left between its connect and our adopt: that is its channel's end.
        if (!hold) {
          settle(fds0, maps0);
          say("peer-closed %lld %lld\n", delta(mbmq::os::open_fd_count(), fds0),
              delta(mbmq::os::mapping_count("memfd:mbmq-"), maps0));
        }
        break;
      }
      case mbmq::Kind::Request:
        if (hold) {
          say("holding %llu\n", static_cast<unsigned long long>(msg->key));
          held.emplace(msg->key, std::move(*msg));
        } else {
          (void)mbmq::MsgQueue::reply(std::move(*msg));
        }
        break;
      case mbmq::Kind::PeerClosed: {
        auto it = held.find(msg->key);
        if (it == held.end()) {
          if (!hold) {
            settle(fds0, maps0);
            say("peer-closed %lld %lld\n", delta(mbmq::os::open_fd_count(), fds0),
                delta(mbmq::os::mapping_count("memfd:mbmq-"), maps0));
          }
          break;
        }
        // The caller is dead: the reply must fail cleanly and give everything back.
        auto r = mbmq::MsgQueue::reply(std::move(it->second));
        held.erase(it);
        settle(fds0, maps0);
        say("released %s %lld %lld\n", r ? "ok" : mbmq::errc_name(r.error().code),
            delta(mbmq::os::open_fd_count(), fds0),
            delta(mbmq::os::mapping_count("memfd:mbmq-"), maps0));
        return 0;
      }
      default:
        break;
    }
  }
}

int client(const char* name, long long max_calls, bool oneway) {
  // Starts the watcher thread before the baseline. Kept open: closing it would have the watcher
  // deliver a hang-up, and free the other end, while the baseline is being taken.
  auto warm_up = mbmq::Channel::pair();
  const std::size_t fds0 = mbmq::os::open_fd_count(),
                    maps0 = mbmq::os::mapping_count("memfd:mbmq-");
  long long calls = 0;
  const char* code = "system";
  std::int64_t t = 0;
  {
    auto ch = mbmq::connect(name, mbmq::Deadline::after(5s));
    if (!ch) {
      say("connect-failed %s %s\n", mbmq::errc_name(ch.error().code), ch.error().message().c_str());
      return 2;
    }
    auto buf = ch->buffer(64);
    say("connected\n");
    // A server that died right after handing over the channel: the end may already be closed
    // (the watcher saw the hang-up), and buffer() says so. That is the same outcome as a call
    // that ends with PeerClosed.
    if (!buf) {
      t = mbmq::monotonic_ns();
      code = mbmq::errc_name(buf.error().code);
    }
    for (; buf; ++calls) {
      if (calls == max_calls) {
        code = "ok";
        break;
      }
      if (oneway) {  // send, then take the buffer again once the server gives it back
        auto r = ch->send(std::move(*buf));
        for (int i = 0; r && i < 100000; ++i) {
          buf = ch->buffer(64);
          if (buf || buf.error().code != mbmq::Errc::NoBuffers) break;
          ::usleep(10);
        }
        if (!r || !buf) {
          t = mbmq::monotonic_ns();
          code = mbmq::errc_name(!r ? r.error().code : buf.error().code);
          break;
        }
        continue;
      }
      std::memcpy(buf->data().data(), &calls, sizeof calls);
      auto r = ch->call(*buf, mbmq::Deadline::after(10s));
      if (!r) {
        t = mbmq::monotonic_ns();
        code = mbmq::errc_name(r.error().code);
        break;
      }
      long long back = 0;
      std::memcpy(&back, buf->data().data(), sizeof back);
      if (back != calls) {
        say("corrupt %lld\n", calls);
        return 4;
      }
    }
  }  // the channel and its buffer are gone here
  settle(fds0, maps0);
  say("closed %s %lld %lld %lld %lld\n", code, static_cast<long long>(t), calls,
      delta(mbmq::os::open_fd_count(), fds0), delta(mbmq::os::mapping_count("memfd:mbmq-"), maps0));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  mbmq::os::die_with_parent();
  ::alarm(60);
  if (argc >= 3 && std::strcmp(argv[1], "server") == 0)
    return server(argv[2], argc == 4 && std::strcmp(argv[3], "--hold") == 0);
  if (argc >= 3 && std::strcmp(argv[1], "client") == 0) {
    long long calls = -1;
    bool oneway = false;
    for (int i = 3; i < argc; ++i) {
      if (std::strcmp(argv[i], "--calls") == 0 && i + 1 < argc) calls = std::atoll(argv[++i]);
      if (std::strcmp(argv[i], "--oneway") == 0) oneway = true;
    }
    return client(argv[2], calls, oneway);
  }
  std::fprintf(stderr,
               "usage: mbmq-test-peer server NAME [--hold] | client NAME [--calls N|--oneway]\n");
  return 2;
}
