#!/usr/bin/env bash
# The installed package, in both of its forms, used by a program outside the tree (consumer.cc),
# built with find_package(mbmq) (CMake) and with pkg-config, and run (one call between two
# processes). The build tree is installed into a temporary prefix, and the library alone in its
# other form (configured and built again in a temporary directory with MBMQ_LIBRARY_ONLY=ON and
# BUILD_SHARED_LIBS flipped, then installed), so both are tested whichever the tree is:
#  - static: libmbmq.a alone, no .so; the consumers need no libmbmq;
#  - shared: libmbmq.so and its links; both consumers need it by its SONAME, and it exports mbmq::
#    names only, none from the internal namespaces (mbmq::os, mbmq::shm, mbmq::detail but for
#    assert_fail, which MBMQ_ASSERT calls).
# Either way only include/mbmq is installed as headers. Where this tree builds mbmq::net (UCX found),
# the static form also installs libmbmq-net.a: find_package's mbmq::net and pkg-config's mbmq-net
# then build consumer_net.cc, whose mbmq::connect("ucx://...") call must be answered; the shared
# form must not install it (mbmq::net uses the internals a shared libmbmq hides).
# Usage: install_test.sh BUILD_DIR CXX VERSION SHARED NET (the build tree's compiler, project
# version, whether it builds libmbmq shared and whether it builds mbmq::net: 1 or 0 each).
set -euo pipefail
build=$1
cxx=$2
version=$3
tree_shared=$4
net=${5:-0}
soname=libmbmq.so.${version%.*}
here=$(cd "$(dirname "$0")" && pwd)
src=$(cd "$here/../.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() {
  echo "FAIL: $*"
  exit 1
}

# check_files PREFIX EXPECTED: the headers are include/mbmq only; the library files are EXPECTED.
check_files() {
  [ "$(ls "$1/include")" = mbmq ] || fail "$1/include holds more than mbmq/: $(ls "$1/include")"
  local libs
  libs=$(find "$1" \( -name '*.a' -o -name '*.so*' \) -printf '%f\n' | sort | xargs)
  [ "$libs" = "$2" ] || fail "expected the library files $2, found: $libs"
  echo "installed: $libs"
}

# consume NAME PREFIX: builds and runs both consumers against the package in PREFIX; they are
# $tmp/NAME-cmake/consumer and $tmp/NAME-pkg-config.
consume() {
  local name=$1 prefix=$2 pc flags
  echo "== $name: find_package"
  cmake -S "$here" -B "$tmp/$name-cmake" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_CXX_COMPILER="$cxx" -DCMAKE_PREFIX_PATH="$prefix" >/dev/null
  cmake --build "$tmp/$name-cmake" >/dev/null
  "$tmp/$name-cmake/consumer"
  echo "== $name: pkg-config"
  pc=$(dirname "$(find "$prefix" -name mbmq.pc | head -1)")
  flags=$(PKG_CONFIG_PATH=$pc pkg-config --cflags --libs mbmq)
  echo "pkg-config --cflags --libs mbmq: $flags"
  # shellcheck disable=SC2086
  "$cxx" -O2 "$here/consumer.cc" -o "$tmp/$name-pkg-config" $flags
  # The library directory, for the shared case (no rpath in a plain compiler command).
  LD_LIBRARY_PATH=$(dirname "$pc") "$tmp/$name-pkg-config"
  if [ -e "$tmp/$name-cmake/consumer_net" ]; then
    echo "== $name: mbmq::net (find_package, then pkg-config mbmq-net)"
    "$tmp/$name-cmake/consumer_net"
    "$tmp/$name-cmake/consumer_net_transitive"
    flags=$(PKG_CONFIG_PATH=$pc pkg-config --cflags --libs mbmq-net)
    echo "pkg-config --cflags --libs mbmq-net: $flags"
    # shellcheck disable=SC2086
    "$cxx" -O2 "$here/consumer_net.cc" -o "$tmp/$name-pkg-config-net" $flags
    "$tmp/$name-pkg-config-net"
  fi
}

