#!/usr/bin/env bash
# The GPU column of docs/performance.md in one call on a lent device machine (nothing can be fetched
# there; its python3 already has torch, torchvision, numpy, pandas, scipy, pillow, opencv, tqdm).
#
# Here, once:   make device-wheels          # the other pure-Python needs as wheels in .whl/ (ignored by git)
# Then the device tool's `run`:  command "bash bench/device.sh", carry [".whl"], timeout_s 560
# Everything it prints also lands in $OUT (bench_cuda.log and the JSON results).
# The Review latency benchmark is CPU + Chromium only, so it is not run here.
set -uo pipefail
out=${OUT:-/tmp/bench_device}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/bench_cuda.log"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" | tee -a "$out/bench_cuda.log"
# most informative first, so a run cut off at the time limit still answers the open rows
python3 -m bench --device cuda --out "$out" \
    --only explain_overhead,deletion,fast_methods,forward,evaluate_memory,evaluate_scaling 2>&1 | tee -a "$out/bench_cuda.log"
# evaluate_scaling's CUDA rows include `torchrun --nproc_per_node 1` (the NCCL process group and rank 0's
# merge, checked to write the one-process rows); 2 and 4 processes run only where 2 and 4 GPUs are visible
