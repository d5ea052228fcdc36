"""Context parallelism (parallel.cp) on real ranks: what a rank saves for backward, what it
sends, and what a forward+backward costs, for one long row at cp = 1, 2, 4. CPU ranks over gloo
by default; `--device cuda` puts rank r on GPU r over NCCL (a node with max(--cps) GPUs) and also
records each rank's peak CUDA memory.

Llama runs the zigzag layout with all-gathered K/V, GLA (torch backend) the contiguous layout
with its recurrent state handed on (models/context_parallel.py). Every configuration runs in
the same pool of spawned ranks, interleaved round by round, so machine noise hits all alike.
Counts collectives by wrapping the functions models.context_parallel calls, in the ranks only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import append_json  # noqa: E402
from launch.local import free_port  # noqa: E402
from models import context_parallel  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from models.context_parallel import SequenceShard  # noqa: E402
from models.spec import get_spec  # noqa: E402

FP32 = 4  # bytes per element: the models run in fp32 on CPU
LOSS_TOLERANCE = 1e-5  # relative, cp > 1 loss vs cp = 1 loss


def model_config(family: str, args: argparse.Namespace, seq_len: int) -> ModelConfig:
    common = {"family": family, "vocab_size": args.vocab, "dim": args.dim, "n_layers": args.layers,
              "n_heads": args.heads, "max_seq_len": seq_len}
    if family == "llama":
        return ModelConfig(**common, n_kv_heads=args.kv_heads)
    return ModelConfig(**common, gla_backend="torch")


def build_model(cfg: ModelConfig, device: torch.device) -> torch.nn.Module:
    with torch.device("meta"):
        model = get_spec(cfg.family).build(cfg)
    model.to_empty(device=device)
    torch.manual_seed(0)
    model.init_weights()
    return model


def expected_collective_bytes(family: str, cfg: ModelConfig, seq_len: int, cp: int, batch: int) -> int:
    """Bytes of all-gather output per rank per forward (= reduce-scatter input per backward).
    Llama: K and V of every layer, whole sequence: L * 2 * B * T * H_kv * d_head.
    GLA: one (state, decay) per layer from every rank: L * cp * B * H * d_k * (d_v + 1)."""
    if cp == 1:
        return 0
    if family == "llama":
        return cfg.n_layers * 2 * batch * seq_len * cfg.kv_heads * cfg.head_dim * FP32
    head_k, head_v = (cfg.dim // 2) // cfg.n_heads, cfg.dim // cfg.n_heads
    return cfg.n_layers * cp * batch * cfg.n_heads * head_k * (head_v + 1) * FP32


class SavedForBackward:
    """saved_tensors_hooks that record each unique storage the autograd graph keeps (parameters
    excluded), with the shape and dtype of one tensor that refers to it."""

    def __init__(self, exclude: set[int]):
        self.exclude, self.storages = exclude, {}

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        with contextlib.suppress(RuntimeError, NotImplementedError):  # tensors without storage
            storage = tensor.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in self.exclude and ptr not in self.storages:
                self.storages[ptr] = (storage.nbytes(), tuple(tensor.shape), tensor.dtype)
        return tensor

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)


@contextlib.contextmanager
def counting_collectives():
    """Wraps the all-gather / reduce-scatter that models.context_parallel calls (it binds
    dist.all_gather_single / reduce_scatter_single, or the *_tensor ones on an older torch, at
    import): calls and bytes (all-gather output, reduce-scatter input: the full-size tensor
    each rank ends with / contributes)."""
    counts = {"all_gather_calls": 0, "all_gather_bytes": 0, "reduce_scatter_calls": 0, "reduce_scatter_bytes": 0}
    names = [("_all_gather", "all_gather"), ("_reduce_scatter", "reduce_scatter")]
    if not all(hasattr(context_parallel, name) for name, _ in names):  # it calls torch.distributed's
        raise RuntimeError("models.context_parallel no longer binds _all_gather/_reduce_scatter: update the counting")
    originals = {name: getattr(context_parallel, name) for name, _ in names}

    def counted(name: str, kind: str):
        def collective(output, input, *args, **kwargs):
            full = output if kind == "all_gather" else input
            counts[f"{kind}_calls"] += 1
            counts[f"{kind}_bytes"] += full.numel() * full.element_size()
            return originals[name](output, input, *args, **kwargs)

        return collective

    for name, kind in names:
        setattr(context_parallel, name, counted(name, kind))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(context_parallel, name, original)


def forward_backward(model, ids, labels, cp: int, rank: int, group, layout: str, saved: SavedForBackward | None):
    """One forward+backward of this rank's part of the rows; returns (summed loss, shard)."""
    model.zero_grad(set_to_none=True)
    hooks = saved.hooks() if saved is not None else contextlib.nullcontext()
    shard = None
    with hooks:
        if cp == 1:
            logits, targets = model(ids), labels
        else:
            shard = SequenceShard(group, rank, cp, ids.shape[1], layout, None, ids.device)
            logits, targets = model(shard.take(ids), None, shard=shard), shard.take(labels)
        loss_sum = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
    (loss_sum / labels.numel()).backward()
    return loss_sum.detach(), shard


