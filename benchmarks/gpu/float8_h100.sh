#!/usr/bin/env bash
# One device call: the Llama 1B preset (configs/llama_1b.yaml, seq 4096, micro batch 4, compile, one GPU)
# trained side by side in bf16, float8 tensorwise and float8 rowwise (torchao, engine/float8.py);
# tokens/s, MFU and their ratios to bf16 as a table ($OUT/float8_table.txt) and JSON
# ($OUT/float8.json; per-run records in $OUT/float8_runs.json).
# Usage on the GPU machine, from the repo root:  bash benchmarks/gpu/float8_h100.sh [STEPS] [WARMUP]
# The machine has no internet: carry .whl/ with the torchao wheel
# (pip download torchao==0.18.0 --no-deps -d .whl) and pydantic's if it lacks them.
set -u
steps=${1:-10}
warmup=${2:-4}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, torchao; print('torch', torch.__version__, 'torchao', torchao.__version__)" | tee -a "$OUT/gpu.txt"
python3 -m launch.cli doctor configs/llama_1b.yaml --set parallel.float8.enabled=true --json > "$OUT/doctor_float8.json" 2>&1 || true
rm -f "$OUT/float8_runs.json"
run() {  # label, then --set overrides for mfu.py
  local label=$1; shift
  echo "== $label" | tee -a "$OUT/float8_log.txt"
  timeout 280 torchrun --nproc_per_node 1 --master_port 29513 benchmarks/mfu.py --config configs/llama_1b.yaml \
    --set data.micro_batch_size=4 --set data.global_batch_size=16 "$@" --steps "$steps" --warmup "$warmup" \
    --json "$OUT/float8_runs.json" 2>&1 | grep -vE "Warning|warn\(" | tail -3 | tee -a "$OUT/float8_log.txt"
}
run bf16
run float8-tensorwise --set parallel.float8.enabled=true --set parallel.float8.recipe=tensorwise
run float8-rowwise --set parallel.float8.enabled=true --set parallel.float8.recipe=rowwise
python3 - "$OUT" <<'EOF' | tee "$OUT/float8_table.txt"
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
path = out / "float8_runs.json"
records = json.loads(path.read_text()) if path.is_file() else []
records = records if isinstance(records, list) else [records]

def label(record):
    sets = dict(s.split("=", 1) for s in record.get("overrides", []))
    if sets.get("parallel.float8.enabled") != "true":
        return "bf16"
    return "float8-" + sets.get("parallel.float8.recipe", "tensorwise")

rows = {label(r): r for r in records}
base = rows.get("bf16")
print(f"{'run':<20}{'tok/s/GPU':>12}{'MFU':>8}{'mem GB':>8}{'x bf16':>8}")
summary = []
for name in ("bf16", "float8-tensorwise", "float8-rowwise"):
    r = rows.get(name)
    if r is None:
        print(f"{name:<20}{'failed (see float8_log.txt)':>36}")
        continue
    ratio = r["tokens_per_s_per_device"] / base["tokens_per_s_per_device"] if base else None
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
    mem = f"{r['peak_mem_gb']:.1f}" if r.get("peak_mem_gb") else "-"
    print(f"{name:<20}{r['tokens_per_s_per_device']:>12,.0f}{mfu:>8}{mem:>8}{(f'{ratio:.2f}' if ratio else '-'):>8}")
    summary.append({"run": name, "tokens_per_s_per_device": r["tokens_per_s_per_device"], "mfu": r.get("mfu"),
                    "peak_mem_gb": r.get("peak_mem_gb"), "speedup_vs_bf16": ratio, "device": r.get("device")})
(out / "float8.json").write_text(json.dumps(summary, indent=1))
EOF
