#!/usr/bin/env bash
# Reruns every headline of BENCHMARKS.md on GPT small, like-for-like (torch baselines on
# AdamW(fused=True)), and writes the results files. Run it on a QUIET machine (nothing
# else running: every script measures contention and says so in its output).
#
#   bash benchmarks/run_headlines.sh            # about 20 minutes on a quiet 2-core box
#   WITH_DEEPSPEED=1 bash benchmarks/run_headlines.sh   # + DeepSpeed rows (needs
#       /work/dsvenv: python -m venv /work/dsvenv && /work/dsvenv/bin/pip install deepspeed
#       torch optree cloudpickle; about 5 minutes more)
#
# Writes: benchmarks/results/{step,memory,memory_1thread,zero,rss}.md and a log,
# benchmarks/results/headlines.log. Then paste the tables into BENCHMARKS.md's places
# marked "RERUN". Exit status: the number of failed steps (a FAIL in a same-work check,
# i.e. loss / grad norm / params not following eager, counts as failed).
#
# Step counts and estimated times on a quiet 2-core machine (GPT small; eager step ~0.4-0.8 s):
#   1. bench_step: 3 variants x (3 + 10 + 1) steps                              ~1 min
#   2. bench_memory b at 2 threads (the stated protocol): 8 variants, 20 quiet rounds
#      after 3 warm-up, ~7 min; d (amp, 4 variants, bf16 steps of several seconds):
#      10 quiet rounds of at most 12                                            ~10 min
#   3. bench_memory b at 1 thread (the low-spread protocol), memory_1thread.md   ~4 min
#   4. bench_zero: 10 variants x 13 steps in one 2-rank launch, then each variant
#      alone twice (GC on / off) for peak RSS, 5 steps                          ~6 min
#   5. bench_rss: 10 variants x 2 (GC on / off), 13 steps, fresh processes       ~5 min
set -u
cd "$(dirname "$0")/.."
LOG=benchmarks/results/headlines.log
mkdir -p benchmarks/results
: > "$LOG"
failed=0

run() {
  echo "== $(date -u +%FT%TZ) load: $(cut -d' ' -f1-3 /proc/loadavg) :: $*" | tee -a "$LOG"
  local t0=$SECONDS
  "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "== rc=$rc after $((SECONDS - t0)) s" | tee -a "$LOG"
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

run python benchmarks/bench_step.py --steps 10 --warmup 3 --threads 2 --write

run python benchmarks/bench_memory.py --only b --steps 20 --max-rounds 30 --retries 0 \
  --threads 2

# bf16 matmuls are slow on this CPU (a step takes several seconds): fewer rounds for d.
run python benchmarks/bench_memory.py --only d --steps 10 --max-rounds 12 --retries 0 \
  --threads 2

run python benchmarks/bench_memory.py --only b --steps 20 --max-rounds 30 --retries 0 \
  --threads 1 --results benchmarks/results/memory_1thread.md

DS=(--ds-variants '')
if [ "${WITH_DEEPSPEED:-0}" = 1 ]; then
  DS=(--ds-variants ds-ddp,ds1,ds2,ds3,zero3-blocks-reshard --ds-adam fused)
fi
run python benchmarks/bench_zero.py --steps 10 --warmup 3 \
  --variants ddp,ddp-foreach,zero0,zero1,zero2,fsdp2,fsdp2-foreach,zero3,zero3-blocks,zero3-blocks-reshard \
  "${DS[@]}" --memory --memory-steps 5 --memory-gc both --write

run python benchmarks/bench_rss.py --steps 13 --write

echo "== $(date -u +%FT%TZ) done, $failed failed step(s); total $SECONDS s" | tee -a "$LOG"
exit "$failed"