def measure(model, ids, labels, cfg, cp, rank, group, layout) -> dict:
    """The untimed pass: saved bytes by kind, collectives, the loss over the whole row."""
    saved = SavedForBackward({p.untyped_storage().data_ptr() for p in model.parameters()})
    with counting_collectives() as comm:
        loss_sum, shard = forward_backward(model, ids, labels, cp, rank, group, layout, saved)
    seq_len = ids.shape[1]
    local_len = seq_len // cp
    kinds = {"mask": 0, "full_sequence": 0, "local": 0}
    mask_dtypes = set()
    for nbytes, shape, dtype in saved.storages.values():
        if cp > 1 and len(shape) == 4 and shape[1:] == (1, local_len, seq_len):  # [B|1, 1, T_local, T]
            kinds["mask"] += nbytes  # the attention mask, or a copy SDPA made of it
            mask_dtypes.add(str(dtype))
        elif cp > 1 and len(shape) == 4 and shape[2] == seq_len:  # [B, H_kv, T, d]: gathered K/V
            kinds["full_sequence"] += nbytes
        else:  # [.., T_local, ..]: this rank's tokens (logits [B, T_local, V] too)
            kinds["local"] += nbytes
    bool_mask = shard.cache.get("bool_mask") if shard is not None else None  # built once per step (Llama, CPU path)
    if cp > 1:
        dist.all_reduce(loss_sum, group=group)
    return {"saved_bytes": sum(kinds.values()), **{f"saved_{k}_bytes": v for k, v in kinds.items()}, **comm,
            "saved_mask_dtypes": sorted(mask_dtypes),
            "bool_mask_bytes": 0 if bool_mask is None else bool_mask.numel() * bool_mask.element_size(),
            "loss": loss_sum.item() / labels.numel(), "saved_storages": len(saved.storages)}


def rank_main(rank: int, world: int, port: int, args: argparse.Namespace, out_dir: str) -> None:
    code = 1
    try:
        torch.set_num_threads(args.threads)
        device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        groups = {cp: dist.new_group(list(range(cp))) if cp > 1 else None for cp in args.cps}  # every rank calls
        records = []
        for family in args.families:
            cfg = model_config(family, args, max(args.seq_lens))
            model = build_model(cfg, device)
            layout = get_spec(family).cp_layout
            for seq_len in args.seq_lens:
                gen = torch.Generator().manual_seed(seq_len)
                tokens = torch.randint(0, cfg.vocab_size, (args.batch, seq_len + 1), generator=gen)
                ids, labels = tokens[:, :-1].to(device), tokens[:, 1:].to(device)
                found = {}
                for cp in args.cps:  # round 0: measured, untimed (and a warm-up)
                    if rank < cp:
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                            torch.cuda.reset_peak_memory_stats()
                        found[cp] = measure(model, ids, labels, cfg, cp, rank, groups[cp], layout)
                        found[cp].update(wall_s=[], cpu_s=[])
                        if device.type == "cuda":  # forward + backward, parameters and gradients included
                            found[cp]["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
                    dist.barrier()
                for _ in range(args.rounds):
                    for cp in args.cps:
                        if rank < cp:
                            wall, cpu = time.perf_counter(), time.process_time()
                            forward_backward(model, ids, labels, cp, rank, groups[cp], layout, None)
                            if device.type == "cuda":
                                torch.cuda.synchronize()
                            found[cp]["wall_s"].append(time.perf_counter() - wall)
                            found[cp]["cpu_s"].append(time.process_time() - cpu)
                        dist.barrier()  # the next configuration starts on every rank at once
                records += [{"family": family, "seq_len": seq_len, "cp": cp, "rank": rank, **r} for cp, r in found.items()]
                if rank == 0:
                    print(f"  done {family} T={seq_len}", flush=True)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(records))
        dist.destroy_process_group()
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        os._exit(code)


