// mbmq/export.h: MBMQ_EXPORT marks what libmbmq exports, the public types and functions of
// include/mbmq. The library is compiled with -fvisibility=hidden -fvisibility-inlines-hidden, so a
// shared libmbmq.so exports these and nothing else: its internals (the os/, shm/ and ipc/ code) and
// the templates it instantiates stay private, and can change without breaking applications.
//
//   class MBMQ_EXPORT Channel { ... };         // its out-of-line members are exported
//   MBMQ_EXPORT std::int64_t monotonic_ns() noexcept;
//
// One definition serves the shared and the static library, for building them and for using them:
// on ELF, default visibility is all that exporting and importing take (there is no dllimport), and
// it changes nothing for a program that links the static libmbmq.a.
#pragma once

#define MBMQ_EXPORT __attribute__((visibility("default")))
