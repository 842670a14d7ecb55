// tools/mbmq/mech_iceoryx.cc: iceoryx 2.0 request/response (Debian's iceoryx packages), the
// untyped client and server, waiting in a WaitSet (blocking). Zero-copy: the request is written
// in a chunk loaned from RouDi's shared memory and read there by the server.
//
// iceoryx needs its daemon, RouDi: `mbmq bench` starts /usr/bin/iox-roudi itself, with a
// configuration whose memory pools hold payloads up to 64 MiB, and stops it when the run ends.
// The iceoryx runtime is one per process and does not survive fork(), so the server is this
// program exec'd as `mbmq __iceoryx-server SIZE` (ServerStats come back on its fd 3, a pipe: its
// stdout is ours, where iceoryx may log).
//
// `--stream` (iceoryx): publish/subscribe, lossless (the publisher waits for a full subscriber
// queue: WAIT_FOR_CONSUMER / BLOCK_PRODUCER), publisher history 0, the subscriber's queue at its
// maximum (256). Both sides are this program exec'd as `mbmq __iceoryx-stream producer|consumer`
// by the forked sides, on the StreamControl (fd 3); the subscriber reads samples in place.
//
// `--fanout` (iceoryx): publish/subscribe, history 0, default queue policies (the run is paced,
// so no queue fills); the publisher and each subscriber are this program exec'd as
// `mbmq __iceoryx-fanout publisher|subscriber INDEX` on the FanoutControl (fd 3); subscribers
// sleep in a WaitSet and read samples in place.
#include <signal.h>
#include <sys/wait.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <thread>

#include "bench.h"
#include "fanout.h"
#include "iceoryx_hoofs/log/logmanager.hpp"
#include "iceoryx_posh/mepoo/chunk_header.hpp"
#include "iceoryx_posh/popo/untyped_client.hpp"
#include "iceoryx_posh/popo/untyped_publisher.hpp"
#include "iceoryx_posh/popo/untyped_server.hpp"
#include "iceoryx_posh/popo/untyped_subscriber.hpp"
#include "iceoryx_posh/popo/wait_set.hpp"
#include "iceoryx_posh/runtime/posh_runtime.hpp"
#include "mbmq/deadline.h"
#include "os/mapping.h"
#include "os/memfd.h"
#include "os/process.h"
#include "stream.h"