def combine(records: list[dict], args: argparse.Namespace) -> list[dict]:
    """One row per (family, seq_len, cp): the worst rank's bytes, the slowest rank's time per
    round (median over rounds), CPU seconds summed over ranks (median over rounds)."""
    rows = []
    for family in args.families:
        for seq_len in args.seq_lens:
            by_cp = {}
            for cp in args.cps:
                ranks = [r for r in records if (r["family"], r["seq_len"], r["cp"]) == (family, seq_len, cp)]
                cfg = model_config(family, args, seq_len)
                row = {"family": family, "seq_len": seq_len, "cp": cp, "ranks": len(ranks)}
                for key in ("saved_bytes", "saved_mask_bytes", "saved_full_sequence_bytes", "saved_local_bytes", "bool_mask_bytes",
                            "all_gather_calls", "all_gather_bytes", "reduce_scatter_calls", "reduce_scatter_bytes"):
                    row[key] = max(r[key] for r in ranks)
                row["expected_collective_bytes"] = expected_collective_bytes(family, cfg, seq_len, cp, args.batch)
                row["wire_bytes_per_rank"] = row["all_gather_bytes"] * (cp - 1) // cp  # ring: what arrives
                row["saved_mask_dtypes"] = ranks[0]["saved_mask_dtypes"]
                row["loss"] = ranks[0]["loss"]
                if "peak_cuda_bytes" in ranks[0]:
                    row["peak_cuda_bytes"] = max(r["peak_cuda_bytes"] for r in ranks)
                row["wall_s"] = statistics.median(max(r["wall_s"][i] for r in ranks) for i in range(args.rounds))
                row["cpu_s"] = statistics.median(sum(r["cpu_s"][i] for r in ranks) for i in range(args.rounds))
                by_cp[cp] = row
            base = by_cp[min(args.cps)]
            for row in by_cp.values():
                row["saved_ratio"] = row["saved_bytes"] / base["saved_bytes"]
                row["saved_local_ratio"] = row["saved_local_bytes"] / base["saved_bytes"]
                row["loss_rel_diff"] = abs(row["loss"] - base["loss"]) / abs(base["loss"])
                row["loss_matches"] = row["loss_rel_diff"] <= LOSS_TOLERANCE
                row["wall_ratio"] = row["wall_s"] / base["wall_s"]
                row["cpu_ratio"] = row["cpu_s"] / base["cpu_s"]
                rows.append(row)
    return rows


def mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def print_table(rows: list[dict]) -> None:
    print("| model | T | cp | saved MiB/rank | vs cp=1 | mask copies saved | gathered K/V saved | rest | rest vs cp=1 "
          "| bool mask MiB | all-gather MiB/rank | = formula | reduce-scatter MiB/rank | fwd+bwd s | vs cp=1 "
          "| CPU-s, all ranks | vs cp=1 | loss | rel diff vs cp=1 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        formula = "yes" if r["all_gather_bytes"] == r["expected_collective_bytes"] else f"no ({mib(r['expected_collective_bytes'])})"
        print(f"| {r['family']} | {r['seq_len']} | {r['cp']} | {mib(r['saved_bytes'])} | {r['saved_ratio']:.3f} "
              f"| {mib(r['saved_mask_bytes'])} | {mib(r['saved_full_sequence_bytes'])} | {mib(r['saved_local_bytes'])} "
              f"| {r['saved_local_ratio']:.3f} | {mib(r['bool_mask_bytes'])} | {r['all_gather_bytes'] / 2**20:.3f} | {formula} "
              f"| {r['reduce_scatter_bytes'] / 2**20:.3f} | {r['wall_s']:.2f} | {r['wall_ratio']:.2f}x | {r['cpu_s']:.2f} "
              f"| {r['cpu_ratio']:.2f}x | {r['loss']:.6f} | {r['loss_rel_diff']:.1e}{'' if r['loss_matches'] else ' MISMATCH'} |")
    if any("peak_cuda_bytes" in r for r in rows):  # --device cuda
        print("\n| model | T | cp | peak CUDA MiB/rank | vs cp=1 |\n|---|---:|---:|---:|---:|")
        base = {(r["family"], r["seq_len"]): r["peak_cuda_bytes"] for r in rows if r["cp"] == 1}
        for r in rows:
            ratio = r["peak_cuda_bytes"] / base[(r["family"], r["seq_len"])]
            print(f"| {r['family']} | {r['seq_len']} | {r['cp']} | {mib(r['peak_cuda_bytes'])} | {ratio:.3f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=["llama", "gla"], choices=["llama", "gla"])
    parser.add_argument("--seq-lens", nargs="+", type=int, default=[2048, 4096, 8192])
    parser.add_argument("--cps", nargs="+", type=int, default=[1, 2, 4], help="context-parallel sizes; the first is the baseline")
    parser.add_argument("--rounds", type=int, default=2, help="timed forward+backward per configuration, interleaved")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: rank r on GPU r, NCCL")
    parser.add_argument("--json", default="benchmarks/results/context_parallel.json")
    args = parser.parse_args()
    if args.cps[0] != 1:
        parser.error("--cps: the first size is the baseline and must be 1")
    if args.device == "cuda" and torch.cuda.device_count() < max(args.cps):
        parser.error(f"--device cuda: needs {max(args.cps)} GPUs (one per rank), this node has {torch.cuda.device_count()}")

    world, port = max(args.cps), free_port()
    ctx = multiprocessing.get_context("spawn")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out_dir:
        procs = [ctx.Process(target=rank_main, args=(r, world, port, args, out_dir)) for r in range(world)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
        if any(p.exitcode for p in procs):
            print(f"a rank failed: exit codes {[p.exitcode for p in procs]}", file=sys.stderr)
            return 1
        records = [rec for r in range(world) for rec in json.loads(Path(out_dir, f"rank{r}.json").read_text())]
    rows = combine(records, args)
    print_table(rows)
    elapsed = time.perf_counter() - started
    print(f"{elapsed:.0f} s; load average at the end: {Path('/proc/loadavg').read_text().split()[:3]}")
    append_json(args.json, {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "args": vars(args),
                            "loadavg_end": Path("/proc/loadavg").read_text().split()[:3],
                            "torch": torch.__version__, "elapsed_s": elapsed, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
