// ipc/topic_tap.h: TopicTap, how a MsgQueue takes a topic's samples (docs/design/topic.md, T10).
// A Subscriber redirected to a queue redirects its channel there and installs itself as the
// channel end's tap: when the queue polls that end, the tap is asked first for a sample from the
// subscriber's ring; the publisher's one-way notifications on the channel only wake the queue
// and are dropped.
#pragma once

#include "mbmq/msg_queue.h"

namespace mbmq::detail {

class TopicTap {
 public:
  // Called by the queue's poll of the end, with the queue's lock held (one thread at a time).
  // True: *out is a Kind::Sample. False: nothing now, and the tap has armed its notification
  // (the publisher will send one when it queues the next sample).
  virtual bool take_into(Message* out) noexcept = 0;
  // The subscription's final Kind::PeerClosed, before the queue delivers it: the tap may say
  // why (the publisher threw it out for breaking the protocol).
  virtual void on_end(Message* out) noexcept = 0;

 protected:
  ~TopicTap() = default;
};

}  // namespace mbmq::detail
