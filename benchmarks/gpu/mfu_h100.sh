#!/usr/bin/env bash
# One device call: MFU of the Llama presets on one GPU (FSDP2 + compile + bf16), results to $OUT.
# Usage on the GPU machine, from the repo root: bash benchmarks/gpu/mfu_h100.sh
set -u
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/pydantic*.whl .whl/annotated_types*.whl .whl/typing_inspection*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
run() {  # name, then args for mfu.py
  local name=$1; shift
  timeout 240 torchrun --nproc_per_node 1 --master_port 29511 benchmarks/mfu.py --json "$OUT/mfu.json" "$@" 2>&1 | grep -vE "Warning|warn\(" | tail -3 | tee -a "$OUT/mfu_table.txt"
}
run 1b-mb2 --config configs/llama_1b.yaml --set data.micro_batch_size=2 --set data.global_batch_size=8 --steps 15 --warmup 5
run 1b-mb4 --config configs/llama_1b.yaml --set data.micro_batch_size=4 --set data.global_batch_size=16 --steps 10 --warmup 4
run 1b-mb4-ac --config configs/llama_1b.yaml --set data.micro_batch_size=4 --set data.global_batch_size=16 --set parallel.activation_checkpointing=selective --steps 10 --warmup 4
run 350m --config configs/llama_350m.yaml --set data.micro_batch_size=4 --set data.global_batch_size=16 --steps 10 --warmup 4
run 1b-nocompile --config configs/llama_1b.yaml --set data.micro_batch_size=2 --set data.global_batch_size=8 --set parallel.compile=false --steps 10 --warmup 3
cat "$OUT/mfu_table.txt"
