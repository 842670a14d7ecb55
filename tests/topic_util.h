// tests/topic_util.h: helpers of the topic tests (topic_test, topic_review_test).
#pragma once

#include <unistd.h>

#include <string>
#include <thread>

#include "mbmq/mbmq.h"
#include "test_util.h"

namespace mbmq::test {

// A name no other test (or earlier run) uses: `prefix`-`what`-pid-n.
inline std::string topic_name(const char* prefix, const char* what) {
  static int n = 0;
  return std::string(prefix) + what + "-" + std::to_string(::getpid()) + "-" + std::to_string(n++);
}

// Children are forked before the publisher exists (so none inherits another's channel), and
// connect once it listens: retried for 10 s.
inline Result<Subscriber> connect_retry(const std::string& name, ConnectOptions o = {}) {
  const Deadline end = secs(10);
  for (;;) {
    auto s = Subscriber::connect(name, secs(5), o);
    if (s || end.expired()) return s;
    ::usleep(2000);
  }
}

// A subscriber connected from a thread while the publisher serves on this one.
inline Result<Subscriber> join_one(Publisher& pub, const std::string& name) {
  Result<Subscriber> sub = fail(Errc::TimedOut, "join_one");
  const std::size_t want = pub.subscribers() + 1;  // before the thread can join
  std::thread t([&] { sub = connect_retry(name); });
  (void)pub.wait_for_subscribers(want, secs(10));
  t.join();
  return sub;
}

}  // namespace mbmq::test
