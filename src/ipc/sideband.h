// ipc/sideband.h: Sideband, one end's control socket (P3, P3b, P4, P7b, P8 of src/shm/layout.h):
// its outbox, where every packet goes without blocking, and its inbox with the stashes of what
// arrived ahead of the descriptors that name it: extent memfds, replacement memfds, the peer's
// queue doorbell page, and handles. Each stash is bounded (the peer budget, docs/RELIABILITY.md):
// one extent and one replacement fd per extent id (a newer one closes the older), one doorbell,
// and handle packets sent ahead up to Limits.
//
// It parses and bounds what arrives; it does not judge an fd (Trust does, when its descriptor
// comes) nor what a full socket means (Endpoint does: that depends on the ring, see
// Endpoint::sent_locked). The caller (Endpoint) holds its mu_ for every call. Never blocks.
#pragma once

#include <array>
#include <cstdint>
#include <span>
#include <utility>
#include <vector>

#include "ipc/buffer_id.h"
#include "ipc/handles.h"
#include "ipc/queue_bell.h"
#include "mbmq/buffer.h"
#include "mbmq/result.h"
#include "os/fd.h"
#include "shm/layout.h"

namespace mbmq::detail {

// Handle fds a peer may have parked in our stash (sent ahead of the descriptors naming them).
inline constexpr std::uint32_t kMaxStashedHandleFds = 128;

// An fd received on the control socket, not yet used.
struct Stashed {
  os::UniqueFd fd;
  std::uint32_t gen = 0;
  bool sealed = false;  // announced with kExtentSealed (checked when used)
};

// A queue doorbell received (P4q), not yet checked (PeerBell::open does).
struct StashedBell {
  BellFds fds;
  std::uint32_t gen = 0;
  std::uint32_t slot = 0;
};

// Whose buffer a handles packet rides on: a message of the sender's, or the reply in ours.
enum class HandlesOf : std::uint8_t { Message, Reply };

class Sideband {
 public:
  struct Limits {
    std::uint32_t max_handles = 0;        // per packet: the channel's max_handles
    std::uint32_t max_ahead_packets = 0;  // handle packets not yet claimed by a descriptor
    std::uint32_t max_ahead_fds = kMaxStashedHandleFds;  // their fds
  };
  Sideband(os::UniqueFd control, Limits limits) noexcept;
  Sideband(const Sideband&) = delete;
  Sideband& operator=(const Sideband&) = delete;

  int fd() const noexcept { return control_.get(); }
  bool is_open() const noexcept { return static_cast<bool>(control_); }
  // Closes the socket (the peer sees a hang-up once no other process holds it).
  void close() noexcept { control_.reset(); }
  // The channel failed: no more reading, the peer sees the hang-up (P8), and what it parked here
  // goes now, not when the end is destroyed (the peer budget). Handles of descriptors already
  // accepted stay (their messages are still delivered).
  void fail_channel() noexcept;

  // ---- outbox: Errc::WouldBlock with nothing sent when the socket is full ----
  Status send(std::span<const std::byte> bytes, std::span<const int> fds);
  // (P3, P7b) An extent's memfd (aux: kExtentSealed, kExtentReplace).
  Status send_extent(std::uint32_t e, std::uint32_t gen, std::uint32_t aux, int fd);
  // (P4q) Our queue's doorbell, for slot q.
  Status send_doorbell(std::uint32_t gen, std::uint32_t q, std::span<const int> fds);
  // (P3b) The handles of buffer id at gen that are ours to send (not taken, not arrived with
  // it); false if there are none. Errc::InvalidArgument: more than max_handles.
  Result<bool> send_handles(BufferId id, std::uint32_t gen, HandlesOf of, const Handles& hs);
  // What send_handles() refuses whatever the socket does (more than max_handles), checked first:
  // a message's packets that go out before its handles are refused would have no descriptor
  // after them, and the peer reads packets only as far as a descriptor needs.
  Status check_handles(const Handles& hs) const;

