// ipc/peer_trust.h: PeerTrust, what one end does about a peer it does not trust, and what it owes a
// peer that does not trust it (P3c, P4, P5b, P7b of src/shm/layout.h):
//   - the seal checks on every memfd a peer sends (extents, replacements): sealed against
//     shrinking, immutable if announced so, a sane size; mapped copy-on-write if immutable (a
//     queue's doorbell is checked by PeerBell, ipc/queue_bell.h);
//   - the private copies an untrusted end reads (slot shadows, extent shadows) and writes back;
//   - sealing what goes to an untrusted peer above copy_threshold (through a fresh memfd when the
//     old one cannot be sealed), and the replacement memfds that carry such answers back (P7b).
// It works on the BufferTable's entries and the segment; the caller (Endpoint) holds its mu_. The
// control socket is not its business: it makes and checks memfds, the caller sends and receives.
#pragma once

#include <cstdint>
#include <memory>

#include "ipc/buffer_table.h"
#include "mbmq/buffer.h"
#include "mbmq/result.h"
#include "os/fd.h"
#include "os/mapping.h"
#include "shm/segment.h"

namespace mbmq::detail {

class PeerTrust {
 public:
  // side: the end this is for; the segment's untrusted_mask and copy_threshold say the rest.
  PeerTrust(const shm::Segment& seg, int side, BufferTable& table);
  PeerTrust(const PeerTrust&) = delete;
  PeerTrust& operator=(const PeerTrust&) = delete;

  bool untrusted_me() const noexcept { return untrusted_me_; }  // we copy what the peer sends
  // False when an untrusted end's private slot copies could not be allocated (Endpoint::make).
  bool copies_ok() const noexcept { return !untrusted_me_ || slot_shadow_ != nullptr; }
  // (P5b) What we accept above copy_threshold only in a sealed memfd.
  bool needs_sealed(std::uint32_t size) const noexcept {
    return untrusted_me_ && size > copy_threshold_;
  }
  // (P3c) What we send to an untrusted peer sealed.
  bool must_seal(std::uint32_t size) const noexcept {
    return untrusted_peer_ && size > copy_threshold_;
  }

  // ---- what the peer sends: checked before anything is installed (nullptr, or why not) ----
  // An extent memfd (P5, P7b). Populates the mapping as far as `payload` bytes only (the file may
  // be a sparse 4 GiB: the peer budget).
  static const char* map_extent_fd(int fd, bool announced_sealed, os::Access unsealed_access,
                                   std::uint32_t payload, os::Mapping* map, bool* sealed);
  // (P5) The peer's extent memfd for a descriptor of `size` bytes at `gen`, installed into pe.
  const char* install_peer_extent(PeerExtent& pe, os::UniqueFd fd, bool announced_sealed,
                                  std::uint32_t gen, std::uint32_t size) const;
  // (P5) Whether a payload of `size` bytes may be read from pe as it is mapped.
  const char* check_peer_payload(const PeerExtent& pe, std::uint32_t size) const noexcept;
  // (P7b) A replacement memfd announced by a reply of `size` bytes: checked and mapped into
  // *map/*sealed; the caller installs it once the whole descriptor has passed.
  const char* check_replacement(int fd, bool announced_sealed, std::uint32_t size, os::Mapping* map,
                                bool* sealed) const;

  // ---- what we send ----
  // b.data_ is a private copy (P5b), not the shared bytes.
  bool shadowed(const Buffer& b) const noexcept;
  // Before sending our buffer b: copies a private copy back, seals or refreshes its extent, and
  // points b at the result. On failure b stays usable, or (its extent's bytes unreachable:
  // own_extent().map is empty) must be dropped by the caller.
  Status prepare_send(Buffer& b);
  // prepare_send(b) will make a fresh or sealed extent (P3c): the one failure that can lose b.
  bool seals(const Buffer& b) const noexcept;
  // (P7b) The answer in a fresh memfd (sealed if the peer is untrusted and it is large).
  struct Replacement {
    os::UniqueFd fd;
    std::uint32_t aux = 0;  // the CtlMsg flags to announce it with
  };
  Result<Replacement> make_replacement(const std::byte* src, std::uint32_t size) const;
  // (P5b) An untrusted end's answer to the peer's request b, from its private copy to where the
  // peer reads it. Nothing to do if b is not shadowed.
  Status write_back_answer(const Buffer& b, std::uint32_t size);

  // ---- what we read ----
  // (P5b) Before a message in extent `id` of size `size` is delivered to an untrusted end (the
  // peer's payload, or the reply into ours): its private copy is allocated now, after freeing
  // idle copies if all would pass kRetainedCopyBytes. nullptr, or why not (out of memory: the
  // caller fails the channel; never an exception).
  const char* prepare_copy(BufferId id, std::uint32_t size, bool own) noexcept;
  // After a reply: points b at our buffer's bytes, or (untrusted) at a private copy of them.
  void own_view(Buffer& b, std::uint32_t size);
  // A message of the peer's: points b at its bytes, or (untrusted) at a private copy of them.
  void peer_view(Buffer& b, std::uint32_t size);

 private:
  // The capacity of the private copy of our extent's answer / of the peer's payload.
  std::uint32_t own_copy_cap(std::uint32_t cap, std::uint32_t size) const noexcept;
  std::uint32_t peer_copy_cap(std::uint32_t cap, std::uint32_t size) const noexcept;
  std::byte* slot_shadow(std::uint32_t id) const noexcept {
    return slot_shadow_.get() + std::size_t{id} * slot_size_;
  }
  // x gets a fresh memfd of `cap` bytes (huge: on huge pages if possible, the capacity rounded up
  // to 2 MiB; BufferTable::make_extent_memory) holding `size` bytes of src, unsealed, at a new
  // generation. On failure x is unchanged.
  Status fresh_extent(OwnExtent& x, const std::byte* src, std::size_t size, std::size_t cap,
                      bool huge);
  // Makes x immutable (P3c), through a fresh one if needed. On failure x is mapped again if at
  // all possible (x.map.valid() says whether its bytes are still reachable).
  Status seal_extent(OwnExtent& x, std::size_t size);
  Status seal_unmapped(OwnExtent& x, std::size_t cap, std::size_t size);

  const shm::Segment& seg_;
  BufferTable& table_;
  const std::uint32_t slot_size_;
  const bool untrusted_me_;    // we copy, or require sealed, what the peer sends (P5b)
  const bool untrusted_peer_;  // the peer does: we seal what we send above the threshold (P3c)
  const std::uint32_t copy_threshold_;
  std::unique_ptr<std::byte[]> slot_shadow_;  // untrusted_me_: a private copy per slot (2n)
};

}  // namespace mbmq::detail
