// tools/mbmq/mech_boost.cc: Boost.Interprocess message_queue (header-only, from Debian's Boost):
// two queues in POSIX shared memory (/dev/shm), one message deep each. send() copies the payload
// into the queue's shared memory, receive() copies it out.
// `--stream` (boost-mq): one queue, up to 1024 messages deep, the same copies.
#include <boost/date_time/posix_time/posix_time_types.hpp>
#include <boost/interprocess/ipc/message_queue.hpp>
#include <memory>
#include <string>
#include <vector>

#include "bench.h"
#include "os/process.h"
#include "stream.h"

namespace mbmq::tool {

namespace bip = boost::interprocess;

namespace {
// Creates the queue `name` (replacing one a crashed run left behind): `depth` messages of at most
// `size` bytes.
Result<std::unique_ptr<bip::message_queue>> create_queue(const std::string& name, std::size_t depth,
                                                         std::size_t size) {
  bip::message_queue::remove(name.c_str());
  try {
    return std::make_unique<bip::message_queue>(bip::create_only, name.c_str(), depth, size);
  } catch (const bip::interprocess_exception&) {
    return fail(Errc::System, "boost message_queue create");
  }
}
}  // namespace

Mechanism boost_mq_mechanism() {
  struct State {
    std::string req_name, resp_name;
    std::unique_ptr<bip::message_queue> req, resp;
    std::vector<std::byte> cbuf, sbuf;
    std::size_t size = 0;
  };
  auto st = std::make_shared<State>();
  Mechanism m;
  m.name = "boost-mq";
  m.os_counted = false;
  m.copies_by_design = "2: send() copies into the queue's shared memory, receive() copies out";
  m.setup = [st](std::size_t size) -> Status {
    std::string base = "mbmq-bench-" + std::to_string(os::current_pid());
    st->req_name = base + "-req";
    st->resp_name = base + "-resp";
    st->req = MBMQ_TRY(create_queue(st->req_name, 1, size));
    st->resp = MBMQ_TRY(create_queue(st->resp_name, 1, 8));
    st->size = size;
    st->cbuf.assign(size, std::byte{0});
    st->sbuf.assign(size, std::byte{0});
    return {};
  };
  m.serve = [st](std::size_t, ServerCounter& count) -> int {
    try {
      for (;;) {
        bip::message_queue::size_type got = 0;
        unsigned prio = 0;
        st->req->receive(st->sbuf.data(), st->sbuf.size(), got, prio);
        if (got == 0) return count.stop(), 0;
        std::uint64_t sum = read_payload(st->sbuf.data(), got);
        st->resp->send(&sum, 8, 0);
        count.tick();
      }
    } catch (const bip::interprocess_exception&) {
      return 1;
    }
  };
  m.client_rtt = [st](std::uint64_t iter) -> bool {
    try {
      write_payload(st->cbuf.data(), st->size, iter);
      st->req->send(st->cbuf.data(), st->size, 0);
      std::uint64_t sum = 0;
      bip::message_queue::size_type got = 0;
      unsigned prio = 0;
      st->resp->receive(&sum, 8, got, prio);
      return got == 8 && sum == expected_sum(st->size, iter);
    } catch (const bip::interprocess_exception&) {
      return false;
    }
  };
  m.stop = [st] {
    try {
      char none = 0;  // an empty message stops the server (a valid pointer: it is memcpy'd)
      if (st->req) st->req->send(&none, 0, 0);
    } catch (const bip::interprocess_exception&) {
    }
  };
  m.teardown = [st] {
    st->req.reset();
    st->resp.reset();
    bip::message_queue::remove(st->req_name.c_str());
    bip::message_queue::remove(st->resp_name.c_str());
    st->cbuf = {};
    st->sbuf = {};
  };
  return m;
}

// ---- --stream -----------------------------------------------------------------------------------
namespace {
// A side waits at most this long in one call (then tries again), to notice the other's failure.
boost::posix_time::ptime patience() {
  return boost::posix_time::microsec_clock::universal_time() + boost::posix_time::milliseconds(200);
}
constexpr std::size_t kStreamDepth = 1024;            // messages
constexpr std::size_t kStreamQueueBytes = 64u << 20;  // fewer messages for large ones
}  // namespace

StreamMechanism boost_mq_stream_mechanism() {
  struct State {
    std::string name;
    std::unique_ptr<bip::message_queue> q;
  };
  auto st = std::make_shared<State>();
  StreamMechanism m;
  m.name = "boost-mq";
  m.os_counted = false;
  m.note = "boost-mq: a message_queue 1024 messages deep (at most 64 MiB: fewer for large ones)";
  m.setup = [st](std::size_t size) -> Status {
    st->name = "mbmq-stream-" + std::to_string(os::current_pid());
    const std::size_t depth =
        std::max<std::size_t>(2, std::min<std::size_t>(kStreamDepth, kStreamQueueBytes / size));
    st->q = MBMQ_TRY(create_queue(st->name, depth, size));
    return {};
  };
  // Blocking as its users do; the fast path is try_send / try_receive, which never reads the
  // clock, and only a full or empty queue waits (timed, to notice the other side's failure).
  m.produce = [st](StreamProducer& p) -> Status {
    std::vector<std::byte> buf(p.size());
    try {
      for (;;) {
        const bool more = p.next(buf.data());
        while (!st->q->try_send(buf.data(), buf.size(), 0) &&
               !st->q->timed_send(buf.data(), buf.size(), 0, patience())) {
          if (!p.healthy()) return {};
        }
        if (!more) return {};
      }
    } catch (const bip::interprocess_exception&) {
      return fail(Errc::System, "boost message_queue send");
    }
  };
  m.consume = [st](StreamConsumer& c) -> Status {
    std::vector<std::byte> buf(c.size());
    try {
      for (;;) {
        bip::message_queue::size_type got = 0;
        unsigned prio = 0;
        while (!st->q->try_receive(buf.data(), buf.size(), got, prio) &&
               !st->q->timed_receive(buf.data(), buf.size(), got, prio, patience())) {
          if (!c.healthy()) return {};
        }
        const auto v = c.check(buf.data(), got);
        if (v == StreamConsumer::Verdict::Fail) return fail(Errc::Protocol, "stream verification");
        if (v == StreamConsumer::Verdict::End) return {};
      }
    } catch (const bip::interprocess_exception&) {
      return fail(Errc::System, "boost message_queue receive");
    }
  };
  m.teardown = [st] {
    st->q.reset();
    bip::message_queue::remove(st->name.c_str());
  };
  return m;
}

}  // namespace mbmq::tool
