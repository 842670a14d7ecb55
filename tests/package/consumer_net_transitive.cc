// The program over consumer_net_lib.cc: it links mbmq::net only through that static library.
#include <cstdio>

bool ucx_urls_reach_mbmq_net();

int main() {
  if (!ucx_urls_reach_mbmq_net()) {
    std::puts("consumer_net_transitive: mbmq::net's connector was left out of the program");
    return 1;
  }
  std::puts("consumer_net_transitive: mbmq::net reached through a static library");
  return 0;
}