# needs EXE: the shared libraries EXE needs (NEEDED entries).
needs() { readelf -d "$1" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | xargs; }

# check_shared PREFIX: libmbmq.so with its SONAME, exporting mbmq:: names only (none from the
# internal namespaces).
check_shared() {
  local so got n
  so=$(find "$1" -name "libmbmq.so.$version")
  got=$(readelf -d "$so" | sed -n 's/.*(SONAME).*\[\(.*\)\]/\1/p')
  [ "$got" = "$soname" ] || fail "SONAME is '$got', expected $soname"
  # The dynamic symbol table, demangled: "ADDRESS TYPE NAME".
  nm -D --defined-only -C "$so" | sed -E 's/^[0-9a-f]+ [A-Za-z] //' >"$tmp/exports"
  n=$(wc -l <"$tmp/exports")
  echo "libmbmq.so.$version (SONAME $got) exports $n symbols, e.g.:"
  grep -m 3 -F 'mbmq::Channel::' "$tmp/exports" | sed 's/^/  /'
  grep -q -F 'mbmq::Channel::call(mbmq::Buffer&, mbmq::Deadline)' "$tmp/exports" ||
    fail "mbmq::Channel::call is not exported"
  if grep -v '^mbmq::' "$tmp/exports" | grep . >"$tmp/bad" ||
    grep -E '^mbmq::(os|shm)::|^mbmq::detail::' "$tmp/exports" |
    grep -v '^mbmq::detail::assert_fail(' >"$tmp/bad"; then
    fail "exported beyond the public API:$(head -20 "$tmp/bad" | sed 's/^/\n  /')"
  fi
}

# verify NAME KIND PREFIX: the package in PREFIX is of KIND (static or shared); both consumers
# build and run against it, and need libmbmq.so by its SONAME (shared) or not at all (static).
verify() {
  local name=$1 kind=$2 prefix=$3 exe needed
  if [ "$kind" = static ] && [ "$net" = 1 ]; then
    check_files "$prefix" "libmbmq-net.a libmbmq.a"
  elif [ "$kind" = static ]; then
    check_files "$prefix" libmbmq.a
  else
    check_files "$prefix" "libmbmq.so $soname libmbmq.so.$version"
    check_shared "$prefix"
  fi
  consume "$name" "$prefix"
  if [ "$kind" = static ] && [ "$net" = 1 ] && [ ! -e "$tmp/$name-cmake/consumer_net" ]; then
    fail "find_package(mbmq) offered no mbmq::net beside a static libmbmq"
  fi
  for exe in "$tmp/$name-cmake/consumer" "$tmp/$name-pkg-config"; do
    needed=" $(needs "$exe") "
    if [ "$kind" = static ] && [[ $needed == *" libmbmq"* ]]; then
      fail "$exe needs a shared libmbmq:$needed"
    elif [ "$kind" = shared ] && [[ $needed != *" $soname "* ]]; then
      fail "$exe does not need $soname:$needed"
    fi
  done
}

if [ "$tree_shared" = 1 ]; then
  tree=shared other=static other_shared=OFF
else
  tree=static other=shared other_shared=ON
fi
echo "== $tree: the build tree, installed"
cmake --install "$build" --prefix "$tmp/tree" >/dev/null
verify "$tree" "$tree" "$tmp/tree"

echo "== $other: the library alone, built again with BUILD_SHARED_LIBS=$other_shared"
cmake -S "$src" -B "$tmp/alone-build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_CXX_COMPILER="$cxx" -DBUILD_SHARED_LIBS=$other_shared -DMBMQ_LIBRARY_ONLY=ON \
  -DCMAKE_INSTALL_PREFIX="$tmp/alone" >/dev/null
cmake --build "$tmp/alone-build" -j2 >/dev/null
cmake --install "$tmp/alone-build" >/dev/null
verify "$other" "$other" "$tmp/alone"
echo "package: static and shared, both consumers built and ran"
