// os/mapping.h: Mapping, the move-only owner of an mmap'd range (unmapped on destruction).
#pragma once

#include <cstddef>
#include <utility>

#include "mbmq/result.h"

namespace mbmq::os {

enum class Access { ReadWrite, ReadOnly };

class Mapping {
 public:
  Mapping() noexcept = default;
  // Maps `size` bytes of `fd` from offset 0, MAP_SHARED (both peers see the same pages).
  static Result<Mapping> map_shared(int fd, std::size_t size, Access access);

  Mapping(Mapping&& o) noexcept
      : addr_(std::exchange(o.addr_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  Mapping& operator=(Mapping&& o) noexcept {
    if (this != &o) {
      reset();
      addr_ = std::exchange(o.addr_, nullptr);
      size_ = std::exchange(o.size_, 0);
    }
    return *this;
  }
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  ~Mapping() { reset(); }

  std::byte* data() const noexcept { return static_cast<std::byte*>(addr_); }
  std::size_t size() const noexcept { return size_; }
  bool valid() const noexcept { return addr_ != nullptr; }
  void reset() noexcept;

 private:
  void* addr_ = nullptr;
  std::size_t size_ = 0;
};

}  // namespace mbmq::os
