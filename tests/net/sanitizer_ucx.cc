// Sanitizer suppressions for the net tests (tests/CMakeLists.txt says why). UCX is not built
// with the sanitizers, so what it does inside itself is invisible to them:
//  - LeakSanitizer: allocations made by UCX (a stack through ucs_malloc/ucs_calloc in libucs, or
//    libucp/libuct) referenced only from its mmap'd memory pools, which LSan does not scan, read as
//    leaked when a worker is still alive at exit (one kept by the keeper to finish a close, K4);
//  - ThreadSanitizer: UCX's own locks and atomics (its async thread, its spinlocks) are not
//    instrumented, so a race report with a frame in UCX is about synchronization TSan cannot see.
// mbmq's own allocations and races (stacks only in mbmq and the tests) are still reported. The
// sanitizer runtimes call these hooks at startup when the program defines them.
extern "C" const char* __lsan_default_suppressions();
extern "C" const char* __lsan_default_suppressions() {
  return "leak:libucs.so\nleak:libucp.so\nleak:libuct.so\nleak:libucm.so\n";
}
extern "C" const char* __tsan_default_suppressions();
extern "C" const char* __tsan_default_suppressions() {
  return "race:libucs.so\nrace:libucp.so\nrace:libuct.so\nrace:libucm.so\n";
}
