"""Pipeline parallelism on CPU (gloo): a tiny untied 4-layer Llama split into pipeline stages
follows the one-process loss and grad-norm curves (1e-4 relative) under 1F1B and GPipe on 2
processes, interleaved 1F1B x FSDP2, pp2 x tp2 (sequence + loss parallel) and pp2 x cp2 on 4;
eval through the pipeline scores the same tokens and the same train.eval_tasks answers; a
3-layer GLA with z-loss splits unevenly (2 + 1 layers) and follows its curve; a pp=2
checkpoint resumes on one process and continues the curve (the optimizer state is saved per
parameter; older grouped checkpoints still load), and a pp=2 continual run continues its pp=2
source; settings that cannot run pipelined stop at once naming the fields.
Tied embeddings (the default): the first stage's embedding and the last stage's copy as output
projection follow the one-process curve and weights under 1F1B and interleaved 1F1B x FSDP2,
stay bitwise equal, are saved once (a pp=2 checkpoint resumes on one process, a one-process
checkpoint continues at pp=2, the optimizer state of the copy included)."""

from __future__ import annotations

import hashlib
import json

import pytest
from distributed_runs import (
    assert_close,
    copy_run,
    losses,
    resume_on_one_process,
    run_in_ranks,
    run_ranks,
    run_tree,
    shared_run,
)

from engine.config import ConfigError, ParallelConfig, load_config
from engine.parallel import ParallelDims, resolve_degrees
from engine.pipeline import check_pipeline, rank_stages, stage_layers
from engine.report import read_metrics

STEPS = range(1, 11)
LLAMA = {"model.tie_embeddings": False, "model.n_layers": 4}
TIED = {"model.tie_embeddings": True, "model.n_layers": 4}
GLA = {"model.family": "gla", "model.tie_embeddings": False, "model.n_layers": 3, "model.z_loss": 1e-2}


def grad_norms(run_dir) -> dict[int, float]:
    return {r["step"]: r["grad_norm"] for r in read_metrics(run_dir / "metrics.jsonl").records if "grad_norm" in r}


def val(run_dir) -> dict:
    return json.loads((run_dir / "summary.json").read_text())["val"]


TASK_ITEMS = [  # multiple choice scored at the end of the run (train.eval_tasks)
    {"context": "import os\nimport", "choices": [" sys", " os.path", " re"], "label": 0},
    {"context": "def f(self", "choices": ["):", ", x):", "): return None"], "label": 0},
    {"context": "for i in", "choices": [" range(10):", " x", " self.items():\n    pass"], "label": 0},
    {"context": "return", "choices": [" None", " self", " True"], "label": 1},
    {"context": "class A", "choices": [":", "(object):", "(Exception):\n    pass"], "label": 1},
]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("tasks") / "mc.jsonl"
    path.write_text("".join(json.dumps(item) + "\n" for item in TASK_ITEMS))
    return {"train.eval_tasks": {"mc": str(path)}}


@pytest.fixture(scope="module")
def single(tiny_corpus, tmp_path_factory, tasks):
    return shared_run("single_untied_4_layers", tmp_path_factory, tiny_corpus, 1, steps=10, **LLAMA, **tasks)


@pytest.fixture(scope="module")
def pp2(tiny_corpus, tmp_path_factory, tasks):
    return shared_run("pp2_1f1b", tmp_path_factory, tiny_corpus, 2, steps=10,
                      **LLAMA, **tasks, **{"parallel.pp": 2, "checkpoint.every": 5})  # fmt: skip


def assert_same_task_scores(run, single) -> None:
    """train.eval_tasks scored through the pipeline: the last stage's ranks count the items."""
    for key in ("task_acc/mc", "task_acc_norm/mc"):
        assert val(run)[key] == val(single)[key], key


