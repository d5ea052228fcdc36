"""One GPU call: per-kernel times of the own Triton GLA kernels at T=4096 and a launch-option
sweep (warps, stages) at T=4096/16384 on shape A (B=8, H=16, d=64), without fla (whose
first-call autotuning alone takes minutes). Results to $OUT/gla_tune.json."""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.gla_kernels import profile_kernels, sweep_launch  # noqa: E402

out = Path(os.environ.get("OUT", "/tmp")) / "gla_tune.json"
report = {"gpu": {}}


def save():
    out.write_text(json.dumps(report, indent=1))


profile_kernels(report, save)
print("profile", json.dumps(report["gpu"], indent=1), flush=True)
sweep_launch(report, save)
save()
