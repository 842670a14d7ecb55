// mbmq/msg_queue.h: MsgQueue, where a process receives. Channels are redirected to a queue with a
// key of the owner's choosing; wait() returns {key, kind, buffer} in one step (no "message plus
// notification" doubling). Several threads may wait on one queue; each message goes to one.
//
//   mbmq::MsgQueue queue = MBMQ_TRY(mbmq::MsgQueue::create());
//   MBMQ_TRY(server.redirect(queue, 7));
//   mbmq::Message msg = MBMQ_TRY(queue.wait(mbmq::Deadline::never()));
//   for (;;) {
//     handle(msg.buffer.data());                         // answer in place
//     msg = MBMQ_TRY(queue.reply_and_wait(std::move(msg), deadline));
//   }
//
// Waiting: a wait() costs O(ready channels), not O(channels): each channel's peer marks it ready
// in a page the queue shares with its peers (one bit per channel), and the queue polls only the
// channels whose bits it took, round robin. The queue spins for its policy's budget, then sleeps
// on one futex word; peers wake it only when a waiter has announced that it sleeps (one store,
// whatever the number of channels). Up to kQueueCapacity (16,384) channels per queue
// (docs/PROTOCOL.md, P4q/P6q). fd() puts the queue in an epoll/poll event loop.
#pragma once

#include <cstdint>
#include <memory>

#include "mbmq/buffer.h"
#include "mbmq/channel.h"
#include "mbmq/deadline.h"
#include "mbmq/export.h"
#include "mbmq/result.h"
#include "mbmq/sample.h"
#include "mbmq/wait_policy.h"

namespace mbmq {

namespace detail {
class QueueCore;
class TopicCore;
struct TestAccess;
struct QueueAccess;
}  // namespace detail
class Listener;

enum class Kind : std::uint8_t {
  Request,     // answer with reply() or reply_and_wait(); dropping it answers NoReply
  Reply,       // the answer to a send_request(); the buffer is ours again
  Message,     // one-way; dropping the buffer gives it back to the sender
  PeerClosed,  // the channel ended: `error` says PeerClosed or Protocol; the buffer is empty
  Connection,  // a Listener redirected here accepted a client: `channel` is the server's end
               // (a net::Listener's: a remote end, mbmq/channel.h)
  Sample,      // a topic's sample for a Subscriber redirected here: `sample` (mbmq/topic.h)
};

struct Message {
  std::uint64_t key = 0;
  Kind kind = Kind::PeerClosed;
  Buffer buffer;
  Errc error = Errc::PeerClosed;  // Kind::PeerClosed only
  // Kind::PeerClosed with Errc::Protocol: which rule the peer broke (a static string, e.g.
  // "receive (untrusted): payload above copy_threshold not in a sealed memfd"); else "".
  const char* why = "";
  // Kind::Connection only: the new channel (of a redirected mbmq::net::Listener: a remote end,
  // mbmq/channel.h). Keep it, or adopt() it into a queue; dropped, it closes and the client sees
  // PeerClosed.
  Channel channel;
  // Kind::Sample only: the sample, read-only; dropping it releases it.
  Sample sample;
};

class MBMQ_EXPORT MsgQueue {
 public:
  MsgQueue() noexcept = default;
  MsgQueue(MsgQueue&&) noexcept = default;
  // Closes the channels redirected to the queue it replaces, as the destructor does.
  MsgQueue& operator=(MsgQueue&&) noexcept;
  ~MsgQueue();

  static Result<MsgQueue> create(WaitPolicy policy = {});

  // The next message from any redirected channel. Errc::TimedOut at the deadline.
  Result<Message> wait(Deadline deadline);
  // Answers a Kind::Request message with the bytes now in msg.buffer (resize() first if needed).
  // Errc::PeerClosed if the caller is gone (the buffer is released either way).
  static Status reply(Message&& msg);
  // reply() then wait(), as one operation. A failed reply concerns one channel only (the caller
  // is gone, broke the protocol, or its answer could not be made: it then gets NoReply): it is
  // not an error of the server loop, which moves on to the next message. Only a wrong call (an
  // Errc::InvalidArgument) is returned.
  Result<Message> reply_and_wait(Message&& msg, Deadline deadline);

  // Redirects `channel` here with `key` and takes ownership of it: the queue keeps the channel open
  // until its final Kind::PeerClosed has been delivered (or the queue is destroyed). For servers
  // that accept many connections and keep no handle of their own. Errc::PeerClosed if the channel
  // has already ended (a client that connected and left at once): it is closed, nothing to adopt.
  Status adopt(Channel&& channel, std::uint64_t key);

  // A file descriptor for epoll/poll/select, asio, libuv (level-triggered, POLLIN): readable
  // whenever wait(Deadline::immediate()) could return a message (a request, reply, one-way
  // message, peer-closed, connection). It may also be readable with nothing there (a message
  // already taken by an earlier wait()); it stays readable until a wait() finds nothing and
  // returns Errc::TimedOut. So: when it is readable, call wait(Deadline::immediate()) (or
  // reply_and_wait) until TimedOut, then poll again. Owned by the queue: do not close or read it.
  // From the first call on, a wait() that finds nothing arms the fd: its peers then signal it
  // (one system call per message) until the same thread's next wait() starts. So a thread that
  // stops polling the fd and spins in wait() costs its peers no system call; a wait() on another
  // thread leaves the fd armed. A queue whose fd() was never called costs its peers no system
  // call while it spins. -1 for an invalid queue.
  int fd() const noexcept;
  void set_wait_policy(WaitPolicy policy);
  // How many channels are redirected here and still open.
  std::size_t channel_count() const;
  bool valid() const noexcept { return core_ != nullptr; }

 private:
  friend class Channel;
  friend class Listener;
  friend class detail::TopicCore;  // waits on its queue's core without holding its own lock
  friend struct detail::TestAccess;
  friend struct detail::QueueAccess;  // mbmq::net's redirect (ipc/queue_source.h)
  void close_all() noexcept;
  std::shared_ptr<detail::QueueCore> core_;
};

}  // namespace mbmq