def test_pp2_1f1b_follows_the_one_process_curve_and_eval(pp2, single):
    assert_close(losses(pp2), losses(single), STEPS)
    # grad norms above optim.grad_clip (1.0): clipping used the norm over both stages
    assert min(grad_norms(single).values()) > 1.0
    assert_close(grad_norms(pp2), grad_norms(single), STEPS)
    # eval runs stage to stage; the last stage scores every row once
    summary = {name: json.loads((run / "summary.json").read_text()) for name, run in (("pp", pp2), ("one", single))}
    assert summary["pp"]["tokens_seen"] == summary["one"]["tokens_seen"]  # counted once, not per stage
    val_pp, val_1 = val(pp2), val(single)
    assert val_pp["val_tokens"] == val_1["val_tokens"]
    assert abs(val_pp["val_loss"] - val_1["val_loss"]) <= 1e-4 * val_1["val_loss"]
    assert_same_task_scores(pp2, single)


def test_gpipe_follows_the_one_process_curve(single, tiny_corpus, tmp_path_factory):
    run = shared_run("pp2_gpipe", tmp_path_factory, tiny_corpus, 2, steps=10,
                     **LLAMA, **{"parallel.pp": 2, "parallel.pp_schedule": "gpipe"})  # fmt: skip
    assert_close(losses(run), losses(single), STEPS)


def test_interleaved_1f1b_x_fsdp2_on_four_processes_follows_the_one_process_curve(single, tiny_corpus, tmp_path_factory):
    # 4 stages of 1 layer, 2 per rank; FSDP2 over 2 ranks per stage; 2 micro-batches of 2 rows
    run = shared_run("pp2_interleaved_fsdp2", tmp_path_factory, tiny_corpus, 4, steps=10, **LLAMA,
                     **{"parallel.pp": 2, "parallel.pp_schedule": "interleaved_1f1b", "data.micro_batch_size": 2})  # fmt: skip
    assert_close(losses(run), losses(single), STEPS)
    # FSDP2 reduce-scatters in another order: the norm (a sum of squares) drifts a little more
    assert_close(grad_norms(run), grad_norms(single), STEPS, rel=1e-3)
    assert val(run)["val_tokens"] == val(single)["val_tokens"]


def test_pp2_x_tp2_with_sequence_and_loss_parallel_follows_the_one_process_curve(single, tiny_corpus, tmp_path_factory, tasks):
    # each stage tensor-parallel over 2 ranks: hidden states travel sequence-sharded, the last
    # stage's logits stay vocab-sharded into the loss; eval gathers them
    run = shared_run("pp2_tp2_sp_lp", tmp_path_factory, tiny_corpus, 4, steps=10, **LLAMA, **tasks, **{
        "parallel.pp": 2, "parallel.tp": 2, "parallel.sequence_parallel": True, "parallel.loss_parallel": True,
    })  # fmt: skip
    assert_close(losses(run), losses(single), STEPS)
    # row-wise TP sums partial products in another order: the norm drifts a little more
    assert_close(grad_norms(run), grad_norms(single), STEPS, rel=1e-3)
    assert val(run)["val_tokens"] == val(single)["val_tokens"]
    assert abs(val(run)["val_loss"] - val(single)["val_loss"]) <= 1e-4 * val(single)["val_loss"]
    assert_same_task_scores(run, single)


def test_pp2_x_cp2_follows_the_one_process_curve(single, tiny_corpus, tmp_path_factory, tasks):
    # packed documents split zigzag over 2 CP ranks per stage; the schedule's 4 micro-batches of
    # 2 rows cut the loader's 2 micro-batches of 4: each stage shards the rows it is handed
    run = shared_run("pp2_cp2", tmp_path_factory, tiny_corpus, 4, steps=10, **LLAMA, **tasks,
                     **{"parallel.pp": 2, "parallel.cp": 2, "parallel.pp_microbatches": 4})  # fmt: skip
    assert_close(losses(run), losses(single), STEPS)
    assert_close(grad_norms(run), grad_norms(single), STEPS, rel=1e-3)  # CP reduce-scatters K/V grads
    assert val(run)["val_tokens"] == val(single)["val_tokens"]
    assert abs(val(run)["val_loss"] - val(single)["val_loss"]) <= 1e-4 * val(single)["val_loss"]
    assert_same_task_scores(run, single)


def test_gla_with_z_loss_splits_unevenly_and_follows_the_one_process_curve(tiny_corpus, tmp_path_factory):
    one = shared_run("gla_single_3_layers", tmp_path_factory, tiny_corpus, 1, steps=6, **GLA)
    run = shared_run("gla_pp2", tmp_path_factory, tiny_corpus, 2, steps=6, **GLA, **{"parallel.pp": 2})
    assert_close(losses(run), losses(one), range(1, 7))


