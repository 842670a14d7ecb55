// mbmq/topic.h: publish/subscribe. A Publisher writes a sample once, in place, and publishes it to
// every Subscriber of its topic; subscribers read it in place, read-only, and the sample is reused
// when the last of them has released it. Design: docs/design/topic.md (protocol steps T1-T10).
//
//   // publisher process
//   mbmq::Publisher pub = MBMQ_TRY(mbmq::Publisher::create("prices", {.keep = 8}));
//   mbmq::Buffer b = MBMQ_TRY(pub.buffer(64, mbmq::Deadline::after(1s)));
//   write_price(b.data());
//   MBMQ_TRY(pub.publish(std::move(b), mbmq::Deadline::after(1s)));
//
//   // subscriber process
//   auto sub = MBMQ_TRY(mbmq::Subscriber::connect("prices", mbmq::Deadline::after(1s)));
//   mbmq::Sample s = MBMQ_TRY(sub.receive(mbmq::Deadline::never()));
//   read_price(s.data(), s.seq(), s.missed());       // dropping `s` releases the sample
//
//   // or, one loop for requests and subscriptions:
//   MBMQ_TRY(sub.redirect(queue, kPrices));          // Message{kPrices, Kind::Sample, sample}
//
// Subscribers join by name through the Listener/connect rendezvous (its access control applies)
// and receive the samples published after they joined. The samples live in one memfd that
// subscribers can only map read-only (sealed F_SEAL_FUTURE_WRITE), so no subscriber can change
// what another reads. A subscriber that dies has its references reclaimed. Waking any number of
// sleeping subscribers costs the publisher one system call.
//
// Joins and departures are handled when the publisher calls into the topic (buffer(), publish(),
// subscribers(), serve()): an idle publisher should call serve() so that subscribers can join.
//
// Thread safety: Publisher's methods take one lock, for short steps only: a publish() or buffer()
// that waits for room, and serve(), let it go while they sleep. So stats(), subscribers() and a
// Buffer dropped on another thread never wait for another thread's wait; another thread's
// publish(), buffer() and serve() wait for the lock at most until their own deadline
// (Errc::TimedOut). Buffers and Samples may be dropped on any
// thread. Subscriber::receive() may be called from several threads (one at a time gets in; the
// others until their deadline). A Publisher or Subscriber used in a forked child refuses to work
// (Errc::InvalidArgument; a Sample dropped there is not given back): use them in the process that
// made them.
//
// Memory ordering: everything written into a buffer before publish() is visible to a subscriber
// when receive() returns it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string_view>

#include "mbmq/buffer.h"
#include "mbmq/deadline.h"
#include "mbmq/export.h"
#include "mbmq/rendezvous.h"
#include "mbmq/result.h"
#include "mbmq/sample.h"
#include "mbmq/wait_policy.h"

namespace mbmq {

namespace detail {
class TopicCore;
class SubscriberCore;
struct TopicTestAccess;
}  // namespace detail

// What publish() does about a subscriber that holds `keep` samples it has not released (queued
// for it or held by its application). See docs/design/topic.md (T8).
enum class SlowSubscriber : std::uint8_t {
  Block,       // wait until it releases one, up to publish()'s deadline (Errc::TimedOut)
  DropOldest,  // drop its oldest queued sample (it sees missed() > 0); never waits for it
  Refuse,      // fail the publish at once with Errc::Busy
};

struct TopicOptions {
  std::uint32_t samples = 512;            // samples in the pool (<= 1024)
  std::uint32_t sample_size = 64 * 1024;  // bytes per sample (<= 64 MiB)
  std::uint32_t keep = 4;                 // per subscriber (1 <= keep <= min(samples - 1, 256))
  SlowSubscriber policy = SlowSubscriber::Block;
  // More are refused (their connect sees PeerClosed). DropOldest needs samples > keep *
  // max_subscribers (each subscriber may pin `keep` samples): Errc::InvalidArgument otherwise.
  // Any local process the access policy admits may take subscriber slots (one process can take
  // them all): limit who may subscribe with `access`.
  std::uint32_t max_subscribers = 64;
  WaitPolicy wait{};      // how the publisher waits (for room, for events)
  AccessPolicy access{};  // who may subscribe (the listener's policy)
};

struct TopicStats {
  std::uint64_t published = 0;        // samples published
  std::uint64_t deliveries = 0;       // (sample, subscriber) pairs queued
  std::uint64_t dropped = 0;          // DropOldest: queued samples taken back from subscribers
  std::uint64_t skipped = 0;          // DropOldest: samples not offered to a subscriber at keep
  std::uint64_t refused = 0;          // Refuse: publishes that returned Errc::Busy
  std::uint64_t joined = 0;           // subscribers accepted
  std::uint64_t left = 0;             // subscribers gone (closed, died, or thrown out)
  std::uint64_t protocol_errors = 0;  // subscribers thrown out for breaking the protocol
  std::uint64_t wakes = 0;            // FUTEX_WAKE calls made by publish()
  std::uint64_t notifications = 0;    // messages to subscribers redirected to a queue (T10)
  std::uint32_t free_samples = 0;     // samples neither lent nor handed out now
};

class MBMQ_EXPORT Publisher {
 public:
  Publisher() noexcept = default;
  Publisher(Publisher&&) noexcept = default;
  Publisher& operator=(Publisher&&) noexcept;
  Publisher(const Publisher&) = delete;
  Publisher& operator=(const Publisher&) = delete;
  // Stops listening and disconnects every subscriber (they see Errc::PeerClosed once they have
  // taken what was queued). Samples they hold stay readable until they release them.
  ~Publisher();

