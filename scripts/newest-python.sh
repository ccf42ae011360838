#!/usr/bin/env bash
# Print the path of the newest installed CPython >= 3.12 (pyenv versions first, then python3.1x on PATH).
# Exit 1 with a message when there is none: the second test leg must not be skipped silently.
set -euo pipefail
candidates=()
if command -v pyenv >/dev/null 2>&1; then
  root="$(pyenv root)"
  for dir in "$root"/versions/*; do
    [ -x "$dir/bin/python" ] && candidates+=("$dir/bin/python")
  done
fi
for name in python3.14 python3.13 python3.12; do
  command -v "$name" >/dev/null 2>&1 && candidates+=("$(command -v "$name")")
done
best=""; best_version=0
for py in "${candidates[@]}"; do
  v="$("$py" -c 'import sys; print(sys.version_info[0] * 100 + sys.version_info[1])' 2>/dev/null)" || continue
  if [ "$v" -ge 312 ] && [ "$v" -gt "$best_version" ]; then best="$py"; best_version="$v"; fi
done
if [ -z "$best" ]; then
  echo "newest-python.sh: no CPython >= 3.12 found (pyenv versions or python3.12+ on PATH); install one" >&2
  exit 1
fi
echo "$best"
