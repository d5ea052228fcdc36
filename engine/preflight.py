"""Preflight checks: can this machine run Strata, and can it run this config, before a long job
is submitted. Each check is a `Check` (ok / warning / failure / info, with a hint); the
machine's facts come from torch and the optional packages, a config's from its data, model and
parallel sections. Owns the checks only; `strata doctor` prints them.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

OK, WARN, FAIL, INFO = "ok", "warning", "failure", "info"
# DCP checkpoint bytes per parameter: fp32 weights + AdamW's two fp32 moments
CHECKPOINT_BYTES_PER_PARAM = 12
# training bytes per parameter per device before activations: bf16/fp32 weights, fp32 grads and moments
TRAIN_STATE_BYTES_PER_PARAM = 16


@dataclass(frozen=True)
class Check:
    area: str
    name: str
    status: str  # ok | warning | failure | info
    detail: str
    hint: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


# -- the machine ------------------------------------------------------------------------------
def machine_checks() -> list[Check]:
    checks = [
        Check("machine", "python", OK if sys.version_info >= (3, 10) else FAIL, sys.version.split()[0],
              "" if sys.version_info >= (3, 10) else "Strata needs Python >= 3.10"),  # fmt: skip
        _torch_check(),
        Check("machine", "cpu cores", INFO, str(os.cpu_count())),
    ]
    checks.extend(_memory_checks())
    checks.extend(_gpu_checks())
    for package, use in (
        ("flash-attn", "varlen attention kernels on GPU (else FlexAttention / SDPA)"),
        ("flash-linear-attention", "model.gla_backend: fla"),
        ("triton", "own GLA kernels (model.gla_backend: triton) on GPU; TRITON_INTERPRET=1 on CPU"),
        ("ray", "strata submit --launcher ray"),
        ("wandb", "logging.wandb_project"),
    ):
        version = _version(package)
        checks.append(Check("packages", package, INFO if version else WARN if package == "ray" else INFO,
                            version or "not installed", "" if version else f"needed for {use}"))  # fmt: skip
    sbatch = shutil.which("sbatch")
    checks.append(Check("launchers", "slurm", INFO, sbatch or "sbatch not on PATH",
                        "" if sbatch else "needed for strata submit --launcher slurm"))  # fmt: skip
    return checks


def _torch_check() -> Check:
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    ok = (major, minor) >= (2, 6)
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build"
    return Check("machine", "torch", OK if ok else FAIL, f"{torch.__version__} ({build})",
                 "" if ok else "Strata needs torch >= 2.6 (FSDP2 fully_shard, DTensor)")  # fmt: skip


def _memory_checks() -> list[Check]:
    checks = []
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        checks.append(Check("machine", "memory", INFO, _gib(pages * page_size)))
    except (ValueError, OSError):
        pass
    if Path("/dev/shm").is_dir():
        free = shutil.disk_usage("/dev/shm").free
        status = OK if free >= 2**30 else WARN
        checks.append(Check("machine", "/dev/shm free", status, _gib(free),
                            "" if status == OK else "Ray's object store and loader workers use /dev/shm: "
                            "give containers --shm-size=8g or more"))  # fmt: skip
    return checks


def _gpu_checks() -> list[Check]:
    if not torch.cuda.is_available():
        return [Check("gpu", "cuda", INFO, "no CUDA device: training runs on CPU (gloo)")]
    checks = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        checks.append(Check("gpu", f"cuda:{i}", OK, f"{props.name}, sm_{props.major}{props.minor}, "
                            f"{_gib(props.total_memory)}"))  # fmt: skip
    bf16 = torch.cuda.is_bf16_supported()
    checks.append(Check("gpu", "bf16", OK if bf16 else WARN, "supported" if bf16 else "not supported",
                        "" if bf16 else "set train.dtype: float32"))  # fmt: skip
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if torch.distributed.is_nccl_available() else None
    checks.append(Check("gpu", "nccl", OK if nccl else FAIL, nccl or "not available",
                        "" if nccl else "multi-GPU training needs a torch build with NCCL"))  # fmt: skip
    return checks


# -- one config -------------------------------------------------------------------------------
def config_checks(cfg, world_size: int) -> list[Check]:
    """What stops `cfg` from running on `world_size` processes of this machine's kind."""
    checks: list[Check] = []
    checks.extend(_parallel_checks(cfg, world_size))
    checks.extend(_backend_checks(cfg))
    checks.extend(_float8_checks(cfg))
    params = _model_params(cfg, checks)
    checks.extend(_data_checks(cfg))
    checks.extend(_disk_checks(cfg, params))
    checks.extend(_mirror_check(cfg))
    if params and torch.cuda.is_available():
        checks.append(_gpu_memory_check(cfg, params, world_size))
    return checks


