#!/usr/bin/env bash
# mbmq::net over RDMA (InfiniBand, RoCE, Soft-RoCE): the manual procedure of docs/rdma.md as a
# script, for a host (or two) with an RDMA device. Written on a machine without one: only the
# "no device" path (exit 77) has been run; see docs/rdma.md for what is unverified.
#
#   scripts/rdma-check.sh --probe            is there a usable RDMA device? 0 yes, 77 no (says why)
#   scripts/rdma-check.sh [options]          one host: checks, ucx_perftest, mbmq::net tests, bench
#   scripts/rdma-check.sh --server ADDR      two hosts, first on the server (ADDR: its RDMA netdev's
#   scripts/rdma-check.sh --client ADDR      IPv4 address), then on the client with the same ADDR
#
# Options: --build DIR (default: build), --tls LIST (UCX_TLS, default rc), --addr IP (one host:
# the address to listen on and call; default: the first RDMA netdev's IPv4 address, else
# 127.0.0.1), --port N (two hosts: ucx_perftest's port; mbmq::net uses N+1; default 13337).
# Exit: 0 all steps passed, 77 no RDMA device (skip), 1 a step failed, 2 usage.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

mode=one probe=0 build=build tls=rc addr="" peer="" port=13337
usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
while [ $# -gt 0 ]; do
  case $1 in
    --probe) probe=1 ;;
    --server) mode=server; peer=${2:?--server needs ADDR}; shift ;;
    --client) mode=client; peer=${2:?--client needs ADDR}; shift ;;
    --build) build=${2:?}; shift ;;
    --tls) tls=${2:?}; shift ;;
    --addr) addr=${2:?}; shift ;;
    --port) port=${2:?}; shift ;;
    -h|--help) usage ;;
    *) echo "rdma-check: unknown argument $1" >&2; usage ;;
  esac
  shift
done

failed=0
say() { printf '== %s\n' "$*"; }
fail_step() { printf 'FAIL: %s\n' "$*"; failed=1; }
# Where the kernel lists RDMA devices (another directory only to try this script's own paths on a
# host without RDMA, with --tls tcp; net_rdma_test reads the same variable).
sysfs=${MBMQ_RDMA_SYSFS:-/sys/class/infiniband}

# ---- 1. Is there a usable RDMA device? ------------------------------------------------------
# The kernel's view: /sys/class/infiniband lists InfiniBand, RoCE, iWARP and Soft-RoCE devices
# once their driver (and ib_core) is loaded.
devices=()
if [ -d "$sysfs" ]; then
  for d in "$sysfs"/*; do [ -e "$d" ] && devices+=("${d##*/}"); done
