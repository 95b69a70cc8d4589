#!/usr/bin/env bash
# Runs the pipeline and checkpoint headlines of BENCHMARKS.md (§6, §7) on GPT small and writes
# their results files. Run it on a QUIET machine (every script measures contention and the
# load average and says so in its output).
#
#   bash benchmarks/run_headlines_pipeline.sh     # about 10-15 minutes on a quiet 2-core box
#
# Needs DeepSpeed's virtualenv for the DeepSpeed rows (/work/dsvenv, with safetensors for
# zero_to_fp32's export); pass NO_DEEPSPEED=1 to leave them out.
#
# Writes: benchmarks/results/{pipeline,checkpoint}.md and the log
# benchmarks/results/pipeline_checkpoint.log. Exit status: the number of failed steps (a failed
# same-work / same-state check fails its step).
#
# Its processes carry "run_headlines.sh" in their command line (argv[0] of this shell), so a
# `pgrep -f run_headlines.sh` (the pause signal for everyone else) finds them.
#
#   1. bench_pipeline: 6 variants (fs / torch x 1f1b, gpipe, zero bubble) x (3 + 15) steps in
#      one 2-rank launch; DeepSpeed PipelineEngine with torch and fs 1F1B re-runs in its own
#      launch; each variant alone in a fresh launch for peak RSS / peak live       ~8 min
#   2. bench_checkpoint: fs.save/load/export vs DCP direct (5 repeats, one launch), DeepSpeed
#      ZeRO-3 save/load_checkpoint (one launch), zero_to_fp32 x 2 ways x 5 processes ~4 min
if [ "${FS_HEADLINES_MARK:-0}" != 1 ]; then
  FS_HEADLINES_MARK=1 exec -a run_headlines.sh bash "$0" "$@"
fi
set -u
cd "$(dirname "$0")/.."
LOG=benchmarks/results/pipeline_checkpoint.log
mkdir -p benchmarks/results
: > "$LOG"
failed=0

run() {
  echo "== $(date -u +%FT%TZ) load: $(cut -d' ' -f1-3 /proc/loadavg) :: $*" | tee -a "$LOG"
  local t0=$SECONDS
  "$@" 2>&1 | grep -v -E '^\[(rank[0-9]+\]|[0-9]{4}-)|^W[0-9]{4} |^I[0-9]{4} ' | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "== rc=$rc after $((SECONDS - t0)) s, load: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$LOG"
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

PDS=()
CDS=()
if [ "${NO_DEEPSPEED:-0}" = 1 ]; then
  PDS=(--ds-variants '')
  CDS=(--ds-python '')
fi

run python benchmarks/bench_pipeline.py --steps 15 --warmup 3 --memory --memory-steps 2 \
  --write "${PDS[@]}"

run python benchmarks/bench_checkpoint.py --repeats 5 --dir /tmp --write "${CDS[@]}"

echo "== $(date -u +%FT%TZ) done, $failed failed step(s); total $SECONDS s" | tee -a "$LOG"
exit "$failed"
