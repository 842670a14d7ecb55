// Linking mbmq::net transitively (through an application's static library that links it) makes
// mbmq::connect("ucx://...") reach mbmq::net (src/CMakeLists.txt: register.cc's object on every
// consumer's link line). Exit 0: it does; 1: connect() says to link mbmq::net.
#include <cstdio>
#include <cstdlib>
#include <string>

#include "mbmq/mbmq.h"

namespace review_remote {
bool net_available();
}

int main() {
  ::setenv("UCX_TLS", "tcp", 1);
  (void)review_remote::net_available();
  auto c = mbmq::connect("ucx://127.0.0.1:1/svc", mbmq::Deadline::after(std::chrono::seconds(2)));
  if (c) return 0;
  const std::string m = c.error().message();
  std::printf("connect: %s\n", m.c_str());
  return m.find("need mbmq::net") != std::string::npos ? 1 : 0;
}
