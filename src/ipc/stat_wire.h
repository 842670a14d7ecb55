// ipc/stat_wire.h: the stat query of live introspection (#18), steps (Q1)-(Q4) of
// docs/design/introspection.md. A reader connects to a listener's rendezvous socket like a client
// (Q1), passes its AccessPolicy (Q2), sends a StatQuery where a client sends its Hello (Q3), and
// gets one SEQPACKET message back (Q4): a ListenerStat, then ListenerStat::channels ChannelStat
// records. Host byte order (the reader is on the same machine); the version and record sizes are
// checked.
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "mbmq/introspect.h"

namespace mbmq::detail {

using mbmq::ChannelStat;
using mbmq::ListenerStat;

inline constexpr std::uint64_t kStatMagic = 0x5441'5453'514d'424dull;  // "MBMQSTAT"
inline constexpr std::uint32_t kStatVersion = 1;
inline constexpr std::uint32_t kStatWantChannels = 1;  // StatQuery::flags; other bits must be 0
// Channel records per reply: the reply stays < 66 KiB, under a fresh socket's send buffer.
inline constexpr std::uint32_t kStatChannelsPerReply = 256;

// (Q3) Same size as Hello: read by the same non-blocking recv.
struct StatQuery {
  std::uint64_t magic;          // kStatMagic
  std::uint32_t first_channel;  // index of the first channel record wanted
  std::uint32_t flags;          // kStatWantChannels
};
static_assert(std::is_standard_layout_v<StatQuery> && sizeof(StatQuery) == 16);

static_assert(sizeof(ListenerStat) + kStatChannelsPerReply * sizeof(ChannelStat) <
              std::size_t{66} * 1024);

}  // namespace mbmq::detail
