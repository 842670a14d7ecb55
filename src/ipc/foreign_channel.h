// ipc/foreign_channel.h: a Channel whose end is not a shared-memory Endpoint but a remote
// connection (mbmq::net over UCX: "ucx://HOST:PORT/service"; docs/design/net-channel.md). The core
// library knows only this interface and a registry of one connector; mbmq::net implements both
// (src/net/remote.cc), so that mbmq::connect("ucx://...") returns an mbmq::Channel when mbmq::net
// is linked and Errc::InvalidArgument saying so when it is not.
//
// A Channel holds either an Endpoint (ep_) or a ForeignChannel (remote_), never both. Its methods
// test ep_ first, as they always did; only on that cold branch do they look at remote_, so a local
// end's hot path gains no branch and no virtual call. Buffers of a remote end are foreign Buffers
// (ipc/foreign_buffer.h): data() is the same inline span over memory mbmq::net owns.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>

#include "mbmq/buffer.h"
#include "mbmq/channel.h"
#include "mbmq/deadline.h"
#include "mbmq/rendezvous.h"
#include "mbmq/result.h"
#include "mbmq/wait_policy.h"

namespace mbmq {
class MsgQueue;
struct Message;
}  // namespace mbmq

namespace mbmq::detail {

// Why a remote end refuses what only a shared-memory end can do.
inline constexpr const char* kRemoteCannotMove =
    "a remote (ucx://) channel end cannot move to another process (send_over, Buffer::attach)";
inline constexpr const char* kRemoteNoReserve =
    "Channel::reserve: a remote (ucx://) end has no shared slots to write in place: use buffer() "
    "and send()";

// The methods of Channel that make sense across hosts, with Channel's contracts (mbmq/channel.h)
// except where that header says "a remote end". Called from one thread at a time, but close(),
// which another thread may call while one is inside another method (it returns).
class ForeignChannel {
 public:
  virtual ~ForeignChannel() = default;
  // A buffer of `size` bytes, at once.
  virtual Result<Buffer> buffer(std::size_t size) = 0;
  // The same, after waiting until the peer's grant has room for a message of that size (the
  // remote form of a local pool's back-pressure) or `deadline` passes (Errc::TimedOut).
  virtual Result<Buffer> buffer(std::size_t size, Deadline deadline) = 0;
  // How many messages of `size` bytes the peer's grant lets out now (Channel::buffers() takes no
  // more buffers than that, as a local pool gives no more than it has).
  virtual std::size_t sendable(std::size_t size) const noexcept = 0;
  // Channel::receive_in_place(): 0 ("take it with receive()"), or the error receive() would
  // give without waiting (closed, a forked child, redirected, the end delivered).
  virtual Result<std::size_t> receive_in_place() = 0;
  virtual Status call(Buffer& buf, Deadline deadline) = 0;
  virtual Status send(Buffer&& buf) = 0;
  virtual Status send_request(Buffer&& buf) = 0;
  virtual Result<Message> receive(Deadline deadline) = 0;
  virtual Result<std::size_t> receive_batch(std::span<Message> out, Deadline deadline) = 0;
  virtual Status redirect(MsgQueue& queue, std::uint64_t key) = 0;
  // MsgQueue::adopt: the queue keeps the connection until its end is delivered; this object is
  // left empty (closing it then closes nothing).
  virtual Status adopt(MsgQueue& queue, std::uint64_t key) = 0;
  virtual void set_wait_policy(WaitPolicy policy) = 0;
  virtual bool valid() const noexcept = 0;
  virtual void close() noexcept = 0;

 protected:
  ForeignChannel() = default;
  ForeignChannel(const ForeignChannel&) = default;
  ForeignChannel& operator=(const ForeignChannel&) = default;
};

// mbmq::connect() for "ucx://" URLs: set once by mbmq::net (a static object in its library, which
// every target linking mbmq::net gets: src/CMakeLists.txt), read by connect(). Unset: connect()
// answers Errc::InvalidArgument ("link mbmq::net").
using RemoteConnector = Result<Channel> (*)(std::string_view url, Deadline deadline,
                                            const ConnectOptions& options);
void set_remote_connector(RemoteConnector c) noexcept;
RemoteConnector remote_connector() noexcept;

}  // namespace mbmq::detail
