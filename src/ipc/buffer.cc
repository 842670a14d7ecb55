// Buffer: a handle; every state change goes through its Endpoint.
#include "mbmq/buffer.h"

#include "ipc/endpoint.h"
#include "ipc/foreign_buffer.h"
#include "ipc/foreign_channel.h"
#include "ipc/handles.h"
#include "ipc/listener_core.h"
#include "ipc/topic_core.h"
#include "mbmq/channel.h"

namespace mbmq {

void detail::HandlesDeleter::operator()(Handles* h) const noexcept { delete h; }

Buffer::Buffer(Buffer&& o) noexcept
    : ep_(std::move(o.ep_)),
      data_(std::exchange(o.data_, nullptr)),
      size_(std::exchange(o.size_, 0)),
      capacity_(std::exchange(o.capacity_, 0)),
      id_(o.id_),
      gen_(o.gen_),
      origin_(std::exchange(o.origin_, Origin::None)),
      kind_(o.kind_),
      handles_(std::move(o.handles_)),
      topic_(std::move(o.topic_)),
      foreign_(std::move(o.foreign_)) {}

Buffer& Buffer::operator=(Buffer&& o) noexcept {
  if (this != &o) {
    reset();
    ep_ = std::move(o.ep_);
    data_ = std::exchange(o.data_, nullptr);
    size_ = std::exchange(o.size_, 0);
    capacity_ = std::exchange(o.capacity_, 0);
    id_ = o.id_;
    gen_ = o.gen_;
    origin_ = std::exchange(o.origin_, Origin::None);
    kind_ = o.kind_;
    handles_ = std::move(o.handles_);
    topic_ = std::move(o.topic_);
    foreign_ = std::move(o.foreign_);
  }
  return *this;
}

Buffer::~Buffer() { reset(); }

void Buffer::reset() noexcept {
  if (ep_ && origin_ != Origin::None) ep_->release(*this);
  ep_.reset();
  if (topic_) detail::topic_release_unpublished(*topic_, id_, gen_);
  topic_.reset();
  data_ = nullptr;
  size_ = capacity_ = 0;
  origin_ = Origin::None;
  handles_.reset();  // handles not taken are closed
  foreign_.reset();  // a remote message: released (an unanswered request answers NoReply)
}

Status Buffer::resize(std::size_t n) {
  if (!valid()) return fail(Errc::InvalidArgument, "Buffer::resize: invalid buffer");
  if (n > capacity_) MBMQ_TRY(reserve(n));
  size_ = static_cast<std::uint32_t>(n);
  return {};
}

Status Buffer::reserve(std::size_t n) {
  if (!valid()) return fail(Errc::InvalidArgument, "Buffer::reserve: invalid buffer");
  if (n <= capacity_) return {};
  if (topic_) return fail(Errc::InvalidArgument, "Buffer::reserve: a topic's sample cannot grow");
  if (foreign_) return foreign_->grow(*this, n);
  return ep_->grow(*this, n);
}

// ---- handles (P3b) ----------------------------------------------------------------------------

namespace {
detail::Handle* next_free_handle(detail::HandlesPtr& h) {
  if (!h) h = detail::HandlesPtr(new detail::Handles());
  if (h->count >= Buffer::kMaxHandles) return nullptr;
  return &h->items[h->count];
}
}  // namespace

Status Buffer::attach_fd(int fd) {
  os::UniqueFd owned(fd);
  if (!valid() || fd < 0) return fail(Errc::InvalidArgument, "Buffer::attach_fd: invalid");
  if (foreign_) return fail(Errc::InvalidArgument, detail::kHandlesCannotCrossHosts);
  detail::Handle* h = next_free_handle(handles_);
  if (h == nullptr) return fail(Errc::InvalidArgument, "Buffer::attach_fd: kMaxHandles reached");
  *h = detail::Handle{};
  h->meta.kind = static_cast<std::uint32_t>(shm::WireHandle::Fd);
  h->fd = std::move(owned);
  ++handles_->count;
  return {};
}

Status Buffer::attach(Channel&& end) {
  auto& ep = detail::ChannelAccess::ep(end);
  if (valid() && !ep && detail::ChannelAccess::remote(end))
    return fail(Errc::InvalidArgument, detail::kRemoteCannotMove);
  if (!valid() || !ep) return fail(Errc::InvalidArgument, "Buffer::attach: invalid");
  if (foreign_) return fail(Errc::InvalidArgument, detail::kHandlesCannotCrossHosts);
  if (ep.get() == ep_.get())
    return fail(Errc::InvalidArgument, "Buffer::attach: a channel end cannot carry itself");
  detail::Handle* h = next_free_handle(handles_);
  if (h == nullptr) return fail(Errc::InvalidArgument, "Buffer::attach: kMaxHandles reached");
  detail::Handle item;
  MBMQ_TRY(ep->export_end(&item.meta, &item.fd, &item.fd2, &item.bell));
  *h = std::move(item);
  ++handles_->count;
  end.close();  // the buffer's copies keep the connection open
  return {};
}

std::size_t Buffer::handle_count() const noexcept { return handles_ ? handles_->count : 0; }

HandleKind Buffer::handle_kind(std::size_t i) const noexcept {
  if (i >= handle_count()) return HandleKind::None;
  switch (static_cast<shm::WireHandle>(handles_->items[i].meta.kind)) {
    case shm::WireHandle::Fd:
      return HandleKind::Fd;
    case shm::WireHandle::ChannelEnd:
      return HandleKind::Channel;
    case shm::WireHandle::FileRange:
      return HandleKind::File;
  }
  return HandleKind::None;
}

Result<int> Buffer::take_fd(std::size_t i) {
  if (handle_kind(i) != HandleKind::Fd)
    return fail(Errc::InvalidArgument, "Buffer::take_fd: no fd there");
  detail::Handle& h = handles_->items[i];
  h.meta.kind = 0;
  return h.fd.release();
}

Result<Channel> Buffer::take_channel(std::size_t i) {
  if (handle_kind(i) != HandleKind::Channel)
    return fail(Errc::InvalidArgument, "Buffer::take_channel: no channel end there");
  detail::Handle& h = handles_->items[i];
  const shm::HandleMeta meta = h.meta;
  h.meta.kind = 0;
  // The wait policy is this process's choice, never the sender's.
  auto ep = MBMQ_TRY(detail::Endpoint::import_end(meta, std::move(h.fd), std::move(h.fd2),
                                                  std::move(h.bell), WaitPolicy{}));
  return detail::ChannelAccess::make(std::move(ep));
}

// ---- foreign buffers (ipc/foreign_buffer.h) -----------------------------------------------------

namespace detail {

Buffer ForeignAccess::make(std::shared_ptr<ForeignBuffer> owner, std::byte* data, std::size_t size,
                           std::size_t capacity, std::uint32_t id) noexcept {
  // valid() is data_ != nullptr: an empty message (no bytes, so no storage) is valid too.
  static std::byte empty[1];
  Buffer b;
  b.foreign_ = std::move(owner);
  b.data_ = data != nullptr ? data : empty;
  b.size_ = static_cast<std::uint32_t>(size);
  b.capacity_ = static_cast<std::uint32_t>(capacity);
  b.id_ = id;
  return b;
}

void ForeignAccess::set_bytes(Buffer& b, std::byte* data, std::size_t capacity) noexcept {
  static std::byte empty[1];
  b.data_ = data != nullptr ? data : empty;
  b.capacity_ = static_cast<std::uint32_t>(capacity);
}

}  // namespace detail

}  // namespace mbmq
