// ListenCore's side of a stat query (#18): steps (Q3)-(Q4) of docs/design/introspection.md, run
// by the watcher thread, never waiting on the querier.
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "ipc/endpoint.h"
#include "ipc/listener_core.h"
#include "ipc/stat_wire.h"
#include "os/mutex.h"
#include "os/process.h"
#include "os/unix_socket.h"

namespace mbmq::detail {

namespace {

template <std::size_t N>
void copy_text(char (&to)[N], std::string_view from) noexcept {
  const std::size_t n = std::min(from.size(), N - 1);
  std::memcpy(to, from.data(), n);
  std::memset(to + n, 0, N - n);
}

// "own uid", "any", or "own uid + uids 1000,1001 + gids 27" (truncated to the field).
void describe_policy(const AccessPolicy& p, char (&to)[64]) noexcept {
  if (p.allow_any) {
    copy_text(to, "any uid");
    return;
  }
  char text[64] = "own uid";
  std::size_t at = std::strlen(text);
  auto add = [&](const char* what, const std::vector<unsigned>& ids) {
    if (ids.empty()) return;
    int n = std::snprintf(text + at, sizeof text - at, " + %s", what);
    if (n > 0) at = std::min(sizeof text - 1, at + static_cast<std::size_t>(n));
    for (std::size_t i = 0; i < ids.size(); ++i) {
      n = std::snprintf(text + at, sizeof text - at, "%s%u", i == 0 ? " " : ",", ids[i]);
      if (n > 0) at = std::min(sizeof text - 1, at + static_cast<std::size_t>(n));
    }
  };
  add("uids", p.allow_uids);
  add("gids", p.allow_gids);
  copy_text(to, text);
}

}  // namespace

void ListenCore::register_end(const std::shared_ptr<Endpoint>& ep, int pid, unsigned uid) noexcept {
  os::LockGuard lock(mu_);
  if (registry_.size() >= prune_at_) {
    std::erase_if(registry_, [](const Registered& r) { return r.ep.expired(); });
    prune_at_ = std::max<std::size_t>(64, 2 * registry_.size());
  }
  try {
    registry_.push_back(Registered{ep, next_id_++, pid, uid, 0, -1});
  } catch (const std::bad_alloc&) {
    // Out of memory: the channel works, only a stat query will not list it.
  }
}

void ListenCore::fill_listener_stat(ListenerStat* out) const noexcept {
  constexpr auto r = std::memory_order_relaxed;  // a monitor's read (Counters)
  const Counters& c = *counters_;
  out->magic = kStatMagic;
  out->version = kStatVersion;
  out->header_size = sizeof(ListenerStat);
  out->channel_size = sizeof(ChannelStat);
  out->pid = os::current_pid();
  out->uid = os::current_uid();
  out->max_connections = max_connections_;
  out->accepted = c.accepted.load(r);
  out->refused_policy = c.refused_policy.load(r);
  out->refused_version = c.refused_version.load(r);
  out->refused_limit = c.refused_limit.load(r);
  out->refused_busy = c.refused_busy.load(r);
  out->failed = c.failed.load(r);
  out->live = c.live.load(r);
  out->fd_backoffs = c.fd_backoffs.load(r);
  out->queries = c.queries.load(r);
  out->queries_dropped = c.queries_dropped.load(r);
  out->last_refused_uid = c.last_refused_uid.load(r);
  out->last_refused_pid = c.last_refused_pid.load(r);
  const ListenTotals& t = c.totals;
  using shm::DescKind;
  auto k = [](DescKind d) { return static_cast<std::size_t>(d); };
  out->requests_in = t.in[k(DescKind::Request)].load(r);
  out->requests_out = t.out[k(DescKind::Request)].load(r);
  out->replies_in = t.in[k(DescKind::Reply)].load(r);
  out->replies_out = t.out[k(DescKind::Reply)].load(r);
  out->oneway_in = t.in[k(DescKind::OneWay)].load(r);
  out->oneway_out = t.out[k(DescKind::OneWay)].load(r);
  out->no_reply_in = t.no_reply_in.load(r);
  out->no_reply_out = t.no_reply_out.load(r);
  out->bytes_in = t.bytes_in.load(r);
  out->bytes_out = t.bytes_out.load(r);
  out->peer_closed = t.peer_closed.load(r);
  out->protocol = t.protocol.load(r);
  out->uptime_ns = monotonic_ns() - start_ns_;
  copy_text(out->name, name_);
  describe_policy(options_.access, out->policy);
  const char* why = t.last_why.load(r);
  copy_text(out->last_why, why != nullptr ? why : "");
}

void ListenCore::answer_query(os::UniqueFd conn, const StatQuery& q) noexcept {
  counters_->queries.fetch_add(1, std::memory_order_relaxed);
  // At most one reply's worth, allocated for the time of one send (docs/design/introspection.md).
  std::vector<std::byte> reply;
  try {
    reply.resize(sizeof(ListenerStat) + kStatChannelsPerReply * sizeof(ChannelStat));
  } catch (const std::bad_alloc&) {
    counters_->queries_dropped.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  ListenerStat head{};
  fill_listener_stat(&head);
  // Live ends: their counters are not in the totals yet (they are added when an end retires).
  // The ends are held (shared_ptr) while read, outside mu_; one that is dropped by its owner
  // meanwhile is destroyed here, on the watcher thread, as a hang-up's can be.
  std::vector<std::shared_ptr<Endpoint>> ends;
  std::vector<std::size_t> slots;
  std::uint32_t total = 0;
  const std::int64_t now = monotonic_ns();
  try {
    os::LockGuard lock(mu_);
    ends.reserve(registry_.size());
    for (std::size_t i = 0; i < registry_.size(); ++i) {
      if (auto ep = registry_[i].ep.lock()) {
        ends.push_back(std::move(ep));
        slots.push_back(i);
      }
    }
  } catch (const std::bad_alloc&) {
    counters_->queries_dropped.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  total = static_cast<std::uint32_t>(ends.size());
  std::uint32_t n = 0;
  std::byte* at = reply.data() + sizeof(ListenerStat);
  for (std::uint32_t i = 0; i < total; ++i) {
    ChannelStat ch{};
    ends[i]->fill_stat(&ch);
    // A closed end was retired (close_local): its counts are in the totals already, though its
    // object lives on (a Channel closed but not destroyed, a Buffer taken from it).
    if (ch.state != static_cast<std::uint8_t>(ChannelState::Closed)) {
      head.requests_in += ch.requests_in;
      head.requests_out += ch.requests_out;
      head.replies_in += ch.replies_in;
      head.replies_out += ch.replies_out;
      head.oneway_in += ch.oneway_in;
      head.oneway_out += ch.oneway_out;
      head.no_reply_in += ch.no_reply_in;
      head.no_reply_out += ch.no_reply_out;
      head.bytes_in += ch.bytes_in;
      head.bytes_out += ch.bytes_out;
    }
    const bool wanted =
        (q.flags & kStatWantChannels) != 0 && i >= q.first_channel && n < kStatChannelsPerReply;
    const std::uint64_t msgs = ends[i]->message_total();
    {
      os::LockGuard lock(mu_);
      // The registry changes only on the watcher thread (register_end() from finish()), which
      // is this one: the index taken above still names this end.
      if (slots[i] >= registry_.size()) continue;
      Registered* r = &registry_[slots[i]];
      if (r->seen_ns < 0 || r->seen_total != msgs) {
        ch.idle_ns = r->seen_ns < 0 ? -1 : 0;
        r->seen_total = msgs;
        r->seen_ns = now;
      } else {
        ch.idle_ns = now - r->seen_ns;
      }
      ch.id = r->id;
      ch.peer_pid = r->pid;
      ch.peer_uid = r->uid;
    }
    if (wanted) {
      std::memcpy(at, &ch, sizeof ch);
      at += sizeof ch;
      ++n;
    }
  }
  ends.clear();  // before the send: nothing of ours is held while the querier reads
  head.total_channels = total;
  head.first_channel = q.first_channel;
  head.channels = n;
  std::memcpy(reply.data(), &head, sizeof head);
  // (Q4) One message, MSG_DONTWAIT: it fits a fresh socket's empty send buffer; if not (or the
  // querier is gone), the reply is dropped, and the connection closed on return.
  const std::size_t bytes = sizeof(ListenerStat) + n * sizeof(ChannelStat);
  if (!os::send_msg(conn.get(), {reply.data(), bytes}, {}, os::Blocking::No))
    counters_->queries_dropped.fetch_add(1, std::memory_order_relaxed);
}

}  // namespace mbmq::detail
