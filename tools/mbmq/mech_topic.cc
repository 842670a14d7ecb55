// tools/mbmq/mech_topic.cc: the mbmq-topic rows of `mbmq bench --fanout` (#15): mbmq/topic.h's
// Publisher and Subscriber, used as the header's example does: the publisher takes a sample with
// buffer(), writes it in place and publish()es it (one FUTEX_WAKE for every sleeping subscriber);
// each subscriber receive()s and reads the sample's read-only span in place.
//   mbmq-topic        the subscribers in the default WaitPolicy (adaptive)
//   mbmq-topic-sleep  the subscribers in WaitMode::Sleep
// Built where mbmq/topic.h exists (__has_include); elsewhere there are no such rows and the
// report says the row is pending.
#include "fanout.h"

#if __has_include("mbmq/topic.h")
#include <algorithm>
#include <cerrno>
#include <chrono>
#include <string>

#include "mbmq/topic.h"
#include "os/process.h"

namespace mbmq::tool {
namespace {

constexpr auto kPatience = std::chrono::seconds(15);  // joining
constexpr auto kStep = std::chrono::seconds(10);      // a buffer or a publish (paced: never)

// One topic per cell: a subscriber left over from an earlier cell cannot hold this one up.
std::string topic_name(const FanoutControl& ctl) {
  return "mbmq-fanout-" + std::to_string(ctl.cell_id);
}

// Subscriber::connect, again while nobody listens yet (the publisher is forked after us).
Result<Subscriber> join(const std::string& name, const ConnectOptions& opt) {
  const Deadline deadline = Deadline::after(kPatience);
  for (;;) {
    auto sub = Subscriber::connect(name, deadline, opt);
    if (sub || deadline.expired()) return sub;
    const Error& e = sub.error();
    if (e.code != Errc::System || (e.sys_errno != ECONNREFUSED && e.sys_errno != ENOENT))
      return sub;
    os::sleep_ns(1'000'000);
  }
}

FanoutMechanism mbmq_topic_mechanism(WaitMode mode) {
  const bool sleep = mode == WaitMode::Sleep;
  FanoutMechanism m;
  m.name = sleep ? "mbmq-topic-sleep" : "mbmq-topic";
  m.note = sleep ? "mbmq-topic-sleep: the same, the subscribers in WaitMode::Sleep"
                 : "mbmq-topic: Publisher::create (8 samples of the message size, keep 4, "
                   "Block), buffer(), written in place, publish(); subscribers "
                   "Subscriber::connect (default WaitPolicy), receive(), read in place";
  m.copies = [](std::size_t) { return std::size_t{0}; };
  m.setup = [](std::size_t, std::size_t) -> Status { return {}; };  // nothing before the forks
  m.publish = [](FanoutPublisher& p) -> Status {
    TopicOptions opt;
    opt.samples = 8;  // paced: one sample in flight, the pool small (8 MiB at 1 MiB)
    opt.sample_size = static_cast<std::uint32_t>(std::max<std::size_t>(p.size(), 64));
    opt.keep = 4;
    Publisher pub = MBMQ_TRY(Publisher::create(topic_name(p.control()), opt));
    // Joins are taken inside the publisher's calls: take them all before the probes.
    MBMQ_TRY(pub.wait_for_subscribers(p.subscribers(), Deadline::after(kPatience)));
    while (p.next()) {  // the send time is taken before buffer()
      Buffer b = MBMQ_TRY(pub.buffer(p.size(), Deadline::after(kStep)));
      p.fill(b.data().data());  // the one write of the payload
      MBMQ_TRY(pub.publish(std::move(b), Deadline::after(kStep)));
      p.sent();  // closes this message's os/ count (buffer() and publish())
    }
    return p.status();
  };
  m.subscribe = [mode](FanoutSubscriber& s) -> Status {
    ConnectOptions opt;
    opt.wait.mode = mode;
    Subscriber sub = MBMQ_TRY(join(topic_name(s.control()), opt));
    for (;;) {
      auto sample = sub.receive(Deadline::after(std::chrono::milliseconds(200)));
      if (!sample) {
        if (!s.healthy()) return {};  // another side failed and says why
        if (sample.error().code == Errc::TimedOut) continue;
        return fail(sample.error());
      }
      const std::span<const std::byte> d = sample->data();  // read-only, in place
      const auto v = s.received(d.data(), d.size());
      if (v == FanoutSubscriber::Verdict::Fail) return s.failure();
      if (v == FanoutSubscriber::Verdict::End) return {};
    }  // each sample is released as it goes out of scope
  };
  m.teardown = [] {};
  return m;
}

}  // namespace

std::vector<FanoutMechanism> topic_fanout_mechanisms() {
  std::vector<FanoutMechanism> v;
  v.push_back(mbmq_topic_mechanism(WaitMode::Adaptive));
  v.push_back(mbmq_topic_mechanism(WaitMode::Sleep));
  return v;
}

}  // namespace mbmq::tool

#else

namespace mbmq::tool {
std::vector<FanoutMechanism> topic_fanout_mechanisms() { return {}; }  // TODO(#15): merge topic
}  // namespace mbmq::tool

#endif
