// net/register.cc: makes mbmq::connect("ucx://...") reach mbmq::net (ipc/foreign_channel.h). A
// member of libmbmq-net.a that nothing references: every target linking mbmq::net is linked with
// --undefined=mbmq_net_register (src/CMakeLists.txt, and mbmq-net.pc), which pulls it in, so that
// linking mbmq::net is all it takes, including for another static object's constructor
// (init_priority, below).
#include "ipc/foreign_channel.h"
#include "mbmq/rendezvous.h"

namespace mbmq::net::detail {

Result<mbmq::Channel> connect_channel(std::string_view url, Deadline deadline,
                                      const mbmq::ConnectOptions& options);

namespace {
struct Register {
  Register() noexcept { mbmq::detail::set_remote_connector(&connect_channel); }
};
// Before the application's own static objects (default priority: 65535), so that one of theirs
// may call mbmq::connect("ucx://...") (review: this object comes after theirs on the link line,
// and was initialised after them). The connector's atomic is constant-initialised. Within one
// ELF module only: a shared library's static object that connects at start-up runs before the
// executable's initialisers, this one included.
const Register g_register __attribute__((init_priority(101)));
}  // namespace

}  // namespace mbmq::net::detail

// The symbol the linker is told is undefined, so that it takes this object out of the archive.
extern "C" void mbmq_net_register() noexcept;
extern "C" __attribute__((used, visibility("default"))) void mbmq_net_register() noexcept {}