  // Listens on `name`. Errc::InvalidArgument for options out of range; Errc::System/EADDRINUSE
  // if another live listener has the name.
  static Result<Publisher> create(std::string_view name, const TopicOptions& options = {});

  // A free sample of `size` bytes (capacity sample_size), to write and publish(). Waits until
  // `deadline` for one to be released (Errc::TimedOut). Errc::InvalidArgument above sample_size.
  // Dropped unpublished, it goes back to the pool.
  Result<Buffer> buffer(std::size_t size, Deadline deadline);
  // Publishes `sample` (from this publisher's buffer(), without handles) to every subscriber, per
  // the policy. On success `sample` is moved from. On Errc::TimedOut (Block) or Errc::Busy
  // (Refuse) nothing was published and `sample` is still the caller's, to retry.
  Status publish(Buffer&& sample, Deadline deadline);
  // Subscribers now (joins and departures that arrived are taken first).
  std::size_t subscribers() const;
  // Handles joins and departures until `deadline`; returns the subscriber count.
  Result<std::size_t> serve(Deadline deadline);
  // serve() until at least n subscribers have joined (Errc::TimedOut at the deadline).
  Result<std::size_t> wait_for_subscribers(std::size_t n, Deadline deadline);
  // Counters, and the free samples after taking back what subscribers released.
  TopicStats stats() const;
  bool valid() const noexcept { return core_ != nullptr; }

 private:
  friend struct detail::TopicTestAccess;
  std::shared_ptr<detail::TopicCore> core_;
};

class MBMQ_EXPORT Subscriber {
 public:
  Subscriber() noexcept = default;
  Subscriber(Subscriber&&) noexcept = default;
  Subscriber& operator=(Subscriber&&) noexcept = default;
  Subscriber(const Subscriber&) = delete;
  Subscriber& operator=(const Subscriber&) = delete;
  ~Subscriber();

  // Joins the topic `name`: connect() (options.server decides whom we trust to listen there),
  // then the publisher's hello with the pool and this subscriber's segment, both checked
  // (Errc::Protocol if wrong). Errc::TimedOut if the publisher does not take us in by `deadline`.
  static Result<Subscriber> connect(std::string_view name, Deadline deadline,
                                    const ConnectOptions& options = {});

  // The next sample, in order. Errc::TimedOut at the deadline; Errc::PeerClosed once the
  // publisher has gone (or threw us out) and every sample queued before was received;
  // Errc::Protocol if the publisher wrote garbage.
  Result<Sample> receive(Deadline deadline);
  // Delivers this subscription's samples to `queue` instead, as Message{key, Kind::Sample,
  // sample}, and its end (the publisher gone, or it threw us out) as Kind::PeerClosed: one loop
  // serves requests and subscriptions. receive() then returns Errc::InvalidArgument. Once only.
  Status redirect(MsgQueue& queue, std::uint64_t key);
  bool valid() const noexcept { return core_ != nullptr; }

 private:
  friend struct detail::TopicTestAccess;
  std::shared_ptr<detail::SubscriberCore> core_;
};

}  // namespace mbmq
