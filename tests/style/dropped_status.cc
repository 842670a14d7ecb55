// Compiled by the test style.a_dropped_status_does_not_compile: it must FAIL to compile (with
// -Werror=unused-result) because a Status is dropped; with -DMBMQ_HANDLED it must compile.
#include "mbmq/mbmq.h"

mbmq::Status may_fail() { return mbmq::fail(mbmq::Errc::TimedOut, "test"); }
mbmq::Result<int> may_fail_int() { return 1; }

int main() {
#ifdef MBMQ_HANDLED
  (void)may_fail();
  (void)may_fail_int();
#else
  may_fail();  // dropped: the error goes unnoticed
  may_fail_int();
#endif
  return 0;
}
