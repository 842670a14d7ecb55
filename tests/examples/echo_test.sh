#!/usr/bin/env bash
# echo_server and echo_client as two separately started programs: one call; a looping client gets
# peer-closed (and exits non-zero) when the server is SIGKILLed; a restarted server serves the same
# name at once. Usage: echo_test.sh BUILD_DIR/examples
set -u
dir=$1
name="echo-test-$$"
# Kills only what this script started (kill 0 would kill the whole process group, ctest included).
fail() {
  echo "FAIL: $*"
  for p in ${srv:-} ${loop:-}; do kill -9 "$p" 2>/dev/null; done
  exit 1
}
wait_listening() { for _ in $(seq 50); do "$dir/echo_client" "$name" >/dev/null 2>&1 && return 0; sleep 0.1; done; return 1; }

"$dir/echo_server" "$name" >/dev/null & srv=$!
wait_listening || fail "server did not come up"
"$dir/echo_client" "$name" || fail "one call"
"$dir/echo_client" "$name" --loop 2>/tmp/echo_loop.$$ & loop=$!
sleep 0.3
kill -9 "$srv"; wait "$srv" 2>/dev/null
if timeout 5 tail --pid="$loop" -f /dev/null; then :; else fail "looping client hung after the server died"; fi
wait "$loop"; rc=$?
[ "$rc" -ne 0 ] || fail "looping client exited 0 after the server died"
grep -q "peer-closed" /tmp/echo_loop.$$ || fail "looping client did not say peer-closed: $(cat /tmp/echo_loop.$$)"
rm -f /tmp/echo_loop.$$
"$dir/echo_server" "$name" >/dev/null & srv=$!
wait_listening || fail "restarted server did not serve the same name"
"$dir/echo_client" "$name" || fail "call to the restarted server"
kill -9 "$srv"; wait "$srv" 2>/dev/null
echo "ok: echo_server/echo_client"

# The same over UCX (#19) when the build has mbmq::net (second argument "ucx"): one call, a wrong
# service refused, a looping client told peer-closed when the server is killed; then one server
# serving a local name and a ucx:// URL from one queue.
if [ "${2:-}" = ucx ]; then
  url="ucx://127.0.0.1:$((20000 + $$ % 20000))/echo"
  name=$url
  "$dir/echo_server" "$url" >/dev/null & srv=$!
  wait_listening || fail "ucx server did not come up"
  "$dir/echo_client" "$url" || fail "one ucx call"
  "$dir/echo_client" "${url%/echo}/other" 2>&1 | grep -q "no such service" || fail "wrong service not refused"
  "$dir/echo_client" "$url" --loop 2>/tmp/echo_loop.$$ & loop=$!
  sleep 0.3
  kill -9 "$srv"; wait "$srv" 2>/dev/null
  if timeout 5 tail --pid="$loop" -f /dev/null; then :; else fail "ucx looping client hung after the server died"; fi
  wait "$loop"; rc=$?
  [ "$rc" -ne 0 ] || fail "ucx looping client exited 0 after the server died"
  grep -q "peer-closed" /tmp/echo_loop.$$ || fail "ucx looping client did not say peer-closed: $(cat /tmp/echo_loop.$$)"
  rm -f /tmp/echo_loop.$$
  # One server loop for a local name and a ucx:// URL at once (remote clients through net::Bridge).
  both="echo-test-both-$$"
  "$dir/echo_server" "$both" "$url" >/dev/null & srv=$!
  wait_listening || fail "local+ucx server did not come up"
  "$dir/echo_client" "$both" || fail "local call to the local+ucx server"
  "$dir/echo_client" "$url" || fail "ucx call to the local+ucx server"
  kill -9 "$srv"; wait "$srv" 2>/dev/null
  echo "ok: echo_server/echo_client over ucx://"
fi
