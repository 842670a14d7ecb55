// A static library of a consumer's that links mbmq::net privately and uses it only through
// mbmq::connect("ucx://..."): the program that links this library must get mbmq::net's connector
// (net/register.cc) although it names mbmq::net nowhere, whatever its CMake policies
// (tests/package/CMakeLists.txt builds it with CMP0099 OLD, as a project older than 3.17 would).
#include <mbmq/mbmq.h>

#include <chrono>
#include <cstdio>
#include <string>

bool ucx_urls_reach_mbmq_net() {
  // Nobody listens on port 1: refused at once; "link mbmq::net" if the connector is missing.
  auto c = mbmq::connect("ucx://127.0.0.1:1/x", mbmq::Deadline::after(std::chrono::seconds(5)));
  if (c) return true;
  const std::string why = c.error().message();
  std::printf("connect to a closed port: %s\n", why.c_str());
  return why.find("link mbmq::net") == std::string::npos;
}
