"""Pipeline parallelism on CPU (gloo): a tiny untied 4-layer Llama split into pipeline stages
follows the one-process loss and grad-norm curves (1e-4 relative) under 1F1B and GPipe on 2
processes, interleaved 1F1B x FSDP2, pp2 x tp2 (sequence + loss parallel) and pp2 x cp2 on 4;
eval through the pipeline scores the same tokens and the same train.eval_tasks answers; a
3-layer GLA with z-loss splits unevenly (2 + 1 layers) and follows its curve; a pp=2
checkpoint resumes on one process and continues the curve (the optimizer state is saved per
parameter; older grouped checkpoints still load), and a pp=2 continual run continues its pp=2
source; settings that cannot run pipelined stop at once naming the fields."""

from __future__ import annotations

import json

import pytest
from distributed_runs import (
    assert_close,
    copy_run,
    losses,
    resume_on_one_process,
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


def test_a_continual_run_at_pp2_continues_its_pp2_source(pp2, tiny_corpus, tmp_path):
    """Each stage loads its share of the source checkpoint (the names are checked against the
    whole model); keeping everything continues the source's curve."""
    source = copy_run(pp2, tmp_path / "source", keep_steps=[5])
    run_dir = tmp_path / "continued"
    tree = run_tree(tiny_corpus, run_dir, steps=10, **LLAMA, **{"parallel.pp": 2})
    tree["continual"] = {"source": str(source), "optimizer": "keep", "schedule": "continue", "data": "continue"}
    run_ranks(2, run_dir, tree)
    got = losses(run_dir)
    assert sorted(got) == list(range(6, 11))
    assert_close(got, losses(pp2), range(6, 11))


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
        ({"model.tie_embeddings": True}, (1, 1, 1, 1, 2), r"model.tie_embeddings: .*parallel.pp > 1"),
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
