#!/usr/bin/env bash
# House review (review2): Error::message() (src/os/error.cc) appends the result of ::strerror_r as
# if it were always the GNU variant (char*). Where the XSI variant is declared (musl, or glibc
# without _GNU_SOURCE) it returns int, and `s += int` compiles (std::string::operator+=(char)):
# the message then ended in a NUL byte instead of the error's text. This compiles error.cc in the
# XSI variant and checks that the text is there (a test: style.strerror_r_either_variant).
# Usage: strerror_xsi_test.sh [CXX]
set -euo pipefail
cxx=${1:-${CXX:-c++}}
src=$(cd "$(dirname "$0")/../.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cat >"$tmp/main.cc" <<'CC'
#include <cstdio>
#include "mbmq/result.h"
int main() {
  const std::string m = mbmq::Error::from_syscall("open", 2).message();  // ENOENT
  std::printf("message: \"%s\" (%zu bytes)\n", m.c_str(), m.size());
  return m.find("No such file") != std::string::npos && m.find('\0') == std::string::npos ? 0 : 1;
}
CC
"$cxx" -std=c++20 -U_GNU_SOURCE -D_POSIX_C_SOURCE=200809L -I"$src/include" \
  "$src/src/os/error.cc" "$tmp/main.cc" -o "$tmp/xsi"
if "$tmp/xsi"; then
  echo "PASS: Error::message() has the error's text with the XSI strerror_r"
else
  echo "FAIL: Error::message() lost the error's text with the XSI strerror_r (src/os/error.cc)"
  exit 1
fi
