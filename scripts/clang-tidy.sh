#!/usr/bin/env bash
# Runs clang-tidy (.clang-tidy at the root) on every .cc of src/ and fails on any finding, with the
# compile commands of the clang build (preset tsa, configured here). Part of scripts/test.sh (CI).
# --analyzer adds clang's static analyzer (clang-analyzer-*: slow, see .clang-tidy). Extra
# arguments are file regexes (default: all of src/).
set -euo pipefail
cd "$(dirname "$0")/.."
checks=()
if [ "${1:-}" = --analyzer ]; then
  checks=("-checks=clang-analyzer-*")
  shift
fi
cmake --preset tsa >/dev/null
# Every source file must be in the compile commands, or it would be skipped silently.
missing=$(git ls-files 'src/*.cc' | while read -r f; do
  grep -q "\"file\": \"$PWD/$f\"" build-tsa/compile_commands.json || echo "$f"
done)
if [ -n "$missing" ]; then
  printf 'clang-tidy: not in build-tsa/compile_commands.json (not in src/CMakeLists.txt?):\n%s\n' \
    "$missing"
  exit 1
fi
files=("$@")
((${#files[@]})) || files=("^$PWD/src/.*\\.cc\$")
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
run-clang-tidy -j2 -p build-tsa -quiet "${checks[@]}" "${files[@]}" >"$log" 2>&1 || status=$?
# Counted from the diagnostics themselves (one finding in a header is reported by every file that
# includes it; listed once).
findings=$(sed 's/\x1b\[[0-9;]*m//g' "$log" | grep -E '^/.*:[0-9]+:[0-9]+: (warning|error): ' |
  sed "s|^$PWD/||" | sort -u || true)
if [ -n "$findings" ] || [ "$status" != 0 ]; then
  sed 's/\x1b\[[0-9;]*m//g' "$log" | grep -v '^clang-tidy-[0-9]* \|^[0-9]* warnings\? generated\.$' || true
  printf '\nclang-tidy: %s finding(s), run-clang-tidy exit status %s:\n%s\n' \
    "$(grep -c . <<<"$findings" || true)" "$status" "$findings"
  exit 1
fi
echo "clang-tidy: src/ clean"