def _parallel_checks(cfg, world_size: int) -> list[Check]:
    from engine.config import ConfigError
    from engine.parallel import resolve_degrees

    try:
        dims = resolve_degrees(cfg.parallel, world_size)
    except ConfigError as err:
        return [Check("parallel", "degrees", FAIL, str(err), "set parallel.* or the number of processes")]
    checks = [Check("parallel", "degrees", OK,
                    f"{world_size} process(es) = {f'pp {dims.pp} x ' if dims.pp > 1 else ''}dp_replicate "
                    f"{dims.dp_replicate} x dp_shard {dims.dp_shard} x cp {dims.cp} x tp {dims.tp}")]  # fmt: skip
    if dims.cp > 1:
        checks.append(_context_parallel_check(cfg, dims))
    if dims.pp > 1:
        checks.append(_pipeline_check(cfg, dims))
    rows_per_rank = cfg.data.global_batch_size / dims.dp_size
    if cfg.data.decomposition is None and rows_per_rank % cfg.data.micro_batch_size:
        checks.append(Check("parallel", "batch", FAIL,
                            f"global_batch_size {cfg.data.global_batch_size} over {dims.dp_size} data-parallel "
                            f"rank(s) is not a multiple of micro_batch_size {cfg.data.micro_batch_size}",
                            "change data.global_batch_size or data.micro_batch_size"))  # fmt: skip
    wants_cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        checks.append(Check("parallel", "device", FAIL, "train.device: cuda but no CUDA device here"))
    elif wants_cuda and torch.cuda.device_count() < world_size:
        checks.append(Check("parallel", "gpus", WARN,
                            f"{world_size} processes per node but {torch.cuda.device_count()} GPU(s) on this machine",
                            "fine on a cluster whose nodes have more GPUs; here ranks would share GPUs"))  # fmt: skip
    return checks


def _backend_checks(cfg) -> list[Check]:
    model = cfg.model
    cuda = torch.cuda.is_available() and cfg.train.device != "cpu"
    checks = []
    if model.family == "gla":
        backend = model.gla_backend
        if backend == "triton" and not cuda and os.environ.get("TRITON_INTERPRET") != "1":
            checks.append(Check("model", "gla_backend", FAIL, "triton kernels need a CUDA device",
                                "use gla_backend: auto (torch on CPU) or set TRITON_INTERPRET=1 (slow)"))  # fmt: skip
        elif backend == "fla" and not _version("flash-linear-attention") and not _version("fla-core"):
            checks.append(Check("model", "gla_backend", FAIL, "fla is not installed", 'pip install -e ".[gpu]"'))
        else:
            resolved = "triton" if backend == "auto" and cuda else "torch" if backend == "auto" else backend
            checks.append(Check("model", "gla_backend", OK, f"{backend} -> {resolved}"))
    else:
        backend = model.attn_backend
        if backend == "flash" and not (cuda and _version("flash-attn")):
            checks.append(Check("model", "attn_backend", WARN, "flash-attn unavailable here: SDPA with a mask instead",
                                'pip install -e ".[gpu]" on a CUDA machine'))  # fmt: skip
        elif backend == "flex" and not cuda:
            checks.append(Check("model", "attn_backend", WARN, "FlexAttention has no CPU backward: SDPA with a mask"))
        else:
            checks.append(Check("model", "attn_backend", OK, backend))
    if cfg.parallel.compile and not cuda:
        checks.append(Check("model", "compile", INFO, "torch.compile on CPU works but rarely pays off"))
    return checks


