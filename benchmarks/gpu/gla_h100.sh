#!/usr/bin/env bash
# GLA on one GPU, in device calls of <= 10 minutes each; results to $OUT.
#   bash benchmarks/gpu/gla_h100.sh kernels   own Triton vs fla chunk_gla vs SDPA-flash, shape A
#                                             (B=8, H=16, d=64), T = 1k..16k, correctness, per-kernel
#                                             profile and launch sweep (fla's first-call autotune ~210 s)
#   bash benchmarks/gpu/gla_h100.sh paper     the paper's head shape (H=4, d_k=256, d_v=512)
#   bash benchmarks/gpu/gla_h100.sh mfu       the GLA 1.3B preset: tokens/s and MFU, own Triton
#                                             vs fla backend, compile + FSDP2 + bf16
# Carry .whl/ (pydantic, fla-core, flash-linear-attention wheels) when the machine lacks them.
set -u
part=${1:-kernels}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
python3 -m launch.cli doctor --json > "$OUT/doctor.json" 2>&1 || true  # GPUs, NCCL, kernels as Strata sees them
case "$part" in
  kernels)
    timeout 560 python3 benchmarks/gla_kernels.py --device cuda --shapes A --profile --sweep \
      --time-budget 300 --out "$OUT/gla_kernels.json" ;;
  paper)
    timeout 560 python3 benchmarks/gla_kernels.py --device cuda --shapes paper \
      --time-budget 400 --out "$OUT/gla_kernels_paper.json" ;;
  mfu)
    for backend in triton fla; do
      timeout 270 torchrun --nproc_per_node 1 --master_port 29512 benchmarks/mfu.py \
        --config configs/gla_1b.yaml --set model.gla_backend=$backend --set data.micro_batch_size=4 \
        --set data.global_batch_size=16 --steps 10 --warmup 4 --json "$OUT/mfu_gla.json" 2>&1 \
        | grep -vE "Warning|warn\(" | tail -3 | tee -a "$OUT/mfu_gla_table.txt"
    done ;;
  *) echo "usage: $0 kernels|paper|mfu" >&2; exit 2 ;;
esac
