// A program outside the mbmq tree, built against an installed mbmq (find_package or pkg-config):
// one call between two processes, with the reply checked. Exit 0 on success.
#include <mbmq/mbmq.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>

int main() {
  auto ends = mbmq::Channel::pair();
  if (!ends) {
    std::fprintf(stderr, "pair: %s\n", ends.error().message().c_str());
    return 1;
  }
  auto& [client, server] = *ends;
  pid_t pid = ::fork();
  if (pid < 0) return 1;
  if (pid == 0) {  // the server: answers one request, doubling its number
    client.close();
    auto m = server.receive(mbmq::Deadline::after(std::chrono::seconds(10)));
    if (!m || m->kind != mbmq::Kind::Request) ::_exit(2);
    unsigned v = 0;
    std::memcpy(&v, m->buffer.data().data(), sizeof v);
    v *= 2;
    std::memcpy(m->buffer.data().data(), &v, sizeof v);
    ::_exit(mbmq::MsgQueue::reply(std::move(*m)) ? 0 : 3);
  }
  server.close();
  auto b = client.buffer(sizeof(unsigned));
  if (!b) return 1;
  unsigned v = 21;
  std::memcpy(b->data().data(), &v, sizeof v);
  auto r = client.call(*b, mbmq::Deadline::after(std::chrono::seconds(10)));
  std::memcpy(&v, b->data().data(), sizeof v);
  int st = 0;
  ::waitpid(pid, &st, 0);
  if (!r || v != 42 || !WIFEXITED(st) || WEXITSTATUS(st) != 0) {
    std::fprintf(stderr, "call: %s, reply %u, server status %d\n",
                 r ? "ok" : r.error().message().c_str(), v, st);
    return 1;
  }
  std::puts("consumer: 21 -> 42 across two processes");
  return 0;
}
