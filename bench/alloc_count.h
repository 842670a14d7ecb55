// bench/alloc_count.h: heap allocations counted by a replacement global operator new (in its own
// translation unit, alloc_count.cc, linked into this binary only).
#pragma once

#include <atomic>
#include <cstdint>

extern std::atomic<std::uint64_t> g_allocs;
