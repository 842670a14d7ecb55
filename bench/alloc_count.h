// bench/alloc_count.h: heap allocations counted by a replacement global operator new (in its own
// translation unit, alloc_count.cc, linked into this binary only).
#pragma once

#include <atomic>
#include <cstdint>

extern std::atomic<std::uint64_t> g_allocs;  // every thread
// The calling thread's allocations only (a library's background thread, e.g. iceoryx's
// keep-alive, must not be charged to the round trips measured on this one).
std::uint64_t allocs_this_thread() noexcept;