def _float8_checks(cfg) -> list[Check]:
    """parallel.float8: which Linear layers convert, and whether this machine can run them."""
    from engine.config import ConfigError
    from engine.float8 import check_float8_supported, float8_plan
    from models.spec import get_spec

    f8 = cfg.parallel.float8
    if not f8.enabled:
        return []
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu")
    try:
        check_float8_supported(f8, device)
    except ConfigError as err:
        return [Check("parallel", "float8", FAIL, str(err).removeprefix("parallel.float8.enabled: "),
                      "parallel.float8.enabled: false, or run on H100/H200-class GPUs")]  # fmt: skip
    try:
        with torch.device("meta"):
            plan = float8_plan(get_spec(cfg.model.family).build(cfg.model), f8)
    except (ValueError, ImportError):  # the model build check below reports it
        return []
    skipped = f" ({', '.join(plan.skipped[:4])}{', ...' if len(plan.skipped) > 4 else ''})" if plan.skipped else ""
    how = f"{f8.recipe}{', emulated' if f8.emulate else ''}{', float8 all-gather' if f8.fsdp_float8_all_gather else ''}"
    checks = [Check("parallel", "float8", OK, f"{how}: {len(plan.converted)} Linear layers in float8, "
                    f"{len(plan.skipped)} kept in high precision{skipped}")]  # fmt: skip
    typos = [p for p in plan.unmatched if not (p == "output" and cfg.model.tie_embeddings)]  # tied: no output layer
    if typos:
        checks.append(Check("parallel", "float8_skip", WARN, f"parallel.float8.skip: {', '.join(map(repr, typos))} "
                            "name no Linear layer", "fix the pattern (module names such as layers.*.feed_forward.w2)"))  # fmt: skip
    return checks


def _model_params(cfg, checks: list[Check]) -> int | None:
    from models.spec import get_spec

    try:
        with torch.device("meta"):
            model = get_spec(cfg.model.family).build(cfg.model)
    except (ValueError, ImportError) as err:
        checks.append(Check("model", "build", FAIL, str(err)))
        return None
    params = sum(p.numel() for p in model.parameters())
    checks.append(Check("model", "parameters", INFO, f"{cfg.model.family}, {params / 1e6:,.1f}M"))
    return params


def _data_checks(cfg) -> list[Check]:
    from data_pipeline.formats import open_shardset
    from engine.config import as_eval_task

    named = [(f"source {s.name or s.path}", s.path) for s in cfg.data.sources]
    if cfg.data.val_path:
        named.append(("val", cfg.data.val_path))
    named += [(f"val {name}", path) for name, path in sorted(cfg.data.val_sets.items())]
    if cfg.data.decomposition is not None:
        named.append(("decomposition", cfg.data.decomposition.path))
    if not named:
        return [Check("data", "sources", FAIL, "no data.sources, val_path or decomposition", "set data.sources")]
    checks, fingerprints = [], {}
    for label, path in named:
        if label == "decomposition":
            exists = Path(path).is_dir()
            checks.append(Check("data", label, OK if exists else FAIL, path, "" if exists else "run strata decompose"))
            continue
        try:
            shardset = open_shardset(path, cfg.data.cache_dir)
        except (OSError, ValueError, KeyError) as err:
            checks.append(Check("data", label, FAIL, f"{path}: {err}", "run strata prepare, or fix the path"))
            continue
        tokenizer = shardset.manifest.get("tokenizer") or {}
        fingerprints[label] = tokenizer.get("fingerprint")
        vocab = tokenizer.get("vocab_size")
        detail = f"{path}: {len(shardset):,} documents, {int(sum(shardset.lengths)):,} tokens"
        if vocab and vocab > cfg.model.vocab_size:
            checks.append(Check("data", label, FAIL, f"{detail}; tokenizer vocab {vocab} > model.vocab_size "
                                f"{cfg.model.vocab_size}", "raise model.vocab_size"))  # fmt: skip
        else:
            checks.append(Check("data", label, OK, detail))
    for name, value in sorted(cfg.train.eval_tasks.items()):
        spec = as_eval_task(value)
        files = [(f"task {name}", spec.path)] + ([(f"task {name} fewshot_from", spec.fewshot_from)] if spec.fewshot_from else [])
        for label, path in files:
            exists = Path(path).is_file()
            checks.append(Check("data", label, OK if exists else FAIL, path,
                                "" if exists else "train.eval_tasks: no such task file"))  # fmt: skip
    distinct = {fp for fp in fingerprints.values() if fp}
    if len(distinct) > 1:
        checks.append(Check("data", "tokenizers", FAIL, "the ShardSets were tokenized with different tokenizers: "
                            + ", ".join(f"{k} {str(v)[:10]}" for k, v in fingerprints.items()),
                            "re-prepare with one --tokenizer"))  # fmt: skip
    return checks


