// bench/netns.h: two network namespaces joined by a veth pair, for mbmq-net-bench and the tests
// across namespaces (tests/net/netns_test.cc, the #19 failure bars in tests/net/net_bars_test.cc):
// made by the constructor, removed (with the veth pair) by the destructor; root only.
//
// A process enters a namespace with enter(): setns, a mount namespace of its own with that
// namespace's /sys (UCX lists devices in /sys/class/net), and UCX_NET_DEVICES set to the veth end
// (both namespaces are one machine to UCX: same host name and boot id, so it would otherwise try
// the peer's loopback, which is its own).
#pragma once

#include <fcntl.h>
#include <sched.h>
#include <sys/mount.h>
#include <unistd.h>

#include <cstdlib>
#include <string>

#include "os/process.h"

namespace mbmq::netns {

inline int sh(const std::string& cmd) { return std::system((cmd + " >/dev/null 2>&1").c_str()); }

// In the calling process (a child, normally): moves it into namespace `ns` and gives UCX that
// namespace's device `dev` only. False if any step fails.
inline bool enter(const std::string& ns, const std::string& dev) {
  ::setenv("UCX_NET_DEVICES", dev.c_str(), 1);
  const int fd = ::open(("/var/run/netns/" + ns).c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  const bool ok = ::setns(fd, CLONE_NEWNET) == 0;
  ::close(fd);
  if (!ok) return false;
  // UCX lists devices in /sys/class/net, which shows the namespace of whoever mounted /sys: do
  // what `ip netns exec` does, a mount namespace of our own with a sysfs of the new namespace.
  return ::unshare(CLONE_NEWNS) == 0 &&
         ::mount("", "/", nullptr, MS_SLAVE | MS_REC, nullptr) == 0 &&
         ::umount2("/sys", MNT_DETACH) == 0 &&
         ::mount(ns.c_str(), "/sys", "sysfs", 0, nullptr) == 0;
}

// Namespaces mb<pid><tag>a and ...b, veth ends ...x (in a) and ...y (in b), 10.<k>.<j>.1 and .2/24.
struct Pair {
  std::string a, b, va, vb, ip_a, ip_b;
  bool ok = false;
  explicit Pair(const std::string& tag = "") {
    const unsigned pid = static_cast<unsigned>(::getpid());
    const std::string id = "mb" + std::to_string(pid) + tag;
    a = id + "a";
    b = id + "b";
    va = id + "x";
    vb = id + "y";
    // Each pair's addresses live in its own two namespaces only, so pairs never clash.
    const std::string net =
        "10." + std::to_string(200 + pid % 50) + "." + std::to_string(pid / 50 % 250) + ".";
    ip_a = net + "1";
    ip_b = net + "2";
    ok = sh("ip netns add " + a) == 0 && sh("ip netns add " + b) == 0 &&
         sh("ip link add " + va + " type veth peer name " + vb) == 0 &&
         sh("ip link set " + va + " netns " + a) == 0 &&
         sh("ip link set " + vb + " netns " + b) == 0 &&
         sh("ip -n " + a + " addr add " + ip_a + "/24 dev " + va) == 0 &&
         sh("ip -n " + b + " addr add " + ip_b + "/24 dev " + vb) == 0 &&
         sh("ip -n " + a + " link set " + va + " up") == 0 &&
         sh("ip -n " + b + " link set " + vb + " up") == 0 &&
         sh("ip -n " + a + " link set lo up") == 0 && sh("ip -n " + b + " link set lo up") == 0 &&
         running(a, va) && running(b, vb);
  }
  // Waits (up to 10 s) until the link has its carrier: UCX ignores a device that is not running.
  static bool running(const std::string& ns, const std::string& dev) {
    for (int i = 0; i < 1000; ++i) {
      if (sh("ip -n " + ns + " link show " + dev + " | grep -q 'state UP'") == 0) return true;
      os::sleep_ns(10'000'000);
    }
    return false;
  }
  ~Pair() {
    (void)sh("ip netns del " + a);
    (void)sh("ip netns del " + b);
    (void)sh("ip link del " + va);  // if it was made but never moved into a namespace
  }
  Pair(const Pair&) = delete;
  Pair& operator=(const Pair&) = delete;
};

}  // namespace mbmq::netns
