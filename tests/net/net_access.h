// tests/net/net_access.h: diagnostics only. Private members of mbmq::net's classes for the review
// tests, through the explicit instantiation rule (access is not checked in the template argument
// of one): `obj.*get(test::EpOf{})` and the like, or test::core_of(channel).
#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <vector>

#include "mbmq/net.h"
#include "net/core.h"

namespace mbmq::test {
namespace {  // internal linkage: one instantiation per test program

template <typename Tag, typename Tag::type M>
struct Rob {
  friend typename Tag::type get(Tag) { return M; }
};
// The same with the member's type deduced (ChannelCore's private Outstanding need not be named).
template <typename Tag, auto M>
struct RobAuto {
  friend auto get(Tag) { return M; }
};
// The credit this end has taken (F2) and its outstanding requests (R1).
struct OutMsgsOf {
  friend auto get(OutMsgsOf);
};
template struct RobAuto<OutMsgsOf, &net::detail::ChannelCore::out_msgs_>;
struct OutBytesOf {
  friend auto get(OutBytesOf);
};
template struct RobAuto<OutBytesOf, &net::detail::ChannelCore::out_bytes_>;
struct RequestsOf {
  friend auto get(RequestsOf);
};
template struct RobAuto<RequestsOf, &net::detail::ChannelCore::requests_>;
struct CoreOf {
  using type = std::shared_ptr<net::detail::ChannelCore> net::Channel::*;
  friend type get(CoreOf);
};
template struct Rob<CoreOf, &net::Channel::core_>;
struct ListenCoreOf {
  using type = std::shared_ptr<net::detail::ListenCore> net::Listener::*;
  friend type get(ListenCoreOf);
};
template struct Rob<ListenCoreOf, &net::Listener::core_>;
struct GraveyardOf {  // under the listener's worker's mu
  using type = std::vector<std::shared_ptr<net::detail::ChannelCore>> net::detail::ListenCore::*;
  friend type get(GraveyardOf);
};
template struct Rob<GraveyardOf, &net::detail::ListenCore::graveyard_>;
struct EpOf {
  using type = ucp_ep_h net::detail::ChannelCore::*;
  friend type get(EpOf);
};
template struct Rob<EpOf, &net::detail::ChannelCore::ep_>;
struct TxPendingOf {
  using type = std::uint32_t net::detail::ChannelCore::*;
  friend type get(TxPendingOf);
};
template struct Rob<TxPendingOf, &net::detail::ChannelCore::tx_pending_>;
struct TxStalledOf {
  using type = bool net::detail::ChannelCore::*;
  friend type get(TxStalledOf);
};
template struct Rob<TxStalledOf, &net::detail::ChannelCore::tx_stalled_>;
struct TxWindowWaitersOf {
  using type = std::uint32_t net::detail::ChannelCore::*;
  friend type get(TxWindowWaitersOf);
};
template struct Rob<TxWindowWaitersOf, &net::detail::ChannelCore::tx_window_waiters_>;
struct TxBytesOf {
  using type = std::uint64_t net::detail::ChannelCore::*;
  friend type get(TxBytesOf);
};
template struct Rob<TxBytesOf, &net::detail::ChannelCore::tx_bytes_>;
struct VecsOf {
  using type = std::vector<std::vector<std::byte>> net::detail::Spares::*;
  friend type get(VecsOf);
};
template struct Rob<VecsOf, &net::detail::Spares::v_>;
struct BytesOf {
  using type = std::size_t net::detail::Spares::*;
  friend type get(BytesOf);
};
template struct Rob<BytesOf, &net::detail::Spares::bytes_>;
struct InboxOf {
  using type = std::deque<net::Message> net::detail::ChannelCore::*;
  friend type get(InboxOf);
};
template struct Rob<InboxOf, &net::detail::ChannelCore::inbox_>;

// The channel's core (null once closed).
inline std::shared_ptr<net::detail::ChannelCore>& core_of(net::Channel& c) {
  return c.*get(CoreOf{});
}
// Its worker's spares, and what they keep (unlocked reads: call them while the spares are idle).
inline std::shared_ptr<net::detail::Spares> spares_of(net::Channel& c) {
  return core_of(c)->w_->spares;
}
inline std::vector<std::size_t> capacities(const net::detail::Spares& s) {
  std::vector<std::size_t> caps;
  for (const auto& v : s.*get(VecsOf{})) caps.push_back(v.capacity());
  return caps;
}
inline std::size_t held_bytes(const net::detail::Spares& s) { return s.*get(BytesOf{}); }
// Messages in a channel's inbox, received or being received (under its worker's mu).
inline std::size_t inbox_size(net::detail::ChannelCore& c) { return (c.*get(InboxOf{})).size(); }

}  // namespace
}  // namespace mbmq::test
