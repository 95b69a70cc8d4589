#!/usr/bin/env bash
# The prepared GPU checks (issues 3 and 4) as one run on a lent CUDA machine.
#
# That machine has torch 2.11 on Python 3.12 and no network; its image lacks optree, so
# carry a cp312 wheel of it in .whl/ (not committed; made here with
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 -d .whl optree==0.20.0
# ) and run, with the device tool: command "bash benchmarks/gpu_check.sh", carry [".whl"].
# Results land in $OUT: the card's name, gpu_memory.py's report (paste it into
# BENCHMARKS.md §2 "GPU") and the CUDA tests' log. About 5 minutes on an H100.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! python3 -c "import optree" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/card.txt"
python3 -c "import torch, fsharding; print(torch.__version__, torch.cuda.get_device_name())" \
  | tee -a "$OUT/card.txt"
status=0
timeout 300 python3 benchmarks/gpu_memory.py --out "$OUT/gpu_memory.md" 2>&1 \
  | tee "$OUT/gpu_memory.log" || status=1
# the tests that need a CUDA device, plus the transforms' suites on a machine with one
timeout 240 python3 -m pytest -q -p no:cacheprovider -x tests/transforms/test_offload.py \
  tests/optim/test_offload_optimizer.py tests/transforms/test_remat.py \
  tests/transforms/test_amp.py tests/transforms/test_accumulate.py 2>&1 \
  | tee "$OUT/pytest.log" || status=1
exit $status