  // ---- inbox ----
  enum class Read : std::uint8_t { Got, Nothing, Bad };
  // Reads one packet into the stashes. Nothing: none waiting, hung up (P8), or fail_channel()
  // was called. Bad: that packet was malformed or over budget (dropped); take_failure() says why.
  // The caller decides what a bad packet means: while the channel is open it fails it
  // (fail_channel()); after a hang-up the packets behind it are still read (what the peer queued
  // before it closed is still delivered).
  Read read_once();
  // Reads until have() holds or nothing is left: never further than needed (each packet is read
  // when its descriptor is), and at most 4 rings' worth per call. have(const Sideband&).
  template <class Pred>
  bool drain_until(Pred have) {
    for (std::uint32_t i = 0; !have(std::as_const(*this)); ++i)
      if (i >= 4 * shm::kRingCapacity || read_once() != Read::Got)
        return have(std::as_const(*this));
    return true;
  }
  // Why the last bad packet was bad (nullptr: none since the last call), and forgets it.
  const char* take_failure() noexcept { return std::exchange(failure_, nullptr); }

  bool has_extent(std::uint32_t e, std::uint32_t gen) const noexcept {
    return e < shm::kMaxExtents && extents_[e].fd && extents_[e].gen == gen;
  }
  Stashed take_extent(std::uint32_t e) noexcept { return std::move(extents_[e]); }
  bool has_replacement(std::uint32_t e, std::uint32_t gen) const noexcept {
    return e < shm::kMaxExtents && replacements_[e].fd && replacements_[e].gen == gen;
  }
  Stashed take_replacement(std::uint32_t e) noexcept { return std::move(replacements_[e]); }
  bool has_doorbell(std::uint32_t gen) const noexcept {
    return doorbell_.fds && doorbell_.gen == gen;
  }
  StashedBell take_doorbell() noexcept { return std::move(doorbell_); }
  const StashedBell& doorbell() const noexcept { return doorbell_; }
  void stash_doorbell(StashedBell bell) noexcept { doorbell_ = std::move(bell); }

  // (P3b) Handles: has_handles() once they arrived; claim_handles() when their descriptor is
  // accepted (no longer "sent ahead": off the budget); take_handles() hands a claimed set over.
  bool has_handles(BufferId id, std::uint32_t gen, HandlesOf of) const noexcept;
  void claim_handles(BufferId id, std::uint32_t gen, HandlesOf of) noexcept;
  HandlesPtr take_handles(BufferId id, std::uint32_t gen, HandlesOf of) noexcept;
  std::uint32_t ahead_fds() const noexcept { return ahead_fds_; }

  // Why this end cannot move to another process (fds stashed ahead of their descriptors cannot
  // travel), or nullptr. The doorbell can: it has no descriptor.
  const char* busy() const noexcept;

 private:
  struct StashedHandles {
    BufferId id;
    std::uint32_t gen = 0;
    HandlesOf of = HandlesOf::Message;
    std::uint32_t fds = 0;
    bool claimed = false;  // its descriptor was accepted: waits for take_handles()
    HandlesPtr h;
  };
  Read bad(const char* why) noexcept {
    failure_ = why;
    return Read::Bad;
  }
  Read read_handles(const shm::CtlMsg& m, const shm::HandleMeta* meta, std::size_t bytes,
                    std::span<os::UniqueFd> fds, std::size_t nfds);
  StashedHandles* find_handles(BufferId id, std::uint32_t gen, HandlesOf of, bool claimed);

  os::UniqueFd control_;
  const Limits limits_;
  const char* failure_ = nullptr;  // why the last bad packet was bad, until take_failure()
  bool stopped_ = false;           // fail_channel(): nothing more is read
  std::array<Stashed, shm::kMaxExtents> extents_{};
  std::array<Stashed, shm::kMaxExtents> replacements_{};  // (P7b)
  StashedBell doorbell_;
  std::vector<StashedHandles> handles_;
  std::uint32_t ahead_fds_ = 0;      // fds in unclaimed handle packets (<= max_ahead_fds)
  std::uint32_t ahead_packets_ = 0;  // unclaimed handle packets (<= max_ahead_packets)
};

}  // namespace mbmq::detail
