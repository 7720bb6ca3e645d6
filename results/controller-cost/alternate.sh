#!/usr/bin/env bash
# benchmarks/controller_cost.py against two checkouts in turn, twice: before (a git worktree of
# BEFORE, default 2a47f72, at /tmp/oldtree, put first on PYTHONPATH) and after (this checkout).
set -e
cd "$(dirname "$0")/../.."
BEFORE=${1:-2a47f72}
[[ -d /tmp/oldtree ]] || git worktree add -q /tmp/oldtree "$BEFORE"
for round in 1 2; do
  echo "round $round, before (bisection from s = 0):"
  PYTHONPATH=/tmp/oldtree/src scripts/run python3 benchmarks/controller_cost.py mnist-vit 600
  echo "round $round, after (started near the last s):"
  scripts/run python3 benchmarks/controller_cost.py mnist-vit 600
done
