// LeakSanitizer's default suppressions for the net tests under ASan (tests/CMakeLists.txt says
// why): allocations made by UCX itself (a stack through ucs_malloc/ucs_calloc in libucs, or
// libucp/libuct) are not reported. LSan calls this hook at startup if the program defines it.
extern "C" const char* __lsan_default_suppressions();
extern "C" const char* __lsan_default_suppressions() {
  return "leak:libucs.so\nleak:libucp.so\nleak:libuct.so\nleak:libucm.so\n";
}
