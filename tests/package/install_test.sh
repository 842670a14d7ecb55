#!/usr/bin/env bash
# Installs the build tree into a temporary prefix, then builds and runs a program outside the tree
# against it twice: with find_package(mbmq) (CMake) and with pkg-config. Only include/mbmq may be
# installed as headers.
set -euo pipefail
build=$1
here=$(cd "$(dirname "$0")" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cmake --install "$build" --prefix "$tmp/prefix" >/dev/null
if [ -e "$tmp/prefix/include/os" ] || [ -e "$tmp/prefix/include/ipc" ] || [ -e "$tmp/prefix/include/shm" ]; then
  echo "internal headers were installed"; exit 1
fi
echo "== find_package"
cmake -S "$here" -B "$tmp/cmake" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$tmp/prefix" >/dev/null
cmake --build "$tmp/cmake" >/dev/null
"$tmp/cmake/consumer"
echo "== pkg-config"
pc=$(dirname "$(find "$tmp/prefix" -name mbmq.pc | head -1)")
flags=$(PKG_CONFIG_PATH=$pc pkg-config --cflags --libs mbmq)
echo "pkg-config --cflags --libs mbmq: $flags"
# shellcheck disable=SC2086
c++ -O2 "$here/consumer.cc" -o "$tmp/consumer_pc" $flags
"$tmp/consumer_pc"
echo "package: both consumers built and ran"
