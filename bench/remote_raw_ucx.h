// bench/remote_raw_ucx.h: the raw-UCX baseline of mbmq-net-bench: a request/response of
// mbmq::net's shape written straight on ucp (one Active Message each way, a 16-byte header, the
// payload echoed back; an eager payload copied once out of UCX's bounce buffer, a rendezvous one
// received with ucp_am_recv_data_nbx into the application's buffer), busy-polling
// ucp_worker_progress. No locks, no allocation per message: what mbmq::net is measured against.
//
// UCX is reached through mbmq::net's dlopen()ed function table (net/ucx.h), so both rows run
// with the same process-wide UCX settings (malloc hooks and signal handlers off).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace mbmq::bench {

// The server: listens on ip:0, writes its port with `put_port`, answers requests and swallows
// one-way messages until the client goes. 0 on a clean end, else a code.
int raw_ucx_serve(const std::string& ip, void (*put_port)(std::uint32_t, void*), void* arg);

// How RawUcxClient::stream sends: `window` messages in flight (at most kMaxWindow), sent from
// `buffers` buffers in turn, landing at the server in `sinks` buffers in turn (at most 64 each).
// The raw-ucx row: {8, 1, 1}, every message from one buffer into one sink: the bytes the kernel's
// copies touch stay in cache (at 1 MiB, 1 MiB a side), where distinct messages, as mbmq::net's
// (each a buffer of its own), touch as many buffers as are in flight. raw-ucx-distinct: {8, 8, 8}.
struct StreamShape {
  unsigned window = 8, buffers = 1, sinks = 1;
};
inline constexpr unsigned kMaxWindow = 64;

class RawUcxClient {
 public:
  RawUcxClient() = default;
  RawUcxClient(const RawUcxClient&) = delete;
  RawUcxClient& operator=(const RawUcxClient&) = delete;
  ~RawUcxClient();
  // Connects to ip:port; `max` is the largest payload. Empty on success, else why.
  std::string connect(const std::string& ip, std::uint32_t port, std::size_t max);
  // One round trip of n bytes (echoed back into the same buffer, its first 8 bytes checked).
  bool call(std::size_t n, std::uint64_t seq);
  // One-way messages of n bytes (shape: by default 8 in flight) until `until_ns` (monotonic), then
  // a round trip the server answers only when every one-way payload has landed. Bytes sent, or -1.
  std::int64_t stream(std::size_t n, std::int64_t until_ns, StreamShape shape = {});

  struct State;

 private:
  State* s_ = nullptr;
};

}  // namespace mbmq::bench
