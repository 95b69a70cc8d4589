#!/usr/bin/env bash
# Old code vs new code back to back on a quiet machine: the no-regression check of a change
# that should not move the numbers (issue 10's layout move, BENCHMARKS.md §5).
#
#   bash benchmarks/side_by_side.sh OLD_REV        # about 25 minutes on a quiet 2-core box
#
# OLD_REV is checked out into a temporary git worktree; each benchmark runs in the old tree
# and in this one in turn (PYTHONPATH picks the tree's fsharding), alternating, so machine
# drift hits both alike. Compare the ratios to the torch baseline of each run.
set -u
cd "$(dirname "$0")/.."
NEW=$PWD
OLD=$(mktemp -d)/old
git worktree add --detach "$OLD" "$1" >/dev/null || exit 1
trap 'git worktree remove --force "$OLD"' EXIT

one() {  # tree label command...
  local tree=$1 label=$2
  shift 2
  echo "== [$label] $(date -u +%FT%TZ) load $(cut -d' ' -f1-3 /proc/loadavg) :: $*"
  (cd "$tree" && PYTHONPATH="$tree" "$@")
}

for _ in 1 2; do
  for side in "$OLD OLD" "$NEW NEW"; do
    # shellcheck disable=SC2086
    one $side python benchmarks/bench_step.py --steps 10 --warmup 3 --threads 2 --no-foreach
  done
done
for _ in 1 2 3; do
  for side in "$OLD OLD" "$NEW NEW"; do
    # shellcheck disable=SC2086
    one $side python benchmarks/bench_zero.py --steps 10 --warmup 3 \
      --variants ddp,zero0,fsdp2,zero3-blocks-reshard --ds-variants '' --retries 0
  done
done
for side in "$OLD OLD" "$NEW NEW"; do
  # shellcheck disable=SC2086
  one $side python benchmarks/bench_memory.py --only b --steps 20 --max-rounds 25 \
    --retries 0 --threads 1 --no-write
done