def test_a_pp2_checkpoint_resumes_on_one_process(pp2, tmp_path):
    got = resume_on_one_process(pp2, tmp_path / "resumed", 5, ["parallel.pp=1"])
    assert sorted(got) == list(range(6, 11))
    assert_close(got, losses(pp2), range(6, 11))


def continued_at_pp2(source_run, corpus, tmp_path, model: dict) -> dict[int, float]:
    """Losses (steps 6-10) of a pp=2 continual run from `source_run`'s step-5 checkpoint, keeping
    its optimizer, schedule and data position."""
    source = copy_run(source_run, tmp_path / "source", keep_steps=[5])
    run_dir = tmp_path / "continued"
    tree = run_tree(corpus, run_dir, steps=10, **model, **{"parallel.pp": 2})
    tree["continual"] = {"source": str(source), "optimizer": "keep", "schedule": "continue", "data": "continue"}
    run_ranks(2, run_dir, tree)
    got = losses(run_dir)
    assert sorted(got) == list(range(6, 11))
    return got


def test_a_continual_run_at_pp2_continues_its_pp2_source(pp2, tiny_corpus, tmp_path):
    """Each stage loads its share of the source checkpoint (the names are checked against the
    whole model); keeping everything continues the source's curve."""
    assert_close(continued_at_pp2(pp2, tiny_corpus, tmp_path, LLAMA), losses(pp2), range(6, 11))


# -- tied embeddings ---------------------------------------------------------------------------
def digest(tensor) -> str:
    full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
    return hashlib.sha256(full.detach().contiguous().numpy().tobytes()).hexdigest()


def _tied_rank(rank: int, tree: dict, train: bool = True) -> dict:
    """One rank of a pipelined run with tied embeddings: trains it (or only builds it), then
    hashes this rank's copy of the embedding (the first stage's weight or the last stage's
    output projection; every rank has one at pp = 2)."""
    from engine.dist import init_distributed
    from engine.trainer import Trainer

    trainer = Trainer(load_config(tree), init_distributed("cpu"))
    exit_code = trainer.fit().exit_code if train else 0
    trainer.loader.close()
    return {"exit_code": exit_code, "tied_weight": digest(trainer.pipeline.tied_weight)}


def tied_pipeline_run(name: str, tmp_path_factory, corpus, nproc: int, train: bool = True, **overrides):
    """(run dir, each rank's result of _tied_rank) of a tied pipelined run of 10 steps."""
    run_dir = tmp_path_factory.mktemp(name) / "run"
    tree = run_tree(corpus, run_dir, **TIED, **overrides)
    ranks = run_in_ranks(_tied_rank, nproc, run_dir.parent, tree, train, timeout=300)
    assert [r["exit_code"] for r in ranks] == [0] * nproc
    return run_dir, ranks


@pytest.fixture(scope="module")
def single_tied(tiny_corpus, tmp_path_factory, tasks):
    return shared_run("single_tied_4_layers", tmp_path_factory, tiny_corpus, 1, steps=10,
                      **TIED, **tasks, **{"checkpoint.every": 5})  # fmt: skip


@pytest.fixture(scope="module")
def pp2_tied(tiny_corpus, tmp_path_factory, tasks):
    return tied_pipeline_run("pp2_tied", tmp_path_factory, tiny_corpus, 2, **tasks, **{"parallel.pp": 2, "checkpoint.every": 5})


def checkpoint_weights(run_dir) -> dict:
    from engine.export import load_checkpoint_weights

    return load_checkpoint_weights(run_dir)[0]


def assert_same_weights(run_dir, single) -> None:
    """The final checkpoints hold the same names (the tied copy saved once) and weights (1e-4)."""
    got, want = checkpoint_weights(run_dir), checkpoint_weights(single)
    assert sorted(got) == sorted(want) and "output.weight" not in got
    for name, tensor in want.items():
        assert (got[name] - tensor).abs().max() <= 1e-4 * tensor.abs().max(), name


