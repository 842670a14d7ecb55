// A static library of an application that uses mbmq::net (review_remote_test's transitive-link
// case): the application's executable links this library only, never mbmq::net itself.
#include "mbmq/net.h"

namespace review_remote {
bool net_available() { return mbmq::net::listen("ucx://127.0.0.1:0/svc").has_value(); }
}  // namespace review_remote
