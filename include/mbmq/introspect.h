// mbmq/introspect.h: live introspection (#18). A process's listeners answer stat queries on their
// rendezvous socket (docs/design/introspection.md): an outside reader the listener's AccessPolicy
// admits gets the listener's counters and one record per live channel. `mbmq ls`, `mbmq stat` and
// `mbmq top` are built on these two calls.
//
//   auto names = MBMQ_TRY(mbmq::listener_names());            // from /proc/net/unix
//   mbmq::StatSnapshot s = MBMQ_TRY(mbmq::query_stats("echo", mbmq::StatChannels::Yes,
//                                                     mbmq::Deadline::after(1s)));
//
// Visibility: counters are read with relaxed loads while their owners run: each number was true at
// some instant of the query; two numbers may be from slightly different instants. After the
// traffic stops, they are exact.
// The records are also the wire format (fixed layout, host order, static_asserted).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "mbmq/deadline.h"
#include "mbmq/export.h"
#include "mbmq/result.h"

namespace mbmq {

// (Q4) Written by the watcher thread into a private buffer, sent once; never shared memory.
struct ListenerStat {
  std::uint64_t magic;  // kStatMagic
  std::uint32_t version;
  std::uint16_t header_size;   // sizeof(ListenerStat)
  std::uint16_t channel_size;  // sizeof(ChannelStat)
  std::int32_t pid;
  std::uint32_t uid;
  std::uint32_t max_connections;
  std::uint32_t total_channels;  // channels in the registry now (live server ends)
  std::uint32_t first_channel;   // index of the first record in this reply
  std::uint32_t channels;        // records that follow
  std::uint64_t accepted, refused_policy, refused_version, refused_limit, refused_busy, failed,
      live, fd_backoffs, queries, queries_dropped;
  std::uint32_t last_refused_uid;  // ~0u: none yet
  std::int32_t last_refused_pid;
  // Totals over every server end of this listener, live and retired (live ones at query time).
  std::uint64_t requests_in, requests_out, replies_in, replies_out, oneway_in, oneway_out,
      no_reply_in, no_reply_out, bytes_in, bytes_out, peer_closed, protocol;
  std::int64_t uptime_ns;
  char name[108];     // NUL-padded, truncated
  char policy[64];    // AccessPolicy, e.g. "own uid" or "uids 1000,1001 gids 27"
  char last_why[96];  // the last protocol error's why ("" if none)
};
static_assert(std::is_standard_layout_v<ListenerStat> &&
              std::is_trivially_copyable_v<ListenerStat>);
static_assert(sizeof(ListenerStat) == 504 && offsetof(ListenerStat, name) == 232);

enum class ChannelState : std::uint8_t { Open = 0, PeerClosed = 1, Protocol = 2, Closed = 3 };

struct ChannelStat {
  std::uint64_t id;  // registry sequence number, stable for the channel's life
  std::int32_t peer_pid;
  std::uint32_t peer_uid;
  std::uint8_t trust;      // mbmq::Trust of this (server) end
  std::uint8_t wait_mode;  // mbmq::WaitMode
  std::uint8_t state;      // ChannelState
  std::uint8_t reserved;
  std::uint32_t ring_out;  // descriptors in our outbound ring not yet taken (clamped)
  std::uint64_t wait_spin_ns;
  std::uint64_t requests_in, requests_out, replies_in, replies_out, oneway_in, oneway_out,
      returns_in, returns_out, no_reply_in, no_reply_out, bytes_in, bytes_out;
  std::uint32_t ring_in;           // descriptors in our inbound ring not yet taken (clamped)
  std::uint32_t slots_in_use;      // our pool slots not free
  std::uint32_t requests_held;     // the peer's requests we hold (in flight here)
  std::uint32_t requests_out_now;  // our requests not yet answered
  std::uint32_t extents_in_use;    // our extents not free
  std::uint32_t reserved2;
  std::int64_t idle_ns;  // how long the message total has not moved; -1: unknown (first look)
  char why[96];          // the protocol error's why, if state is Protocol
};
static_assert(std::is_standard_layout_v<ChannelStat> && std::is_trivially_copyable_v<ChannelStat>);
static_assert(sizeof(ChannelStat) == 256 && offsetof(ChannelStat, why) == 160);

enum class StatChannels : std::uint8_t { No, Yes };

struct StatSnapshot {
  ListenerStat listener{};
  std::vector<ChannelStat> channels;  // empty with StatChannels::No
};

// Asks the listener called `name` (every page of channel records with StatChannels::Yes).
// Errc::PeerClosed: no such listener; Errc::Refused: its AccessPolicy refused us; Errc::TimedOut
// at the deadline; Errc::Protocol: the answer was not a stat reply of this version.
MBMQ_EXPORT Result<StatSnapshot> query_stats(std::string_view name, StatChannels channels,
                                             Deadline deadline);
// The names of the listening mbmq sockets on this machine (this network namespace), from
// /proc/net/unix, sorted, without duplicates. Whether the caller may query each is not known.
MBMQ_EXPORT Result<std::vector<std::string>> listener_names();

}  // namespace mbmq
