#!/usr/bin/env bash
# Installs every Debian package mbmq needs to build, test and benchmark. Idempotent; run as root
# (or with sudo available). Used by scripts/bench.sh, scripts/test.sh and therefore by CI.
set -euo pipefail
pkgs=(build-essential cmake ninja-build pkg-config
      libgtest-dev libgmock-dev libbenchmark-dev
      libexpected-dev libcli11-dev nlohmann-json3-dev libfmt-dev libasio-dev
      strace valgrind
      libzmq3-dev libboost-dev iceoryx libiceoryx-posh-dev libiceoryx-hoofs-dev
      clang libclang-rt-14-dev clang-format clang-tidy
      curl nginx-light
      libucx-dev ucx-utils iproute2
      python3-dev python3-pybind11 pybind11-dev python3-numpy python3-pytest)
# libasio-dev (third line): standalone asio, header-only, for mbmq/asio.h, its example and tests,
# and `mbmq bench --async`; the library itself does not need it. The fourth line: what
# `mbmq bench` compares against (ZeroMQ, Boost.Interprocess, iceoryx and its RouDi). The fifth:
# libFuzzer and FuzzedDataProvider.h for the fuzz targets, the clang build (preset tsa:
# -Wthread-safety) and the style checks: clang-format (scripts/check-format.sh, a test) and
# clang-tidy (scripts/clang-tidy.sh). The sixth: the HTTP client of the file_server tests and the
# server `mbmq files` compares file_server against. The seventh: UCX for the opt-in mbmq::net
# (src/net/, built only where UCX is found), ucx_perftest to compare with, and `ip` for its
# network-namespace tests. The last line: the Python module (python/,
# built for /usr/bin/python3 with pybind11) and its tests (pytest, NumPy); without them the C++
# build goes on and skips it. build-essential brings dpkg-dev, whose dpkg-shlibdeps gives the .deb
# (cpack -G DEB) its dependencies.
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y "${missing[@]}"
fi
