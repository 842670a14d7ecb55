// tools/mbmq/mechanisms.cc: the list `mbmq bench` runs, in its order.
#include "bench.h"

namespace mbmq::tool {

std::vector<Mechanism> all_mechanisms() {
  std::vector<Mechanism> v = shm_mechanisms();
  for (auto& m : kernel_mechanisms()) v.push_back(std::move(m));
  v.push_back(zeromq_mechanism());
  v.push_back(boost_mq_mechanism());
  v.push_back(iceoryx_mechanism());
  return v;
}

}  // namespace mbmq::tool