def test_pp2_1f1b_with_tied_embeddings_follows_the_one_process_curve(pp2_tied, single_tied):
    run, ranks = pp2_tied
    assert_close(losses(run), losses(single_tied), STEPS)
    # clipping on (norms > optim.grad_clip): the tied weight's gradient (both uses summed) counted once
    assert min(grad_norms(single_tied).values()) > 1.0
    assert_close(grad_norms(run), grad_norms(single_tied), STEPS)
    assert_same_weights(run, single_tied)
    assert ranks[0]["tied_weight"] == ranks[1]["tied_weight"]  # the embedding and its copy: bitwise equal
    assert val(run)["val_tokens"] == val(single_tied)["val_tokens"]
    assert abs(val(run)["val_loss"] - val(single_tied)["val_loss"]) <= 1e-4 * val(single_tied)["val_loss"]
    assert_same_task_scores(run, single_tied)


def test_interleaved_1f1b_x_fsdp2_with_tied_embeddings_follows_the_one_process_curve(single_tied, tiny_corpus, tmp_path_factory):
    # 4 stages of 1 layer, 2 per rank (pp rank 0: stages 0 and 2, pp rank 1: 1 and 3); FSDP2 over
    # 2 ranks per stage: the embedding's and its copy's shards are summed shard by shard
    run, ranks = tied_pipeline_run("pp2_interleaved_fsdp2_tied", tmp_path_factory, tiny_corpus, 4, **{
        "parallel.pp": 2, "parallel.pp_schedule": "interleaved_1f1b", "data.micro_batch_size": 2})  # fmt: skip
    assert_close(losses(run), losses(single_tied), STEPS)
    assert_close(grad_norms(run), grad_norms(single_tied), STEPS, rel=1e-3)  # FSDP2 sums in another order
    assert_same_weights(run, single_tied)
    assert len({r["tied_weight"] for r in ranks}) == 1


def test_a_tied_pp2_checkpoint_resumes_on_one_process(pp2_tied, tmp_path):
    run, _ = pp2_tied
    got = resume_on_one_process(run, tmp_path / "resumed", 5, ["parallel.pp=1"])
    assert sorted(got) == list(range(6, 11))
    assert_close(got, losses(run), range(6, 11))


def test_a_tied_one_process_checkpoint_continues_at_pp2(single_tied, tiny_corpus, tmp_path):
    """The last stage's copy and its AdamW moments load from `tok_embeddings.weight`: keeping
    the optimizer continues the one-process curve."""
    assert_close(continued_at_pp2(single_tied, tiny_corpus, tmp_path, TIED), losses(single_tied), range(6, 11))


def test_a_tied_pp2_continual_run_from_hf_fills_both_copies(single_tied, tiny_corpus, tmp_path_factory):
    from engine.export import export_hf

    hf_dir = export_hf(single_tied, tmp_path_factory.mktemp("hf") / "hf")
    _, ranks = tied_pipeline_run("pp2_tied_from_hf", tmp_path_factory, tiny_corpus, 2, train=False,
                                 **{"parallel.pp": 2, "continual": {"from_hf": str(hf_dir)}})  # fmt: skip
    want = digest(checkpoint_weights(single_tied)["tok_embeddings.weight"])
    assert [r["tied_weight"] for r in ranks] == [want, want]


