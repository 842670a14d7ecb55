// The reader's side of a stat query (#18): steps (Q1)-(Q4) of docs/design/introspection.md, and
// the listing of listener names from /proc/net/unix. Used by `mbmq ls`, `mbmq stat`, `mbmq top`.
#include "mbmq/introspect.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "ipc/rendezvous_wire.h"
#include "ipc/stat_wire.h"
#include "os/fd.h"
#include "os/file.h"
#include "os/unix_socket.h"

namespace mbmq {

namespace {

using detail::kStatChannelsPerReply;
using detail::kStatMagic;
using detail::kStatVersion;
using detail::kStatWantChannels;
using detail::StatQuery;

constexpr std::string_view kPrefix = "mbmq:";
// Channel records one query_stats() keeps at most (16 MiB): a listener claiming more (a hostile one
// may claim 2^32) is shown its first ones.
constexpr std::size_t kStatMaxChannels = std::size_t{1} << 16;

std::int64_t timeout_of(Deadline d) {
  return d.is_never() ? -1 : std::max<std::int64_t>(d.remaining_ns(), 0);
}

// (Q1)-(Q4) One page: the listener's record and up to kStatChannelsPerReply channels from `first`.
Result<std::size_t> query_page(std::string_view name, std::uint32_t first, bool channels,
                               Deadline deadline, std::vector<std::byte>* buf) {
  os::UniqueFd sock =
      MBMQ_TRY(os::connect_abstract(detail::socket_name(name), timeout_of(deadline)));
  const os::PeerCred cred = MBMQ_TRY(os::peer_cred(sock.get()));
  auto sent = detail::send_plain(sock.get(),
                                 StatQuery{kStatMagic, first, channels ? kStatWantChannels : 0u});
  // PeerClosed: refused at accept (R2) and closed; its verdict is still to be read.
  if (!sent && sent.error().code != Errc::PeerClosed) return fail(sent.error());
  for (int attempt = 0; attempt < 2; ++attempt) {  // a reset may come once before the verdict
    bool ready = MBMQ_TRY(os::wait_readable(sock.get(), timeout_of(deadline)));
    if (!ready) return fail(Errc::TimedOut, "stat: no answer from the listener");
    std::array<os::UniqueFd, 1> fds;
    auto r = os::recv_msg(sock.get(), *buf, fds, os::Blocking::No);
    if (!r) {
      if (r.error().code == Errc::PeerClosed) continue;
      return fail(r.error());
    }
    if (r->bytes == 0) return fail(Errc::PeerClosed, "stat: the listener closed without answer");
    if (r->truncated || r->nfds != 0) return fail(Errc::Protocol, "stat: reply");
    if (r->bytes == sizeof(detail::VerdictMsg)) {
      detail::VerdictMsg v{};
      std::memcpy(&v, buf->data(), sizeof v);
      if (v.magic == detail::kVerdictMagic &&
          v.verdict == static_cast<std::uint32_t>(detail::Verdict::RefusedPolicy))
        return fail(Errc::Refused, "stat: the listener's access policy refused this uid");
      if (v.magic == detail::kVerdictMagic)
        return fail(Errc::Busy, "stat: the listener is busy (handshake slots, fds)");
    }
    if (r->bytes < sizeof(ListenerStat)) return fail(Errc::Protocol, "stat: reply too short");
    ListenerStat head{};
    std::memcpy(&head, buf->data(), sizeof head);
    if (head.magic != kStatMagic || head.version != kStatVersion ||
        head.header_size != sizeof(ListenerStat) || head.channel_size != sizeof(ChannelStat) ||
        head.channels > kStatChannelsPerReply ||
        r->bytes != sizeof(ListenerStat) + head.channels * sizeof(ChannelStat))
      return fail(Errc::Protocol, "stat: reply of another version or size");
    // The kernel's word on who answered, not the reply's.
    head.pid = cred.pid;
    head.uid = cred.uid;
    std::memcpy(buf->data(), &head, sizeof head);
    return r->bytes;
  }
  return fail(Errc::PeerClosed, "stat: the listener closed without answer");
}

}  // namespace

Result<StatSnapshot> query_stats(std::string_view name, StatChannels channels, Deadline deadline) {
  StatSnapshot out;
  std::vector<std::byte> buf(sizeof(ListenerStat) + kStatChannelsPerReply * sizeof(ChannelStat));
  std::uint32_t first = 0;
  for (;;) {
    MBMQ_TRY(query_page(name, first, channels == StatChannels::Yes, deadline, &buf));
    ListenerStat head{};
    std::memcpy(&head, buf.data(), sizeof head);
    if (first == 0) out.listener = head;
    for (std::uint32_t i = 0; i < head.channels; ++i) {
      ChannelStat c{};
      std::memcpy(&c, buf.data() + sizeof(ListenerStat) + i * sizeof(ChannelStat), sizeof c);
      c.why[sizeof c.why - 1] = 0;
      out.channels.push_back(c);
    }
    out.listener.name[sizeof out.listener.name - 1] = 0;
    out.listener.policy[sizeof out.listener.policy - 1] = 0;
    out.listener.last_why[sizeof out.listener.last_why - 1] = 0;
    // Pages until the registry is covered (channels that come and go meanwhile may be missed or
    // seen twice: a monitor's view). The reply's numbers are the listener's word, not trusted:
    // a page must start where asked, the sum is taken in 64 bits (no wrap), and at most
    // kStatMaxChannels records are kept, whatever total_channels claims.
    if (channels == StatChannels::No || head.channels == 0) return out;
    if (head.first_channel != first)
      return fail(Errc::Protocol, "stat: a page that does not start where asked");
    const std::uint64_t next = std::uint64_t{first} + head.channels;
    if (next >= head.total_channels || out.channels.size() >= kStatMaxChannels) return out;
    first = static_cast<std::uint32_t>(next);
  }
}

Result<std::vector<std::string>> listener_names() {
  os::UniqueFd f = MBMQ_TRY(os::open_read("/proc/net/unix"));
  std::string text;
  std::vector<std::byte> chunk(std::size_t{64} * 1024);
  for (;;) {
    std::size_t n = MBMQ_TRY(os::read_some(f.get(), chunk));
    if (n == 0) break;
    text.append(reinterpret_cast<const char*>(chunk.data()), n);
  }
  // "Num RefCount Protocol Flags Type St Inode Path": a listening socket has flag 00010000
  // (__SO_ACCEPTCON); an abstract name is shown with a leading '@'.
  std::vector<std::string> names;
  std::size_t at = text.find('\n');
  while (at != std::string::npos && at + 1 < text.size()) {
    const std::size_t end = std::min(text.find('\n', at + 1), text.size());
    const std::string_view line(text.data() + at + 1, end - at - 1);
    at = end < text.size() ? end : std::string::npos;
    const std::size_t path = line.find(" @");
    if (path == std::string_view::npos) continue;
    const std::string_view name = line.substr(path + 2);
    if (name.substr(0, kPrefix.size()) != kPrefix) continue;
    if (line.find(" 00010000 ") == std::string_view::npos) continue;
    names.emplace_back(name.substr(kPrefix.size()));
  }
  std::sort(names.begin(), names.end());
  names.erase(std::unique(names.begin(), names.end()), names.end());
  return names;
}

}  // namespace mbmq
