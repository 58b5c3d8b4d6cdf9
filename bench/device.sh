#!/usr/bin/env bash
# Prefix for every device-machine command (see docs/perf-notes.md): installs the carried wheels
# (DeepSpeed, Liger and their few missing dependencies; `bash ../shared/tools/device-wheels.sh .whl`
# fetches them, and the device call must carry .whl), sets what DeepSpeed's FusedAdam JIT build needs,
# prints the GPU's state, then runs the given command.
#   bash bench/device.sh python bench/run_bench.py --plan final
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=9.0  # the image's 9.0a breaks DeepSpeed's op builder
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.draw,power.limit --format=csv,noheader
"$@"
