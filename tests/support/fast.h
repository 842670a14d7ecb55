// Loops the tests run over megabytes of payload, in a library of their own built at the build's
// optimisation: the ASan build compiles the test files -O0 (tests/CMakeLists.txt), where these
// byte-at-a-time loops were 5-20 times slower than at -O1.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

namespace mbmq::test {

inline constexpr std::uint64_t kFnvOffset = 1469598103934665603ull;
inline constexpr std::uint64_t kFnvPrime = 1099511628211ull;

// FNV-1a, a byte a step.
std::uint64_t fnv1a(std::span<const std::byte> d, std::uint64_t h = kFnvOffset);

// FNV-style, 8 bytes a step (the tail a byte a step): hashing a sequence in pieces gives the same
// result as in one go when every piece but the last is a multiple of 8 bytes long.
std::uint64_t fnv8(std::span<const std::byte> d, std::uint64_t h = kFnvOffset);

// Byte i of file_test's files: position-dependent, so a shifted or reordered range fails.
inline std::byte file_byte(std::uint64_t i) {
  return static_cast<std::byte>((i * 2654435761u) >> 13);
}
// d[j] = file_byte(first + j).
void fill_file_bytes(std::span<std::byte> d, std::uint64_t first);

// d[i] += k (mod 256) for every byte: the net tests' answer to a call.
void add_to_each(std::span<std::byte> d, unsigned k);

// d[i] = row[i % row.size()] (row not empty).
void fill_repeating(std::span<std::byte> d, std::span<const std::byte> row);
// How many i have d[i] != row[i % row.size()] + k (mod 256) (row not empty).
std::size_t mismatches_repeating(std::span<const std::byte> d, std::span<const std::byte> row,
                                 unsigned k = 0);

// Each byte the low byte of the next output of std::mt19937(seed): hostile_test's garbage.
// (Hostile.ScribbleIsStdMt19937 checks.) A template a test file also uses is no faster here: the
// linker may keep the test file's copy of its out-of-line members (see fast.cc).
void fill_mt19937(std::span<std::byte> d, std::uint32_t seed);

}  // namespace mbmq::test