fi
if [ ${#devices[@]} -eq 0 ]; then
  echo "no RDMA device (the kernel has no InfiniBand/RoCE support here): see docs/rdma.md"
  echo "  $sysfs is absent or empty: no RDMA NIC, or its driver is not loaded."
  echo "  Soft-RoCE, where the kernel has rdma_rxe: modprobe rdma_rxe &&"
  echo "  rdma link add rxe0 type rxe netdev eth0"
  exit 77
fi
active=0
for d in "${devices[@]}"; do
  for p in "$sysfs/$d"/ports/*; do
    [ -e "$p/state" ] || continue
    state=$(cat "$p/state") link=$(cat "$p/link_layer" 2>/dev/null || echo "?")
    echo "device $d port ${p##*/}: state ${state#*: }, link layer $link"
    case $state in *ACTIVE*) active=$((active + 1)) ;; esac
  done
done
if command -v ibv_devinfo >/dev/null; then
  ibv_devinfo 2>&1 | grep -E 'hca_id|transport:|state:|link_layer:|active_mtu' | sed 's/^/  /'
else
  echo "  (ibv_devices/ibv_devinfo: apt install ibverbs-utils)"
fi
if command -v rdma >/dev/null; then rdma link show 2>/dev/null | sed 's/^/  /'; fi
if [ "$active" -eq 0 ]; then
  [ "$probe" = 1 ] && { echo "rdma-check: RDMA device(s) ${devices[*]} but no ACTIVE port"; exit 77; }
  echo "rdma-check: RDMA device(s) ${devices[*]} but no ACTIVE port (cable, subnet manager"
  echo "  (opensm) for InfiniBand, link up for RoCE)"
  exit 1
fi

# UCX's view: its ib module (libuct_ib.so in libucx0, which needs libibverbs1 and the NIC's
# provider from ibverbs-providers) must list RDMA transports on the device.
if ! command -v ucx_info >/dev/null; then
  echo "rdma-check: ucx_info not found: apt install ucx-utils"
  exit 1
fi
ucx_info -v | head -1
ucx_d=$(ucx_info -d 2>/dev/null)
ucx_tls=$(awk '/Transport:/ {t=$3} /Device:/ {print t "/" $3}' <<<"$ucx_d" |
          grep -E '^(rc_mlx5|rc_verbs|dc_mlx5|ud_mlx5|ud_verbs)/' | sort -u | tr '\n' ' ')
if [ -z "$ucx_tls" ]; then
  msg="RDMA device(s) ${devices[*]} with an ACTIVE port, but ucx_info -d lists no RDMA transport"
  msg+=" (rc_mlx5, rc_verbs, dc_mlx5, ud_*): is the NIC's verbs provider installed"
  msg+=" (ibverbs-providers), is /dev/infiniband/uverbs* accessible, is ulimit -l large enough?"
  [ "$probe" = 1 ] && { echo "rdma-check: $msg"; exit 77; }
  echo "rdma-check: $msg"
  exit 1
fi
echo "UCX RDMA transports: $ucx_tls"
grep -q 'Connection manager: rdmacm' <<<"$ucx_d" &&
  echo "UCX connection managers: rdmacm and tcp (UCX_SOCKADDR_TLS_PRIORITY=rdmacm,tcp,...)"

# Registered (pinned) memory counts against RLIMIT_MEMLOCK unless the process has CAP_IPC_LOCK.
memlock=$(ulimit -l)
echo "ulimit -l: $memlock"
if [ "$memlock" != unlimited ] && [ "$(id -u)" != 0 ] && [ "$memlock" -lt 262144 ]; then
  echo "  WARNING: below 256 MiB and not root: UCX registers its receive buffers (an rc interface"
  echo "  pins ~37 MB at UCX 1.13's defaults, per mbmq::net worker) and each rendezvous payload;"
  echo "  ibv_reg_mr fails past the limit. Raise it: ulimit -l unlimited, or"
  echo "  /etc/security/limits.d/rdma.conf: '* - memlock unlimited' (docs/rdma.md)."
fi
if [ "$probe" = 1 ]; then
  echo "rdma-check: usable RDMA device(s): ${devices[*]}"
  exit 0
fi

# The address: the RDMA netdev's (RoCE: the Ethernet port's; InfiniBand: IPoIB's), so that UCX's
# rdmacm connection manager can be used; 127.0.0.1 connects through UCX's tcp one.
if [ -z "$addr" ] && command -v rdma >/dev/null; then
  for nd in $(rdma link show 2>/dev/null | sed -n 's/.* netdev \([^ ]*\).*/\1/p'); do
    addr=$(ip -4 -o addr show dev "$nd" 2>/dev/null | awk '{sub(/\/.*/, "", $4); print $4; exit}')
    [ -n "$addr" ] && break
  done
fi
addr=${addr:-127.0.0.1}

export UCX_TLS=$tls
say "UCX_TLS=$UCX_TLS: meant to list RDMA transports only (no tcp, no shared memory), so that what"
say "passes went over the NIC (UCX's connection manager, tcp or rdmacm, only sets connections up)"

# ---- 2. ucx_perftest: raw UCX Active Messages over the same transports ------------------------
# The client logs (UCX_LOG_LEVEL=info) the lanes it chose: "ep_cfg[0]: am(rc_mlx5/mlx5_0:1) ...".
perf_client() {  # SERVER TEST SIZE ITERS
  local out
  for _ in $(seq 30); do
    if out=$(UCX_LOG_LEVEL=info ucx_perftest "$1" -p "$port" -t "$2" -s "$3" -n "$4" -f 2>&1); then
      grep -E 'ep_cfg\[[0-9]+\]' <<<"$out" | sed 's/.*INFO *//' | sort -u | sed 's/^/  lanes: /'
      grep -Ev 'UCX +(INFO|DIAG)|^\+|^\|' <<<"$out" | sed '/^ *$/d; s/^/  /'
      if grep -E 'ep_cfg\[[0-9]+\]' <<<"$out" | grep -qE '(tcp|posix|sysv|cma|self)/'; then
        fail_step "ucx_perftest $2 used a non-RDMA lane (UCX_TLS=$UCX_TLS)"
      fi
      return 0
    fi
    sleep 1
  done
  fail_step "ucx_perftest $2 $3 B: $(tail -3 <<<"$out")"
  return 1
}
perf_server() { ucx_perftest -p "$port" >/dev/null 2>&1; }
perf_tests=("ucp_am_lat 64 100000" "ucp_am_bw 1048576 2000" "ucp_am_bw 8388608 200")

# ---- 3. mbmq::net's tests with only RDMA transports -------------------------------------------
need() {
  [ -x "$build/$1" ] && return 0
  fail_step "$build/$1 not built: cmake --build $build --target ${1##*/}"
  return 1
}

case $mode in
  one)
    say "ucx_perftest on this host (server and client processes), UCX_TLS=$UCX_TLS"
    for t in "${perf_tests[@]}"; do
      read -r name size iters <<<"$t"
      perf_server & srv=$!
      perf_client 127.0.0.1 "$name" "$size" "$iters" || kill "$srv" 2>/dev/null
      wait "$srv" || fail_step "ucx_perftest server ($name) exited non-zero"
    done

    say "net_rdma_test (MBMQ_REQUIRE_RDMA=1: calls of 64 B to 8 MiB over $addr, every byte checked)"
    if need tests/net_rdma_test; then
      MBMQ_REQUIRE_RDMA=1 MBMQ_RDMA_TLS=$UCX_TLS MBMQ_RDMA_ADDR=$addr "$build/tests/net_rdma_test" ||
        fail_step net_rdma_test
    fi

    # The transport-independent tests of mbmq::net (127.0.0.1), now over RDMA, through ctest: one
    # process per test, as they need (each forks its peer before its process loads UCX). Their
    # time bars were set on UCX's tcp transport: a failure is something to look at, not proof of
    # a bug. (Not NetNamespaces/NetBars/NetRate: they set up veth pairs and UCX_NET_DEVICES.)
    say "ctest -R '^(NetChannel|NetReview|NetFlow)\.' over UCX_TLS=$UCX_TLS"
    if need tests/net_test && need tests/net_flow_test; then
      (cd "$build" && ctest -R '^(NetChannel|NetReview|NetFlow)\.' --output-on-failure) ||
        fail_step "mbmq::net tests over $UCX_TLS"
    fi

    # bench/net_bench.cc: 64 B round trips between two processes on 127.0.0.1, mbmq::net beside
    # plain kernel TCP; it leaves UCX_TLS to the environment, so its mbmq rows are over RDMA.
    # (mbmq-net-bench cannot be: it forces UCX_TLS=tcp over a veth pair between namespaces.)
    say "net_bench (64 B round trips, mbmq::net over $UCX_TLS beside kernel TCP loopback)"
    if need bench/net_bench; then
      "$build/bench/net_bench" 20000 || fail_step net_bench
    fi
    ;;

  server)
    say "two hosts, server side: ucx_perftest servers on port $port, then mbmq::net on $peer:$((port + 1))"
    for t in "${perf_tests[@]}"; do
      read -r name _ _ <<<"$t"
      echo "  waiting for the client's $name"
      perf_server || fail_step "ucx_perftest server ($name)"
    done
    if need tests/net_rdma_test; then
      MBMQ_REQUIRE_RDMA=1 MBMQ_RDMA_TLS=$UCX_TLS MBMQ_RDMA_SERVE=$peer:$((port + 1)) \
        "$build/tests/net_rdma_test" || fail_step "net_rdma_test (server)"
    fi
    ;;

  client)
    say "two hosts, client side: ucx_perftest to $peer:$port, then mbmq::net to $peer:$((port + 1))"
    for t in "${perf_tests[@]}"; do
      read -r name size iters <<<"$t"
      perf_client "$peer" "$name" "$size" "$iters"
      sleep 1  # the server starts its next ucx_perftest
    done
    if need tests/net_rdma_test; then
      # Again while connect() fails (the server's listener is not up yet), for up to 30 s.
      for _ in $(seq 30); do
        out=$(MBMQ_REQUIRE_RDMA=1 MBMQ_RDMA_TLS=$UCX_TLS MBMQ_RDMA_PEER=$peer:$((port + 1)) \
              "$build/tests/net_rdma_test" 2>&1)
        rc=$?
        if [ "$rc" = 0 ] || ! grep -q 'ulimit -l too low?' <<<"$out"; then break; fi
        sleep 1
      done
      printf '%s\n' "$out" | tail -20
      [ "$rc" = 0 ] || fail_step "net_rdma_test (client)"
    fi
    ;;
esac

if [ "$failed" = 0 ]; then say "rdma-check: all steps passed"; else say "rdma-check: FAILED (above)"; fi
exit "$failed"
