// tests/peer_util.h: for tests whose peers are separate programs (tests/helpers/test_peer.cc,
// fork+exec): their shared stdout as lines, and the leak snapshot taken before and after.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <string>
#include <vector>

#include "mbmq/deadline.h"
#include "os/process.h"
#include "os/unix_socket.h"

namespace mbmq::test {

#ifdef MBMQ_TEST_PEER
inline const std::string kPeer = MBMQ_TEST_PEER;
#endif

// Lines from the peers' shared stdout pipe.
class Lines {
 public:
  Lines() {
    auto p = os::make_pipe();
    if (p) {
      read_ = std::move(p->first);
      write_ = std::move(p->second);
    }
  }
  int write_fd() const { return write_.get(); }
  // The next line, or "" at the deadline or EOF.
  std::string next(Deadline deadline) {
    for (;;) {
      if (auto nl = buf_.find('\n'); nl != std::string::npos) {
        std::string line = buf_.substr(0, nl);
        buf_.erase(0, nl + 1);
        return line;
      }
      auto ready =
          os::wait_readable(read_.get(), std::max<std::int64_t>(deadline.remaining_ns(), 0));
      if (!ready || !*ready) return "";
      char chunk[4096];
      long n = os::read_once(read_.get(), chunk, sizeof chunk);
      if (n <= 0) return "";
      buf_.append(chunk, static_cast<std::size_t>(n));
    }
  }

 private:
  os::UniqueFd read_, write_;
  std::string buf_;
};

struct Snapshot {
  std::size_t fds, maps;
  std::vector<std::string> shm;
  bool operator==(const Snapshot&) const = default;
};
inline Snapshot snapshot() {
  return {os::open_fd_count(), os::mapping_count("memfd:mbmq-"), os::dir_listing("/dev/shm")};
}
// The snapshot once it equals `want`, or after 1 s. (A channel closed while the watcher thread is
// still delivering its hang-up is freed when that delivery returns, on the watcher thread.)
inline Snapshot settled(const Snapshot& want) {
  Snapshot s = snapshot();
  for (int i = 0; i < 1000 && !(s == want); ++i) {
    ::usleep(1000);
    s = snapshot();
  }
  return s;
}

#ifdef MBMQ_TEST_PEER
// Starts the test peer with `args`, its stdout into `out`, `env` added to its environment.
inline pid_t start_peer(Lines& out, const std::vector<std::string>& args,
                        const std::vector<std::string>& env = {}) {
  auto pid = os::spawn_program(kPeer, args, out.write_fd(), -1, -1, env);
  return pid ? *pid : -1;
}
#endif

}  // namespace mbmq::test
