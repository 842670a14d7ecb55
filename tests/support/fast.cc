#include "support/fast.h"

#include <cstring>
#include <random>

namespace mbmq::test {

std::uint64_t fnv1a(std::span<const std::byte> d, std::uint64_t h) {
  for (std::byte b : d) h = (h ^ static_cast<std::uint64_t>(b)) * kFnvPrime;
  return h;
}

std::uint64_t fnv8(std::span<const std::byte> d, std::uint64_t h) {
  std::size_t i = 0;
  for (; i + 8 <= d.size(); i += 8) {
    std::uint64_t w;
    std::memcpy(&w, d.data() + i, 8);
    h = (h ^ w) * kFnvPrime;
  }
  for (; i < d.size(); ++i) h = (h ^ static_cast<std::uint64_t>(d[i])) * kFnvPrime;
  return h;
}

void fill_file_bytes(std::span<std::byte> d, std::uint64_t first) {
  for (std::size_t j = 0; j < d.size(); ++j) d[j] = file_byte(first + j);
}

void add_to_each(std::span<std::byte> d, unsigned k) {
  for (auto& x : d) x = static_cast<std::byte>(static_cast<unsigned>(x) + k);
}

void fill_repeating(std::span<std::byte> d, std::span<const std::byte> row) {
  for (std::size_t i = 0; i < d.size(); ++i) d[i] = row[i % row.size()];
}

std::size_t mismatches_repeating(std::span<const std::byte> d, std::span<const std::byte> row,
                                 unsigned k) {
  std::size_t bad = 0;
  for (std::size_t i = 0; i < d.size(); ++i)
    bad += d[i] != static_cast<std::byte>(static_cast<unsigned>(row[i % row.size()]) + k);
  return bad;
}

// std::mt19937's parameters over std::uint32_t, not std::uint_fast32_t: the same outputs (w = 32),
// another type. std::mt19937's out-of-line members are also instantiated in the test files, and
// the linker keeps the first copy it sees, theirs: -O0 in the ASan build.
using Mt19937 =
    std::mersenne_twister_engine<std::uint32_t, 32, 624, 397, 31, 0x9908b0df, 11, 0xffffffff, 7,
                                 0x9d2c5680, 15, 0xefc60000, 18, 1812433253>;

void fill_mt19937(std::span<std::byte> d, std::uint32_t seed) {
  Mt19937 rng(seed);
  for (auto& b : d) b = static_cast<std::byte>(rng());
}

}  // namespace mbmq::test
