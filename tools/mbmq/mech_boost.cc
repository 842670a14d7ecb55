// tools/mbmq/mech_boost.cc: Boost.Interprocess message_queue (header-only, from Debian's Boost):
// two queues in POSIX shared memory (/dev/shm), one message deep each. send() copies the payload
// into the queue's shared memory, receive() copies it out.
#include <boost/interprocess/ipc/message_queue.hpp>
#include <memory>
#include <string>
#include <vector>

#include "bench.h"
#include "os/process.h"

namespace mbmq::tool {

namespace bip = boost::interprocess;

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
    bip::message_queue::remove(st->req_name.c_str());
    bip::message_queue::remove(st->resp_name.c_str());
    try {
      st->req =
          std::make_unique<bip::message_queue>(bip::create_only, st->req_name.c_str(), 1, size);
      st->resp =
          std::make_unique<bip::message_queue>(bip::create_only, st->resp_name.c_str(), 1, 8);
    } catch (const bip::interprocess_exception& e) {
      return fail(Errc::System, "boost message_queue create");
    }
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

}  // namespace mbmq::tool
