// ipc/queue_source.h: QueueSource, a source of messages for a MsgQueue that is not a channel end
// of this library: mbmq::net's remote channels redirected to a queue (docs/design/net.md,
// "Redirect to a MsgQueue"). The core library knows only this interface.
//
// Protocol (the producer's half of P6q, as a channel's PeerBell does for its ring):
//   producer: stores its ready flag (maybe_ready() true), then QueueCore::wake(): a seq_cst
//             fence, then it reads the queue's sleepers and wakes what they say (a futex waiter,
//             the armed fd);
//   queue:    announces its sleep, seq_cst fence, looks once more (maybe_ready() of every
//             source), then sleeps.
// Either the queue's last look sees the flag, or the producer sees the sleeper: no lost wake-up.
//
// Locks: take() is called with the queue's lock held; a source never takes the queue's lock, and
// nothing a source locks inside take() is ever held by a thread that then takes the queue's lock.
#pragma once

#include <cstddef>
#include <cstdint>

#include "mbmq/msg_queue.h"

namespace mbmq::detail {

class QueueSource {
 public:
  enum class Take : std::uint8_t { Got, Empty, Gone };
  // A hint, read without locks on every look: false means take() would find nothing.
  virtual bool maybe_ready() const noexcept = 0;
  // With the queue's lock held: Got (*out is a message, out's old contents were empty), Empty, or
  // Gone (never again: the queue lets go of the source).
  virtual Take take(Message* out) noexcept = 0;
  // The queue is being destroyed (MsgQueue::close_all, without the queue's lock): the source
  // closes what it delivers, as the queue closes its redirected channel ends.
  virtual void close() noexcept = 0;
  // Channels delivering through it now (MsgQueue::channel_count()).
  virtual std::size_t channel_count() const noexcept = 0;

 protected:
  QueueSource() = default;
  ~QueueSource() = default;
  QueueSource(const QueueSource&) = default;
  QueueSource& operator=(const QueueSource&) = default;
};

}  // namespace mbmq::detail
