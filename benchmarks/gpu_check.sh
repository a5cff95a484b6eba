#!/usr/bin/env bash
# htsr's CUDA checks as one script, for a session that is lent a GPU machine (the `device` tool:
# ~15 minutes of device time in all, so everything runs in one call). From the repo root there:
#
#   bash benchmarks/gpu_check.sh        # log in $OUT/gpu-check.log (comes back with the call)
#
# The GPU image has torch, numpy, scipy, safetensors, typer, rich, matplotlib, threadpoolctl,
# pytest and hypothesis, not torch-pruning: wheels in .whl/ (see the device README) are
# installed first when present. htsr runs from this checkout through PYTHONPATH (no install).
# Budget: CUDA tests ~1 min, analyze benchmark ~3 min, finetune ~3 min.
set -uo pipefail
OUT=${OUT:-/tmp/htsr-gpu-check}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{
    echo "== machine"; nvidia-smi -L; nproc
    python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
    echo "== CUDA tests (each skips without CUDA on the CPU machines)"
    timeout 180 python3 -m pytest -q -rs -p no:cacheprovider \
        tests/test_engine_properties.py::test_cuda_matches_cpu \
        tests/test_analysis_walk.py::test_the_walk_on_cuda_matches_the_cpu \
        tests/test_optim.py::test_reallocator_on_cuda
    echo "== analyze: GPT-2-medium-shaped benchmark on CUDA (no WeightWatcher)"
    timeout 300 python3 benchmarks/analyze_vs_weightwatcher.py --device cuda --skip-ww \
        --repeat 2 --wait-idle 5
    echo "== finetune: per-epoch re-allocation overhead, ResNet18 on CIFAR-shaped data, bf16"
    timeout 240 python3 benchmarks/finetune_overhead.py --device cuda --epochs 3
} 2>&1 | tee "$OUT/gpu-check.log"
