// net/register.cc: makes mbmq::connect("ucx://...") reach mbmq::net (ipc/foreign_channel.h). An
// object file every target linking mbmq::net gets on its link line (src/CMakeLists.txt), not an
// archive member a linker could leave out: linking mbmq::net is all it takes.
#include "ipc/foreign_channel.h"
#include "mbmq/rendezvous.h"

namespace mbmq::net::detail {

Result<mbmq::Channel> connect_channel(std::string_view url, Deadline deadline,
                                      const mbmq::ConnectOptions& options);

namespace {
struct Register {
  Register() noexcept { mbmq::detail::set_remote_connector(&connect_channel); }
};
const Register g_register;
}  // namespace

}  // namespace mbmq::net::detail
