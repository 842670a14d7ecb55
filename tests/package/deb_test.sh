#!/usr/bin/env bash
# The Debian package (#17): `cpack -G DEB` in the build directory makes libmbmq-dev_*.deb; it holds
# the headers, the library (and libmbmq-net.a, mbmq-net.pc where UCX was found), the CMake
# package, mbmq.pc and the `mbmq` program under /usr; then:
#  - with CI=true, as root (CI is a throwaway machine): `apt-get install -y ./libmbmq-dev_*.deb`
#    into the system, as a user would; /usr/bin/mbmq bench --quick runs; consumer.cc builds with
#    find_package(mbmq) and with pkg-config from /usr, no paths given, and runs; the package is
#    removed at the end;
#  - otherwise (a developer's machine: never install into /): apt checks that its dependencies
#    resolve (`apt-get install --simulate`, as root), the package is unpacked into a scratch root,
#    and its mbmq bench --quick and both consumers run from there.
# Usage: deb_test.sh BUILD_DIR CXX
set -euo pipefail
build=$(cd "$1" && pwd)
cxx=$2
here=$(cd "$(dirname "$0")" && pwd)
tmp=$(mktemp -d)
installed=0
cleanup() {
  if [ "$installed" = 1 ]; then dpkg -r libmbmq-dev >/dev/null || true; fi
  rm -rf "$tmp"
}
trap cleanup EXIT

(cd "$build" && cpack -G DEB -B "$tmp/out" >/dev/null)
deb=$(ls "$tmp"/out/libmbmq-dev_*.deb)
echo "== $(basename "$deb"): $(du -h "$deb" | cut -f1)"
dpkg-deb -f "$deb" Package Version Depends
dpkg-deb -c "$deb" | awk '{print $6}' > "$tmp/files"
for f in ./usr/include/mbmq/mbmq.h ./usr/include/mbmq/channel.h ./usr/lib/libmbmq.a \
  ./usr/lib/cmake/mbmq/mbmqConfig.cmake ./usr/lib/cmake/mbmq/mbmqConfigVersion.cmake \
  ./usr/lib/pkgconfig/mbmq.pc ./usr/bin/mbmq; do
  grep -qx "$f" "$tmp/files" || { echo "missing from the package: $f"; exit 1; }
done
# mbmq::net, where the build has it (a static libmbmq and UCX found: src/CMakeLists.txt).
net=0
if [ -e "$build/mbmq-net.pc" ]; then
  net=1
  for f in ./usr/lib/libmbmq-net.a ./usr/lib/pkgconfig/mbmq-net.pc ./usr/include/mbmq/net.h; do
    grep -qx "$f" "$tmp/files" || { echo "missing from the package: $f"; exit 1; }
  done
fi

if [ "${CI:-}" = true ] && [ "$(id -u)" = 0 ]; then
  echo "== CI: apt-get install ./$(basename "$deb")"
  DEBIAN_FRONTEND=noninteractive apt-get install -y "$deb" >"$tmp/apt.log" 2>&1 ||
    { cat "$tmp/apt.log"; exit 1; }
  installed=1
  prefix=/usr
  cmake_prefix=()
  pc_path=
else
  if [ "$(id -u)" = 0 ]; then
    echo "== apt-get install --simulate ./$(basename "$deb") (dependencies resolve)"
    apt-get install --simulate "$deb" >"$tmp/apt.log" 2>&1 || { cat "$tmp/apt.log"; exit 1; }
  fi
  echo "== unpacked into a scratch root (set CI=true to install it into the system)"
  dpkg-deb -x "$deb" "$tmp/root"
  prefix=$tmp/root/usr
  cmake_prefix=(-DCMAKE_PREFIX_PATH="$prefix")
  pc_path=$prefix/lib/pkgconfig
fi

echo "== $prefix/bin/mbmq bench --quick"
"$prefix/bin/mbmq" bench --quick --json >"$tmp/bench.json"
if grep -q '"error": "[^u]' "$tmp/bench.json"; then
  grep '"error"' "$tmp/bench.json"
  exit 1
fi
grep -c '"p50_ns"' "$tmp/bench.json" | sed 's/^/rows measured: /'

echo "== consumers against $prefix"
cmake -S "$here" -B "$tmp/cmake" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_COMPILER="$cxx" \
  "${cmake_prefix[@]}" >/dev/null
cmake --build "$tmp/cmake" >/dev/null
"$tmp/cmake/consumer"
# shellcheck disable=SC2046  # word splitting of pkg-config's flags is intended
"$cxx" -O2 "$here/consumer.cc" -o "$tmp/pc-consumer" \
  $(PKG_CONFIG_PATH=$pc_path pkg-config --define-prefix --cflags --libs mbmq)
"$tmp/pc-consumer"
if [ "$net" = 1 ]; then
  [ -e "$tmp/cmake/consumer_net" ] || { echo "find_package(mbmq) offered no mbmq::net"; exit 1; }
  "$tmp/cmake/consumer_net"
  "$tmp/cmake/consumer_net_transitive"
  # shellcheck disable=SC2046
  "$cxx" -O2 "$here/consumer_net.cc" -o "$tmp/pc-consumer-net" \
    $(PKG_CONFIG_PATH=$pc_path pkg-config --define-prefix --cflags --libs mbmq-net)
  "$tmp/pc-consumer-net"
fi
echo "deb: built, installed ($([ $installed = 1 ] && echo system || echo scratch root)), ran"
