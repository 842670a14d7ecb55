#!/usr/bin/env bash
# examples/file_server against a real HTTP client (curl): whole files, byte ranges (206, 416),
# HEAD, keep-alive, missing files, ".." and symlink escapes, bad requests, and the same bytes in
# every serving mode (sendfile, splice, mmap, copy); then hostile clients (python3): the exact
# 16 KiB head limit, 10,000 headers, a FIFO in the root, slowloris. Usage: file_server_test.sh
# EXAMPLES_DIR
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

# Raw clients for what curl cannot do. `client.py PORT head N`: a GET head of exactly N bytes;
# prints the status code. `client.py PORT headers N`: a GET with N headers, sent whole, then reads
# to the end; prints the status code and "eof" (an orderly close) or "reset". `client.py PORT
# dribble N SECONDS READY`: N connections that each send one byte of a never-ending head every
# 0.5 s for SECONDS (ignoring errors, never reconnecting); creates READY once all N have begun.
cat >"$work/client.py" <<'PY'
import socket, sys, time
port, what, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
def connect():
    return socket.create_connection(("127.0.0.1", port), timeout=5)
def status(data):
    return data.split(b" ")[1].decode() if data.startswith(b"HTTP/1.1 ") else "none"
if what == "head":
    base = b"GET /sub/a.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Pad: "
    head = base + b"p" * (n - len(base) - 4) + b"\r\n\r\n"
    assert len(head) == n
    s = connect()
    s.sendall(head)
    print(status(s.recv(64)))
elif what == "headers":
    head = b"GET /sub/a.txt HTTP/1.1\r\nHost: x\r\n"
    head += b"".join(b"X-Header-%05d: a value for the header\r\n" % i for i in range(n)) + b"\r\n"
    s = connect()
    data, end = b"", "eof"
    try:
        s.sendall(head)
        while chunk := s.recv(65536):
            data += chunk
    except OSError as e:
        end = "reset" if isinstance(e, ConnectionResetError) else type(e).__name__
    print(status(data), end)
elif what == "dribble":
    seconds, ready = float(sys.argv[4]), sys.argv[5]
    text = b"GET /sub/a.txt HTTP/1.1\r\n" + b"X-Slow: x\r\n" * 10000
    socks = [connect() for _ in range(n)]
    for s in socks:
        s.sendall(text[:1])
    open(ready, "w").close()
    sent, stop = 1, time.monotonic() + seconds
    while time.monotonic() < stop:
        time.sleep(0.5)
        for s in socks:
            try:
                s.send(text[sent:sent + 1])
            except OSError:
                pass
        sent += 1
PY

root=$work/root
mkdir -p "$root/sub" "$root/dir"
head -c 5000000 /dev/urandom >"$root/big.bin"
head -c 64000000 /dev/zero >"$root/huge.bin"  # more than loopback's socket buffers hold
printf 'hello, file server\n' >"$root/sub/a.txt"
printf '<h1>index</h1>\n' >"$root/index.html"
printf 'secret\n' >"$work/outside.txt"
ln -s "$work/outside.txt" "$root/escape"
ln -s /etc/passwd "$root/passwd"

servers=0
start() {  # start MODE... ; sets $port
  # The file exists before the server starts: the shell that runs it in the background creates it
  # only when that child is scheduled, which on a loaded machine can be after the first look.
  local out=$work/server.$((++servers))
  : >"$out"
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
  # A trailing slash (or "/.") names a directory: on a regular file it is 404, not the file.
  for t in /index.html/ /sub/a.txt/ /sub/a.txt/. /sub/a.txt%2F /sub/; do
    [ "$(code "$(url "$t")")" = 404 ] || fail "$t not 404"
  done
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
  # The limit is exact: a head of 16 KiB is served, one byte more is 431.
  [ "$(python3 "$work/client.py" "$port" head 16384)" = 200 ] || fail "16384-byte head not 200"
  [ "$(python3 "$work/client.py" "$port" head 16385)" = 431 ] || fail "16385-byte head not 431"
  # 10,000 headers (400 KB, sent whole): the client gets its 431 and an orderly close, not a
  # reset for the bytes the server never read.
  got=$(python3 "$work/client.py" "$port" headers 10000)
  [ "$got" = "431 eof" ] || fail "10,000 headers: $got, want 431 eof"
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

echo "== hostile clients"
# A FIFO in the root: opening it must not block a worker (it is 404 at once, like any file that is
# not regular), so 20 requests for it leave a 16-connection server serving. 20 at once against 16
# connections may meet a full server (503: the first 16 workers answered but had not yet ended on a
# loaded machine): such a request is retried. Were the opens to block, 16 workers would stay held,
# every retry would get 503 and the first 16 would time out (000).
mkfifo "$root/fifo"
start --quiet --max-connections 16
fifo_get() {
  local c
  for _ in $(seq 20); do
    c=$(code -m 2 "$(url /fifo)") || true
    [ "$c" = 503 ] || break
    sleep 0.1
  done
  echo "$c"
}
clients=()
for i in $(seq 20); do fifo_get >"$work/fifo$i" & clients+=($!); done
for c in "${clients[@]}"; do wait "$c" || true; done
for i in $(seq 20); do
  [ "$(cat "$work/fifo$i")" = 404 ] || fail "request $i for a FIFO: $(cat "$work/fifo$i")"
done
[ "$(code -m 2 "$(url /sub/a.txt)")" = 200 ] || fail "not serving after requests for a FIFO"
rm "$root/fifo"

# Slowloris: 16 connections that dribble a byte every 0.5 s hold all 16 workers only until the
# request-head deadline (1.5 s here); a normal request then succeeds while they still dribble.
start --quiet --max-connections 16 --head-timeout-ms 1500
python3 "$work/client.py" "$port" dribble 16 10 "$work/dribbling" &
dribbler=$!
pids+=($dribbler)
for _ in $(seq 100); do [ -e "$work/dribbling" ] && break; sleep 0.05; done
[ -e "$work/dribbling" ] || fail "slowloris clients did not connect"
got=
for _ in $(seq 12); do  # 12 tries, 0.5 s apart (503 comes at once while all workers are held)
  got=$(code -m 1 "$(url /sub/a.txt)") || true
  [ "$got" = 200 ] && break
  sleep 0.5
done
[ "$got" = 200 ] || fail "slowloris: a normal request got $got"
kill -0 "$dribbler" 2>/dev/null || fail "slowloris: the clients stopped before the check"
kill "$dribbler"

echo "ok: file_server passes with curl in every mode"
