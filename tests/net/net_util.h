// tests/net/net_util.h: what the mbmq::net tests share.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "os/fd.h"
#include "os/process.h"

namespace mbmq::test {

// A pipe for a child to tell the parent a number (its port, "I got the request", a time).
struct Pipe {
  os::UniqueFd r, w;
  static Pipe make() {
    auto p = os::make_pipe();
    EXPECT_TRUE(p);
    return Pipe{std::move(p->first), std::move(p->second)};
  }
  void put(std::uint32_t v) const { (void)os::write_once(w.get(), &v, sizeof v); }
  // The number, or `on_error` if the writer closed the pipe (died) before writing one.
  std::uint32_t get(std::uint32_t on_error = 0) const {
    std::uint32_t v = 0;
    auto n = os::read_full(r.get(), std::as_writable_bytes(std::span(&v, 1)));
    return n && *n == sizeof v ? v : on_error;
  }
};

// The q-quantile (0..1, nearest rank) of v; 0 if v is empty.
inline double pct(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1,
                    static_cast<std::size_t>(q * static_cast<double>(v.size() - 1) + 0.5))];
}

}  // namespace mbmq::test
