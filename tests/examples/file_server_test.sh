#!/usr/bin/env bash
# examples/file_server against a real HTTP client (curl): whole files, byte ranges (206, 416),
# HEAD, keep-alive, missing files, ".." and symlink escapes, bad requests, and the same bytes in
# every serving mode (sendfile, splice, mmap, copy). Usage: file_server_test.sh EXAMPLES_DIR
set -euo pipefail
bin=$1/file_server
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
fail() { echo "FAIL: $*"; exit 1; }

root=$work/root
mkdir -p "$root/sub" "$root/dir"
head -c 5000000 /dev/urandom >"$root/big.bin"
head -c 64000000 /dev/zero >"$root/huge.bin"  # more than loopback's socket buffers hold
printf 'hello, file server\n' >"$root/sub/a.txt"
printf '<h1>index</h1>\n' >"$root/index.html"
printf 'secret\n' >"$work/outside.txt"
ln -s "$work/outside.txt" "$root/escape"
ln -s /etc/passwd "$root/passwd"

start() {  # start MODE... ; sets $port
  local out=$work/server.$RANDOM
  "$bin" --root "$root" --port 0 "$@" >"$out" 2>"$out.err" &
  pids+=($!)
  for _ in $(seq 100); do
    port=$(sed -n 's|.*http://127.0.0.1:\([0-9]*\)/.*|\1|p' "$out")
    [ -n "$port" ] && return 0
    sleep 0.05
  done
  fail "file_server did not start: $(cat "$out.err")"
}
code() { curl -s -o /dev/null -w '%{http_code}' "$@"; }
url() { echo "http://127.0.0.1:$port$1"; }

for mode in sendfile splice mmap copy; do
  start --mode "$mode" --quiet
  echo "== mode $mode (port $port)"
  curl -sf -o "$work/got" "$(url /big.bin)" || fail "$mode: GET big.bin"
  cmp -s "$work/got" "$root/big.bin" || fail "$mode: big.bin differs"
  # Ranges: a middle one, an open-ended one, a suffix, one past the end (clamped).
  for r in 100-199 4999000- -777 4999990-6000000; do
    curl -s -D "$work/h" -o "$work/got" -r "$r" "$(url /big.bin)"
    grep -q "^HTTP/1.1 206" "$work/h" || fail "$mode: range $r not 206"
    case $r in
      -*) n=${r#-}; start_at=$((5000000 - n)); len=$n ;;
      *-) start_at=${r%-}; len=$((5000000 - start_at)) ;;
      *) start_at=${r%-*}; end=${r#*-}; [ "$end" -ge 5000000 ] && end=4999999; len=$((end - start_at + 1)) ;;
    esac
    dd if="$root/big.bin" of="$work/want" iflag=skip_bytes,count_bytes skip="$start_at" count="$len" status=none
    cmp -s "$work/got" "$work/want" || fail "$mode: range $r body differs"
    grep -qi "^Content-Range: bytes $start_at-$((start_at + len - 1))/5000000" "$work/h" ||
      fail "$mode: range $r Content-Range: $(grep -i content-range "$work/h")"
  done
  [ "$mode" = sendfile ] || continue
  # Unsatisfiable range: 416 with the size.
  curl -s -D "$work/h" -o /dev/null -r 6000000-6000100 "$(url /big.bin)"
  grep -q "^HTTP/1.1 416" "$work/h" || fail "416 expected"
  grep -qi "^Content-Range: bytes \*/5000000" "$work/h" || fail "416 without Content-Range */size"
  # HEAD: headers only.
  curl -s -I "$(url /big.bin)" >"$work/h"
  grep -qi "^Content-Length: 5000000" "$work/h" || fail "HEAD Content-Length"
  [ "$(curl -s -I "$(url /big.bin)" | wc -c)" -lt 400 ] || fail "HEAD sent a body"
  # Keep-alive: three requests, one connection.
  conns=$(curl -s -w '%{num_connects}\n' -o /dev/null -o /dev/null -o /dev/null \
    "$(url /sub/a.txt)" "$(url /big.bin)" "$(url /index.html)" | paste -sd+ | bc)
  [ "$conns" = 1 ] || fail "keep-alive: $conns connections for 3 requests"
  # Missing files and escapes.
  [ "$(code "$(url /nope.txt)")" = 404 ] || fail "missing file not 404"
  [ "$(code "$(url /dir)")" = 404 ] || fail "directory not 404"
  [ "$(code --path-as-is "$(url /../outside.txt)")" = 400 ] || fail "/../ not 400"
  [ "$(code --path-as-is "$(url /sub/../../outside.txt)")" = 400 ] || fail "/sub/../../ not 400"
  [ "$(code --path-as-is "$(url /sub/%2e%2e/%2e%2e/outside.txt)")" = 400 ] || fail "%2e%2e not 400"
  [ "$(code "$(url /escape)")" = 404 ] || fail "symlink out of the root not 404"
  [ "$(code "$(url /passwd)")" = 404 ] || fail "symlink to /etc/passwd not 404"
  [ "$(code "$(url /sub/a.txt%00.html)")" = 400 ] || fail "NUL not 400"
  [ "$(code "$(url /)")" = 200 ] || fail "/ (index.html) not 200"
  [ "$(code -X POST "$(url /big.bin)")" = 405 ] || fail "POST not 405"
  [ "$(code -H 'Content-Length: 5' --data-binary 12345 -X GET "$(url /big.bin)")" = 400 ] ||
    fail "GET with a body not 400"
  # Garbage on the wire: 400, and the server lives on.
  exec 3<>"/dev/tcp/127.0.0.1/$port"
  printf 'THIS IS NOT HTTP\r\n\r\n' >&3
  head -1 <&3 | grep -q "^HTTP/1.1 400" || fail "garbage request not 400"
  exec 3>&-
  # An oversized head: 431, connection closed.
  exec 3<>"/dev/tcp/127.0.0.1/$port"
  { printf 'GET / HTTP/1.1\r\n'; head -c 20000 /dev/zero | tr '\0' 'a'; } >&3 2>/dev/null || true
  head -1 <&3 | grep -q "^HTTP/1.1 431" || fail "oversized head not 431"
  exec 3>&-
  # Eight clients at once.
  clients=()
  for i in $(seq 8); do curl -sf -o "$work/par$i" "$(url /big.bin)" & clients+=($!); done
  for c in "${clients[@]}"; do wait "$c" || fail "parallel client failed"; done
  for i in $(seq 8); do cmp -s "$work/par$i" "$root/big.bin" || fail "parallel client $i"; done
  # Clients that leave mid-body (the server gets EPIPE, and must not die of SIGPIPE).
  for i in 1 2 3; do
    curl -s "$(url /huge.bin)" | head -c 1000 >/dev/null || true
    exec 3<>"/dev/tcp/127.0.0.1/$port"
    printf 'GET /huge.bin HTTP/1.1\r\nHost: x\r\n\r\n' >&3
    exec 3>&-
  done
  sleep 0.3
  # Still serving after all of that.
  curl -sf -o "$work/got" "$(url /sub/a.txt)" && cmp -s "$work/got" "$root/sub/a.txt" ||
    fail "server broken after bad input"
  kill -0 "${pids[0]}" || fail "server died"
done
echo "ok: file_server passes with curl in every mode"
