#!/usr/bin/env bash
# htsr's CUDA checks as one script, for a session that is lent a GPU machine (the `device` tool:
# ~15 minutes of device time in all, so everything runs in one call). From the repo root there:
#
#   bash benchmarks/gpu_check.sh        # log in $OUT/gpu-check.log (comes back with the call)
#
# The GPU image has torch, numpy, scipy, safetensors, typer, rich, matplotlib, threadpoolctl,
# pytest and hypothesis, not torch-pruning: wheels in .whl/ (see the device README) are
# installed first when present. htsr runs from this checkout through PYTHONPATH (no install).
# Budget: CUDA tests ~1 min, analyze benchmark ~3 min, sharded analyze ~3 min (all GPUs),
# Llama-2-7B-shaped analyze ~4 min (writing its 13 GB checkpoint included), finetune ~3 min.
# More than one call's 10 minutes: run the sections in two calls if need be.
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
    echo "== sharded analyze (docs/distributed.md): tests, then one process per GPU vs one"
    NGPU=$(nvidia-smi -L | wc -l)
    timeout 240 python3 -m pytest -q -rs -p no:cacheprovider tests/test_distributed.py
    timeout 300 python3 benchmarks/analyze_distributed.py --device cuda --nproc "$NGPU" \
        --blocks 24 --repeat 1 --wait-idle 0 --workdir /tmp/htsr-dist
    echo "== Llama-2-7B-shaped (bf16, 224 matrices), all ten metrics, one GPU, vs the GPU bound"
    timeout 600 python3 benchmarks/analyze_distributed.py --device cuda --shape llama2-7b \
        --blocks 32 --nproc 1 --jobs 4 --bound --repeat 1 --wait-idle 0 --workdir /tmp/htsr-llama
    echo "== finetune: per-epoch re-allocation overhead, ResNet18 on CIFAR-shaped data, bf16"
    timeout 240 python3 benchmarks/finetune_overhead.py --device cuda --epochs 3
} 2>&1 | tee "$OUT/gpu-check.log"
