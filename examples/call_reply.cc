// examples/call_reply.cc: two processes, one channel, request/response in place.
// The parent calls; the child serves from a MsgQueue. Build: part of the project (build/examples).
#include <sys/wait.h>
#include <unistd.h>

#include <cctype>
#include <chrono>
#include <cstdio>
#include <cstring>

#include "mbmq/mbmq.h"

using namespace std::chrono_literals;

namespace {

// Serves until the caller closes its end: upper-cases each request in place.
mbmq::Status serve(mbmq::Channel server) {
  mbmq::MsgQueue queue = MBMQ_TRY(mbmq::MsgQueue::create());
  MBMQ_TRY(server.redirect(queue, /*key=*/7));
  mbmq::Message msg = MBMQ_TRY(queue.wait(mbmq::Deadline::never()));
  while (msg.kind == mbmq::Kind::Request) {
    for (std::byte& b : msg.buffer.data())  // the request, read and answered in place
      b = static_cast<std::byte>(std::toupper(static_cast<int>(b)));
    msg = MBMQ_TRY(queue.reply_and_wait(std::move(msg), mbmq::Deadline::never()));
  }
  return {};  // Kind::PeerClosed: the caller went away
}

mbmq::Status call(mbmq::Channel client) {
  const char text[] = "hello, zero copies";
  mbmq::Buffer buf = MBMQ_TRY(client.buffer(sizeof text));  // lives in shared memory
  std::memcpy(buf.data().data(), text, sizeof text);        // written once, in place
  MBMQ_TRY(client.call(buf, mbmq::Deadline::after(1s)));    // the reply is now in buf
  const char* reply = reinterpret_cast<const char*>(buf.data().data());
  std::printf("reply: %s\n", reply);
  if (std::strcmp(reply, "HELLO, ZERO COPIES") != 0)
    return mbmq::fail(mbmq::Errc::Protocol, "unexpected reply");
  return {};
}

}  // namespace

int main() {
  auto ends = mbmq::Channel::pair();
  if (!ends) return std::fprintf(stderr, "%s\n", ends.error().message().c_str()), 1;
  auto& [client, server] = *ends;
  pid_t pid = fork();
  if (pid == 0) {
    client.close();  // after fork, each process drops the end it does not use
    auto r = serve(std::move(server));
    _exit(r ? 0 : 1);
  }
  server.close();
  auto r = call(std::move(client));
  if (!r) std::fprintf(stderr, "call failed: %s\n", r.error().message().c_str());
  int status = 0;
  waitpid(pid, &status, 0);
  return r && WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : 1;
}
