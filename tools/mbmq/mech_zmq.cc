// tools/mbmq/mech_zmq.cc: ZeroMQ REQ/REP over ipc:// (libzmq from Debian), used as its users do:
// zmq_send() from the caller's buffer, zmq_msg_recv() on the server, reading the message in
// place. Contexts are made after fork() (libzmq is not fork-safe). Also the receiving loop of the
// --stream and --fanout rows (zmq_receive_each).
#include <zmq.h>

#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "bench.h"
#include "os/process.h"

namespace mbmq::tool {

Mechanism zeromq_mechanism() {
  struct State {
    std::string path, endpoint;
    void* ctx = nullptr;
    void* sock = nullptr;
    std::vector<std::byte> cbuf;
    std::size_t size = 0;
  };
  auto st = std::make_shared<State>();
  Mechanism m;
  m.name = "zeromq-ipc";
  m.os_counted = false;
  m.copies_by_design =
      "4: zmq_send copies into a message; the I/O thread's write() copies into the kernel; the "
      "peer's read() copies out; small messages are copied once more into their zmq_msg_t";
  m.setup = [st](std::size_t size) -> Status {
    st->path = unique_tmp_path("bench-zmq", ".ipc");
    st->endpoint = "ipc://" + st->path;
    st->size = size;
    st->cbuf.assign(size, std::byte{0});
    return {};
  };
  m.serve = [st](std::size_t, ServerCounter& count) -> int {
    void* ctx = zmq_ctx_new();
    void* sock = zmq_socket(ctx, ZMQ_REP);
    int linger = 0;
    zmq_setsockopt(sock, ZMQ_LINGER, &linger, sizeof linger);
    if (zmq_bind(sock, st->endpoint.c_str()) != 0) return 1;
    int rc = 0;
    for (;;) {
      zmq_msg_t msg;
      zmq_msg_init(&msg);
      if (zmq_msg_recv(&msg, sock, 0) < 0) {
        rc = 2;
        break;
      }
      std::size_t len = zmq_msg_size(&msg);
      if (len == 0) {  // stop
        zmq_msg_close(&msg);
        count.stop();
        break;
      }
      std::uint64_t sum = read_payload(static_cast<std::byte*>(zmq_msg_data(&msg)), len);
      zmq_msg_close(&msg);
      if (zmq_send(sock, &sum, 8, 0) != 8) {
        rc = 3;
        break;
      }
      count.tick();
    }
    zmq_close(sock);
    zmq_ctx_term(ctx);
    return rc;
  };
  m.after_fork_parent = [st]() -> Status {
    st->ctx = zmq_ctx_new();
    st->sock = zmq_socket(st->ctx, ZMQ_REQ);
    int linger = 0;
    zmq_setsockopt(st->sock, ZMQ_LINGER, &linger, sizeof linger);
    // connect() before the server's bind() is fine: ZeroMQ connects when the endpoint appears.
    if (zmq_connect(st->sock, st->endpoint.c_str()) != 0) return fail(Errc::System, "zmq_connect");
    return {};
  };
  m.client_rtt = [st](std::uint64_t iter) -> bool {
    write_payload(st->cbuf.data(), st->size, iter);
    if (zmq_send(st->sock, st->cbuf.data(), st->size, 0) != static_cast<int>(st->size))
      return false;
    std::uint64_t sum = 0;
    return zmq_recv(st->sock, &sum, 8, 0) == 8 && sum == expected_sum(st->size, iter);
  };
  m.stop = [st] {
    if (st->sock != nullptr) {
      char none = 0;  // an empty message stops the server
      (void)zmq_send(st->sock, &none, 0, 0);
    }
  };
  m.teardown = [st] {
    if (st->sock != nullptr) zmq_close(st->sock);
    if (st->ctx != nullptr) zmq_ctx_term(st->ctx);
    st->sock = st->ctx = nullptr;
    std::error_code ec;
    std::filesystem::remove(st->path, ec);
    st->cbuf = {};
  };
  return m;
}

Status zmq_receive_each(int type, const std::function<int(void* sock)>& attach,
                        const std::function<bool()>& healthy,
                        const std::function<Take(std::byte* p, std::size_t n)>& take) {
  void* ctx = zmq_ctx_new();
  void* sock = zmq_socket(ctx, type);
  int patience = 200, linger = 0;
  zmq_setsockopt(sock, ZMQ_RCVTIMEO, &patience, sizeof patience);
  zmq_setsockopt(sock, ZMQ_LINGER, &linger, sizeof linger);
  Status rc;
  if (attach(sock) != 0) rc = fail(Errc::System, "zmq_bind/zmq_connect");
  zmq_msg_t msg;
  zmq_msg_init(&msg);
  for (bool end = false; rc && !end;) {
    if (zmq_msg_recv(&msg, sock, 0) < 0) {
      if (zmq_errno() != EAGAIN) rc = fail(Errc::System, "zmq_msg_recv");
      if (!healthy()) break;
      continue;
    }
    const Take t = take(static_cast<std::byte*>(zmq_msg_data(&msg)), zmq_msg_size(&msg));
    if (t == Take::Fail) rc = fail(Errc::Protocol, "verification");
    end = t == Take::End;
  }
  zmq_msg_close(&msg);
  zmq_close(sock);
  zmq_ctx_term(ctx);
  return rc;
}

}  // namespace mbmq::tool