def test_degrees_stage_split_and_rank_layout_with_pp():
    dims = resolve_degrees(ParallelConfig(pp=2, tp=2), 8)
    assert dims == ParallelDims(1, 2, 2, 1, 2) and dims.dp_size == 2 and dims.fsdp_size == 2
    # mesh (pp, dp_replicate, dp_shard, cp, tp): ranks 0-3 run stage 0, 4-7 stage 1; both read the same batches
    assert [dims.pp_rank(r) for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [dims.dp_rank(r) for r in range(8)] == [0, 0, 1, 1, 0, 0, 1, 1]
    with pytest.raises(ConfigError, match=r"pp x dp_replicate x dp_shard x cp x tp = 2x1x3x1x1 != world size 4"):
        resolve_degrees(ParallelConfig(pp=2, dp_shard=3), 4)
    assert stage_layers(4, 2) == [[0, 1], [2, 3]]
    assert stage_layers(5, 3) == [[0, 1], [2, 3], [4]]  # uneven: the earlier stages take the extra layers
    assert rank_stages(1, 2, 2) == [1, 3]  # interleaved: looped over the ranks


def _config(tiny_corpus, tmp_path, **overrides):
    return load_config(run_tree(tiny_corpus, tmp_path, **{**LLAMA, "parallel.pp": 2, **overrides}))


@pytest.mark.parametrize(
    ("overrides", "dims", "message"),
    [
        ({"data.decomposition": {"path": "x"}, "data.sources": []}, (1, 1, 1, 1, 2), r"parallel.pp: data.decomposition"),
        ({"model.n_layers": 3, "parallel.pp_schedule": "interleaved_1f1b"}, (1, 1, 1, 1, 2),
         r"model.n_layers \(3\) is less than the pipeline stages \(parallel.pp 2 x 2 per rank = 4\)"),
        ({"data.micro_batch_size": 8}, (1, 1, 1, 1, 2), r"data.micro_batch_size: the 1f1b schedule needs at least parallel.pp \(2\)"),
        ({"parallel.pp_microbatches": 3}, (1, 1, 1, 1, 2), r"parallel.pp_microbatches: 3 micro-batches do not split the 8 rows"),
        ({"parallel.pp_schedule": "interleaved_1f1b", "parallel.pp_microbatches": 2, "model.n_layers": 8}, (1, 1, 1, 1, 4),
         r"interleaved_1f1b schedule needs a multiple of parallel.pp \(4\)"),
    ],
)  # fmt: skip
def test_settings_that_cannot_run_pipelined_name_the_fields(overrides, dims, message, tiny_corpus, tmp_path):
    cfg = _config(tiny_corpus, tmp_path, **overrides)
    with pytest.raises(ConfigError, match=message):
        check_pipeline(cfg, ParallelDims(*dims))


def test_config_and_doctor(tiny_corpus, tmp_path):
    from engine.preflight import config_checks

    with pytest.raises(ConfigError, match="parallel: pp_stages_per_rank needs pp_schedule interleaved_1f1b"):
        _config(tiny_corpus, tmp_path, **{"parallel.pp_stages_per_rank": 2})
    cfg = _config(tiny_corpus, tmp_path, **{"parallel.pp_schedule": "interleaved_1f1b", "data.micro_batch_size": 2})
    checks = {f"{c.area}/{c.name}": c for c in config_checks(cfg, 4)}
    assert "4 process(es) = pp 2 x dp_replicate 1 x dp_shard 2" in checks["parallel/degrees"].detail
    assert checks["parallel/pipeline"].detail == "4 stages of [1, 1, 1, 1] layers, interleaved_1f1b, 2 micro-batch(es) of 2 rows per step"


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # one process on purpose
def test_checkpoints_with_grouped_optimizer_state_still_load(tmp_path):
    """Before pipeline stages, the optimizer state was saved with one `params` list per group."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from engine.checkpoint import Checkpointer
    from engine.dist import DistContext
    from tests.conftest import tiny_model

    def model_and_optimizer():
        model = tiny_model().train()
        return model, torch.optim.AdamW([{"params": list(model.layers.parameters())},
                                         {"params": list(model.norm.parameters()), "weight_decay": 0.0}])  # fmt: skip

    model, optimizer = model_and_optimizer()
    model(torch.randint(0, 64, (2, 8))).square().mean().backward()
    optimizer.step()
    model_sd, optim_sd = get_state_dict(model, optimizer)  # the older, grouped layout
    old = tmp_path / "step_00000001"
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(old))
    (old / "trainer_state.json").write_text(json.dumps({"step": 1}))
    fresh, fresh_optimizer = model_and_optimizer()
    state = Checkpointer(tmp_path, DistContext(0, 1, 0, torch.device("cpu"))).load(old, fresh, fresh_optimizer)
    assert state["step"] == 1
    name = "layers.0.attention.wq.weight"
    want, got = (dict(m.named_parameters())[name] for m in (model, fresh))
    assert torch.equal(want, got)
    assert torch.equal(optimizer.state[want]["exp_avg"], fresh_optimizer.state[got]["exp_avg"])