def _disk_checks(cfg, params: int | None) -> list[Check]:
    run_dir = Path(cfg.train.run_dir)
    existing = next((p for p in [run_dir, *run_dir.parents] if p.exists()), Path("."))
    if not os.access(existing, os.W_OK):
        return [Check("disk", "run_dir", FAIL, f"{run_dir}: {existing} is not writable")]
    free = shutil.disk_usage(existing).free
    if params is None:
        return [Check("disk", "run_dir", INFO, f"{run_dir}: {_gib(free)} free")]
    need = params * CHECKPOINT_BYTES_PER_PARAM * (cfg.checkpoint.keep_last + 1)  # +1: the one being written
    status = OK if free > need else FAIL
    return [Check("disk", "run_dir", status, f"{run_dir}: {_gib(free)} free; {cfg.checkpoint.keep_last} kept "
                  f"checkpoints + 1 in flight need ~{_gib(need)}",
                  "" if status == OK else "free space, lower checkpoint.keep_last, or move train.run_dir")]  # fmt: skip


def _mirror_check(cfg) -> list[Check]:
    """checkpoint.mirror: a probe file is written, listed and deleted there."""
    import tempfile

    from engine.checkpoint_mirror import check_mirror_url, mirror_writable
    from engine.config import ConfigError

    url = cfg.checkpoint.mirror
    if not url:
        return []
    try:
        check_mirror_url(url)
    except ConfigError as err:  # the URL itself: nothing to probe, no credentials to check
        return [Check("disk", "checkpoint mirror", FAIL, str(err).removeprefix("checkpoint.mirror: "),
                      "set checkpoint.mirror to s3://, gs://, oci://, azure:// or a path")]  # fmt: skip
    with tempfile.TemporaryDirectory() as scratch:
        problem = mirror_writable(url, Path(scratch))
    if problem is None:
        return [Check("disk", "checkpoint mirror", OK, f"{url}: writable")]
    return [Check("disk", "checkpoint mirror", FAIL, f"{url}: {problem}",
                  "check the bucket and credentials (AWS_*/S3_ENDPOINT_URL, GCS_*, ~/.oci/config, AZURE_*)")]  # fmt: skip


def _context_parallel_check(cfg, dims) -> Check:
    """Can each row split over the CP ranks, and how many tokens does each rank then hold."""
    from engine.config import ConfigError
    from engine.parallel import context_parallel_plan

    try:
        context_parallel_plan(cfg, dims, None, 0)
    except ConfigError as err:
        return Check("parallel", "context_parallel", FAIL, str(err), "change data.seq_len or parallel.cp")
    return Check("parallel", "context_parallel", OK,
                 f"each {cfg.data.seq_len}-token row split over {dims.cp} ranks: "
                 f"{cfg.data.seq_len // dims.cp} tokens per rank")  # fmt: skip


def _pipeline_check(cfg, dims) -> Check:
    """Can the model run pipelined here, and how it splits (stages, layers, micro-batches)."""
    from engine.config import ConfigError
    from engine.pipeline import check_pipeline

    try:
        split = check_pipeline(cfg, dims)
    except ConfigError as err:
        return Check("parallel", "pipeline", FAIL, str(err), "change the named field or parallel.pp")
    return Check("parallel", "pipeline", OK, split)


def _gpu_memory_check(cfg, params: int, world_size: int) -> Check:
    from engine.parallel import resolve_degrees

    dims = resolve_degrees(cfg.parallel, world_size)
    per_device = params * TRAIN_STATE_BYTES_PER_PARAM / (dims.dp_shard * dims.cp * dims.tp * dims.pp)
    total = torch.cuda.get_device_properties(0).total_memory
    share = per_device / total
    status = OK if share < 0.6 else WARN if share < 0.9 else FAIL
    return Check("gpu", "memory", status,
                 f"weights, gradients and AdamW state ~{_gib(per_device)} per GPU ({100 * share:.0f}% of "
                 f"{_gib(total)}) before activations",
                 "" if status == OK else "more dp_shard / tp, or activation_checkpointing for the rest")  # fmt: skip