namespace mbmq::tool {

namespace {

const char* kRoudi = "/usr/bin/iox-roudi";
constexpr std::size_t kStopSize = 1;  // real payloads are >= 8 bytes

iox::capro::ServiceDescription service() { return {"mbmq", "bench", "request-response"}; }

// RouDi's memory pools: {chunk size, chunks}; chunk = payload + iceoryx's chunk header; responses
// are 8 bytes. A --stream subscriber queue holds up to 256 chunks (its maximum), so the pools of
// the stream's default sizes (8 B, 64 B, 1 KiB, 64 KiB) hold 300.
constexpr std::pair<std::size_t, std::uint32_t> kPools[] = {{128, 512},
                                                            {1024, 300},
                                                            {2048, 300},
                                                            {16384, 300},
                                                            {131072, 300},
                                                            {1u << 20 | 4096, 8},
                                                            {(16u << 20) + 4096, 4},
                                                            {(64u << 20) + 4096, 3}};

// The chunks of the pool a payload of `size` bytes is loaned from (0: none holds it).
std::uint32_t pool_chunks(std::size_t size) {
  for (auto [chunk, count] : kPools)
    if (size + sizeof(iox::mepoo::ChunkHeader) <= chunk) return count;
  return 0;
}

struct Roudi {
  pid_t pid = 0;
  std::string config;
  std::string error;
  ~Roudi() { stop(); }
  void stop() {
    if (pid > 0) {
      (void)os::kill_process(pid, SIGTERM);
      (void)os::wait_process(pid);
      pid = 0;
    }
    if (!config.empty()) std::filesystem::remove(config);
  }
};
Roudi g_roudi;
bool g_use_running = false;

constexpr const char* kMgmt = "/dev/shm/iceoryx_mgmt";  // RouDi's management segment

// Whether an iox-roudi process runs on this machine (a /proc/PID/comm of that name).
bool roudi_process_runs() {
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator("/proc", ec)) {
    std::ifstream f(e.path() / "comm");
    std::string comm;
    if (f && std::getline(f, comm) && comm == "iox-roudi") return true;
  }
  return false;
}

// Starts RouDi once per run. Empty on success, else why not.
std::string ensure_roudi() {
  if (g_use_running) {
    return std::filesystem::exists("/dev/shm/iceoryx_mgmt") ? std::string()
                                                            : "the parent run's RouDi is gone";
  }
  if (g_roudi.pid > 0 || !g_roudi.error.empty()) return g_roudi.error;
  if (!std::filesystem::exists(kRoudi)) return g_roudi.error = "iox-roudi not installed";
  // A management segment without a RouDi process is what a killed RouDi leaves: the new one
  // purges and re-creates it (ready when it has been re-written).
  const bool leftover = std::filesystem::exists(kMgmt);
  if (leftover && roudi_process_runs())
    return g_roudi.error = "another RouDi runs on this machine (/dev/shm/iceoryx_mgmt exists)";
  std::error_code ec;
  const auto stale =
      leftover ? std::filesystem::last_write_time(kMgmt, ec) : std::filesystem::file_time_type{};
  auto ready = [&] {
    return std::filesystem::exists(kMgmt) &&
           (!leftover || std::filesystem::last_write_time(kMgmt, ec) != stale);
  };
  g_roudi.config = "/tmp/mbmq-roudi-" + std::to_string(os::current_pid()) + ".toml";
  {
    std::ofstream f(g_roudi.config);
    f << "[general]\nversion = 1\n\n[[segment]]\n";
    for (auto [size, count] : kPools)
      f << "\n[[segment.mempool]]\nsize = " << size << "\ncount = " << count << "\n";
  }
  auto pid = spawn_quiet(kRoudi, {"-c", g_roudi.config, "-l", "off", "-m", "off"});
  if (!pid) return g_roudi.error = "cannot start iox-roudi: " + pid.error().message();
  g_roudi.pid = *pid;
  // Ready when its management segment exists.
  for (int i = 0; i < 500 && !ready(); ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  if (!ready()) {
    g_roudi.stop();
    return g_roudi.error = "iox-roudi did not come up within 5 s";
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  std::atexit([] { g_roudi.stop(); });
  return {};
}

void init_runtime(const std::string& name) {
  static bool done = false;
  if (done) return;
  // Its runtime logs at Verbose by default (e.g. at exit); errors still show.
  iox::log::LogManager::GetLogManager().SetDefaultLogLevel(iox::log::LogLevel::kError,
                                                           iox::log::LogLevelOutput::kHideLogLevel);
  iox::runtime::PoshRuntime::initRuntime(iox::RuntimeName_t(iox::cxx::TruncateToCapacity, name));
  done = true;
}

}  // namespace

void use_running_roudi() { g_use_running = true; }

Mechanism iceoryx_mechanism() {
  struct State {
    std::size_t size = 0;
    std::unique_ptr<iox::popo::UntypedClient> client;
    std::unique_ptr<iox::popo::WaitSet<>> waitset;
  };
  auto st = std::make_shared<State>();
  Mechanism m;
  m.name = "iceoryx";
  m.os_counted = false;
  m.copies_by_design = "0: the request is written in a chunk loaned from RouDi's shared memory";
  if (!std::filesystem::exists(kRoudi)) m.unavailable = "iox-roudi not installed (apt: iceoryx)";
  m.max_size = 64u << 20;
  m.setup = [st](std::size_t size) -> Status {
    std::string why = ensure_roudi();
    if (!why.empty()) return fail(Errc::System, "iceoryx: RouDi unavailable");
    st->size = size;
    return {};
  };
  m.serve = [](std::size_t size, ServerCounter& count) -> int {
    // This forked child runs the server as its own program and waits for it.
    std::string self = std::filesystem::read_symlink("/proc/self/exe").string();
    auto pipe = os::make_pipe();
    if (!pipe) return 10;
    std::vector<std::string> args = {"__iceoryx-server", std::to_string(size)};
    if (!g_work.touch) args.push_back("--no-touch");
    if (g_work.corrupt) args.push_back("--inject-corruption");
    auto pid = os::spawn_program(self, args, -1, -1, pipe->second.get());
    pipe->second.reset();
    if (!pid) return 11;
    ServerStats s{};
    auto got = os::read_full(pipe->first.get(), {reinterpret_cast<std::byte*>(&s), sizeof s});
    (void)os::wait_process(*pid);
    if (!got || *got != sizeof s) return 12;
    count.external = s;
    return s.error;
  };
  m.after_fork_parent = [st]() -> Status {
    init_runtime("mbmq-bench-" + std::to_string(os::current_pid()));
    st->client = std::make_unique<iox::popo::UntypedClient>(service());
    st->waitset = std::make_unique<iox::popo::WaitSet<>>();
    if (st->waitset->attachState(*st->client, iox::popo::ClientState::HAS_RESPONSE).has_error())
      return fail(Errc::System, "iceoryx: WaitSet");
    // The server is a new program: wait (at most 10 s) until the client is connected to it.
    for (int i = 0; i < 1000; ++i) {
      if (st->client->getConnectionState() == iox::ConnectionState::CONNECTED) return {};
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return fail(Errc::TimedOut, "iceoryx: no server connected");
  };
  m.client_rtt = [st](std::uint64_t iter) -> bool {
    auto req = st->client->loan(static_cast<std::uint32_t>(st->size), 8);
    if (req.has_error()) return false;
    write_payload(static_cast<std::byte*>(req.value()), st->size, iter);
    if (st->client->send(req.value()).has_error()) return false;
    for (;;) {
      auto resp = st->client->take();
      if (!resp.has_error()) {
        std::uint64_t sum = 0;
        std::memcpy(&sum, resp.value(), 8);
        st->client->releaseResponse(resp.value());
        return sum == expected_sum(st->size, iter);
      }
      (void)st->waitset->wait();
    }
  };
  m.stop = [st] {
    if (!st->client) return;
    auto req = st->client->loan(kStopSize, 1);
    if (!req.has_error()) (void)st->client->send(req.value());
  };
  m.teardown = [st] {
    st->waitset.reset();
    st->client.reset();
  };
  return m;
}

int iceoryx_server_main(const std::vector<std::string>& args) {
  if (args.empty()) return 2;
  const std::size_t size = std::strtoull(args[0].c_str(), nullptr, 10);
  for (const auto& a : args) {
    if (a == "--no-touch") g_work.touch = false;
    if (a == "--inject-corruption") g_work.corrupt = true;
  }
  os::die_with_parent();
  init_runtime("mbmq-bench-server-" + std::to_string(os::current_pid()));
  iox::popo::UntypedServer server(service());
  iox::popo::WaitSet<> waitset;
  if (waitset.attachState(server, iox::popo::ServerState::HAS_REQUEST).has_error()) return 3;
  ServerCounter count;
  int error = 0;
  for (bool stop = false; !stop;) {
    auto req = server.take();
    if (req.has_error()) {
      (void)waitset.wait();
      continue;
    }
    const void* payload = req.value();
    const auto* header = iox::mepoo::ChunkHeader::fromUserPayload(payload);
    const std::size_t n = header->userPayloadSize();
    if (n == kStopSize) {
      count.stop();
      stop = true;
    } else {
      // Read in place (the corruption hook writes: the chunk is this process's to read).
      std::uint64_t sum = read_payload(static_cast<std::byte*>(const_cast<void*>(payload)), n);
      auto resp = server.loan(iox::popo::RequestHeader::fromPayload(payload), 8, 8);
      if (resp.has_error()) {
        error = 4;
        stop = true;
      } else {
        std::memcpy(resp.value(), &sum, 8);
        if (server.send(resp.value()).has_error()) error = 5, stop = true;
      }
      count.tick();
    }
    server.releaseRequest(payload);
  }
  (void)size;
  ServerStats s = count.finish(error);
  (void)os::write_full(3, {reinterpret_cast<const std::byte*>(&s), sizeof s});
  return 0;
}

// ---- --stream -----------------------------------------------------------------------------------
namespace {

// One service per cell: a subscriber left behind by an earlier cell cannot hold this one up.
iox::capro::ServiceDescription stream_service(std::uint64_t cell) {
  return {"mbmq", "stream",
          iox::capro::IdString_t(iox::cxx::TruncateToCapacity, std::to_string(cell).c_str())};
}

// In a forked side: this program exec'd as `mbmq ARGS` (__iceoryx-stream ROLE, __iceoryx-fanout
// ROLE [INDEX]) on the control block
// (its fd 3; its stdout our stderr, where iceoryx may log), waited for.
Status exec_side(const std::vector<std::string>& args, int control_fd) {
  const std::string self = std::filesystem::read_symlink("/proc/self/exe").string();
  const pid_t pid = MBMQ_TRY(os::spawn_program(self, args, 2, -1, control_fd));
  const int status = MBMQ_TRY(os::wait_process(pid));
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
    return fail(Errc::System, "the exec'd iceoryx side failed");
  return {};
}

std::uint64_t queue_capacity(std::size_t size) {
  const std::uint32_t chunks = pool_chunks(size);
  // The chunks in flight: the queue, the one the subscriber holds, the publisher's loan.
  const std::uint64_t fit = chunks > 4 ? chunks - 4 : 1;
  return std::min<std::uint64_t>(iox::popo::SubscriberOptions{}.queueCapacity, fit);
}

Status iceoryx_produce(StreamProducer& p) {
  iox::popo::PublisherOptions po;
  po.historyCapacity = 0;
  po.subscriberTooSlowPolicy = iox::popo::ConsumerTooSlowPolicy::WAIT_FOR_CONSUMER;
  iox::popo::UntypedPublisher pub(stream_service(p.control().cell_id), po);
  // History 0: what is published before the subscriber is connected is lost. Wait (10 s).
  for (int i = 0; !pub.hasSubscribers(); ++i) {
    if (!p.healthy()) return {};
    if (i == 10000) return fail(Errc::TimedOut, "iceoryx: no subscriber connected");
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  const auto size = static_cast<std::uint32_t>(p.size());
  for (;;) {
    // RouDi's pool holds the queue and more: a failed loan is a failure, not a retry.
    auto chunk = pub.loan(size, 8);
    if (chunk.has_error()) return fail(Errc::NoBuffers, "iceoryx: loan");
    const bool more = p.next(static_cast<std::byte*>(chunk.value()));
    pub.publish(chunk.value());  // waits while the subscriber's queue is full
    if (!more) return {};
  }
}

// Takes the samples of `sub`, sleeping in a WaitSet (200 ms at a time, then asking `healthy`:
// false ends the loop, successfully: the side that failed says why), and hands each to `take`
// in place before releasing it. The verdict Fail fails the loop; End ends it.
template <class Verdict, class Healthy, class Take>
Status take_samples(iox::popo::UntypedSubscriber& sub, const Healthy& healthy, const Take& take) {
  iox::popo::WaitSet<> waitset;
  if (waitset.attachState(sub, iox::popo::SubscriberState::HAS_DATA).has_error())
    return fail(Errc::System, "iceoryx: WaitSet");
  for (;;) {
    auto sample = sub.take();
    if (sample.has_error()) {
      if (!healthy()) return {};
      (void)waitset.timedWait(iox::units::Duration::fromMilliseconds(200));
      continue;
    }
    const void* payload = sample.value();
    const std::size_t n = iox::mepoo::ChunkHeader::fromUserPayload(payload)->userPayloadSize();
    const Verdict v = take(payload, n);
    sub.release(payload);
    if (v == Verdict::Fail) return fail(Errc::Protocol, "verification");
    if (v == Verdict::End) return {};
  }
}

Status iceoryx_consume(StreamConsumer& c) {
  iox::popo::SubscriberOptions so;
  so.queueCapacity = queue_capacity(c.size());
  so.historyRequest = 0;
  so.queueFullPolicy = iox::popo::QueueFullPolicy::BLOCK_PRODUCER;
  iox::popo::UntypedSubscriber sub(stream_service(c.control().cell_id), so);
  return take_samples<StreamConsumer::Verdict>(
      sub, [&] { return c.healthy(); },
      [&](const void* payload, std::size_t n) {
        // Read in place (the corruption hook writes: the chunk is this process's to read).
        return c.check(static_cast<std::byte*>(const_cast<void*>(payload)), n);
      });
}

}  // namespace

StreamMechanism iceoryx_stream_mechanism() {
  StreamMechanism m;
  m.name = "iceoryx";
  m.os_counted = false;
  m.note =
      "iceoryx: publish/subscribe, history 0, lossless (WAIT_FOR_CONSUMER / BLOCK_PRODUCER), "
      "subscriber queue 256 (its maximum; less where RouDi's pool for the size has fewer chunks)";
  if (!std::filesystem::exists(kRoudi)) m.unavailable = "iox-roudi not installed (apt: iceoryx)";
  m.available = [] {
    std::string why = ensure_roudi();
    return why.empty() ? why : "RouDi: " + why;
  };
  m.setup = [](std::size_t size) -> Status {
    if (pool_chunks(size) == 0) return fail(Errc::InvalidArgument, "iceoryx: no RouDi pool fits");
    return {};
  };
  m.produce = [](StreamProducer& p) -> Status {
    p.external();
    return exec_side({"__iceoryx-stream", "producer"}, p.control().control_fd);
  };
  m.consume = [](StreamConsumer& c) -> Status {
    c.external();
    return exec_side({"__iceoryx-stream", "consumer"}, c.control().control_fd);
  };
  m.teardown = [] {};
  return m;
}

int iceoryx_stream_main(const std::vector<std::string>& args) {
  if (args.size() != 1 || (args[0] != "producer" && args[0] != "consumer")) return 2;
  os::die_with_parent();
  // The block the parent made (and constructed) before the forks.
  auto map = os::Mapping::map_shared(3, sizeof(StreamControl), os::Access::ReadWrite);
  if (!map) return 3;
  auto* ctl = std::launder(reinterpret_cast<StreamControl*>(map->data()));
  init_runtime("mbmq-stream-" + args[0] + "-" + std::to_string(os::current_pid()));
  if (args[0] == "producer") {
    StreamProducer p(*ctl);
    p.finish(iceoryx_produce(p));
  } else {
    StreamConsumer c(*ctl);
    c.finish(iceoryx_consume(c));
  }
  return 0;
}

// ---- --fanout -----------------------------------------------------------------------------------
namespace {

iox::capro::ServiceDescription fanout_service(std::uint64_t cell) {
  return {"mbmq", "fanout",
          iox::capro::IdString_t(iox::cxx::TruncateToCapacity, std::to_string(cell).c_str())};
}

Status iceoryx_fanout_publish(FanoutPublisher& p) {
  iox::popo::PublisherOptions po;
  po.historyCapacity = 0;
  iox::popo::UntypedPublisher pub(fanout_service(p.control().cell_id), po);
  const auto size = static_cast<std::uint32_t>(p.size());
  while (p.next()) {
    auto chunk = pub.loan(size, 8);
    if (chunk.has_error()) {
      if (p.probing()) continue;  // a probe may be dropped: the next one comes in 1 ms
      return fail(Errc::NoBuffers, "iceoryx: loan");
    }
    p.fill(static_cast<std::byte*>(chunk.value()));
    pub.publish(chunk.value());
    p.sent();
  }
  return p.status();
}

Status iceoryx_fanout_subscribe(FanoutSubscriber& s) {
  iox::popo::SubscriberOptions so;
  so.historyRequest = 0;
  iox::popo::UntypedSubscriber sub(fanout_service(s.control().cell_id), so);
  return take_samples<FanoutSubscriber::Verdict>(
      sub, [&] { return s.healthy(); },
      [&](const void* payload, std::size_t n) {
        return s.received(static_cast<const std::byte*>(payload), n);  // read in place
      });
}

}  // namespace

FanoutMechanism iceoryx_fanout_mechanism() {
  FanoutMechanism m;
  m.name = "iceoryx";
  m.os_counted = false;
  m.note =
      "iceoryx: untyped publish/subscribe, history 0, default queue policies; loan(), write in "
      "place, publish(); each subscriber sleeps in a WaitSet (SubscriberState::HAS_DATA), then "
      "take(), reads in place, release()";
  m.copies = [](std::size_t) { return std::size_t{0}; };
  if (!std::filesystem::exists(kRoudi)) m.unavailable = "iox-roudi not installed (apt: iceoryx)";
  m.available = [] {
    std::string why = ensure_roudi();
    return why.empty() ? why : "RouDi: " + why;
  };
  m.setup = [](std::size_t size, std::size_t) -> Status {
    if (pool_chunks(size) == 0) return fail(Errc::InvalidArgument, "iceoryx: no RouDi pool fits");
    return {};
  };
  m.publish = [](FanoutPublisher& p) -> Status {
    p.external();
    return exec_side({"__iceoryx-fanout", "publisher"}, p.control().control_fd);
  };
  m.subscribe = [](FanoutSubscriber& s) -> Status {
    s.external();
    return exec_side({"__iceoryx-fanout", "subscriber", std::to_string(s.index())},
                     s.control().control_fd);
  };
  m.teardown = [] {};
  return m;
}

int iceoryx_fanout_main(const std::vector<std::string>& args) {
  const bool publisher = args.size() == 1 && args[0] == "publisher";
  if (!publisher && (args.size() != 2 || args[0] != "subscriber")) return 2;
  os::die_with_parent();
  // The block the parent made (and constructed) before the forks, with its arrays.
  auto bytes = os::file_size(3);
  if (!bytes) return 3;
  auto map = os::Mapping::map_shared(3, *bytes, os::Access::ReadWrite);
  if (!map) return 3;
  auto* ctl = std::launder(reinterpret_cast<FanoutControl*>(map->data()));
  init_runtime("mbmq-fanout-" + args[0] + "-" + std::to_string(os::current_pid()));
  if (publisher) {
    FanoutPublisher p(*ctl);
    p.finish(iceoryx_fanout_publish(p));
  } else {
    FanoutSubscriber s(*ctl, std::strtoull(args[1].c_str(), nullptr, 10));
    s.finish(iceoryx_fanout_subscribe(s));
  }
  return 0;
}

}  // namespace mbmq::tool
