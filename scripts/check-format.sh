#!/usr/bin/env bash
# Fails if any C++ file of the tree is not formatted as .clang-format says (clang-format 14).
set -euo pipefail
cd "$(dirname "$0")/.."
bad=()
while IFS= read -r f; do
  clang-format --dry-run -Werror "$f" >/dev/null 2>&1 || bad+=("$f")
done < <(git ls-files '*.cc' '*.h')
if ((${#bad[@]})); then
  printf 'not clang-format clean (run: clang-format -i FILE):\n'; printf '  %s\n' "${bad[@]}"
  exit 1
fi
echo "clang-format: every file clean"
