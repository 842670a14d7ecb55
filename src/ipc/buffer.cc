// Buffer: a handle; every state change goes through its Endpoint.
#include "mbmq/buffer.h"

#include "ipc/endpoint.h"

namespace mbmq {

Buffer::Buffer(Buffer&& o) noexcept
    : ep_(std::move(o.ep_)),
      data_(std::exchange(o.data_, nullptr)),
      size_(std::exchange(o.size_, 0)),
      capacity_(std::exchange(o.capacity_, 0)),
      id_(o.id_),
      gen_(o.gen_),
      origin_(std::exchange(o.origin_, Origin::None)),
      kind_(o.kind_) {}

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
  }
  return *this;
}

Buffer::~Buffer() { reset(); }

void Buffer::reset() noexcept {
  if (ep_ && origin_ != Origin::None) ep_->release(*this);
  ep_.reset();
  data_ = nullptr;
  size_ = capacity_ = 0;
  origin_ = Origin::None;
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
  return ep_->grow(*this, n);
}

}  // namespace mbmq
