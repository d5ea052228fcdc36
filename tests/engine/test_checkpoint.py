"""Checkpoint mechanics: async saves are staged (later updates do not leak in) and committed
only once written, keep-last-K pruning, and `strata consolidate` gathering a checkpoint saved
by FSDP2 x TP2 into one safetensors file whose weights reproduce that run's val loss."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from distributed_runs import shared_run
from safetensors import safe_open
from safetensors.torch import load_file

from engine.checkpoint import (
    MARKER,
    Checkpointer,
    CheckpointMismatch,
    latest_checkpoint,
    list_checkpoints,
    verify,
)
from engine.config import load_config
from engine.dist import DistContext
from engine.evaluate import evaluate
from launch.cli import main
from models.spec import get_spec
from tests.conftest import stepped_model_and_optimizer

CPU = DistContext(0, 1, 0, torch.device("cpu"))


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_async_save_is_a_snapshot_committed_only_after_it_is_written(tmp_path):
    model, optimizer = stepped_model_and_optimizer(0)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    checkpointer = Checkpointer(tmp_path, CPU, keep_last=2, async_save=True)
    final = checkpointer.save(1, model, optimizer, {"tokens_seen": 5})
    # in flight: only the temp directory exists, nothing resolves to it
    assert not final.exists() and (tmp_path / "step_00000001.tmp").is_dir()
    assert latest_checkpoint(tmp_path) is None and not (tmp_path / "step_00000001.tmp" / MARKER).exists()
    with torch.no_grad():  # the training step after the save
        for p in model.parameters():
            p.add_(1.0)
    assert checkpointer.wait() == final and verify(final) is None
    fresh, fresh_optimizer = stepped_model_and_optimizer(1)
    state = checkpointer.load(final, fresh, fresh_optimizer)
    assert state["step"] == 1 and state["tokens_seen"] == 5
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, snapshot[name]), name
    assert fresh_optimizer.state_dict()["state"][0]["step"] == 1


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_keep_last_prunes_old_checkpoints_and_leftover_temp_dirs(tmp_path):
    model, optimizer = stepped_model_and_optimizer(0)
    (tmp_path / "step_00000099.tmp").mkdir(parents=True)  # a save that crashed before its commit
    checkpointer = Checkpointer(tmp_path, CPU, keep_last=2, async_save=True)
    for step in (1, 2, 3):
        checkpointer.save(step, model, optimizer, {}, blocking=step == 3)  # 1, 2 async; 3 waits for 2
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000002"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002", "step_00000003"]


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_checkpoint_of_another_model_shape_stops_the_resume_instead_of_restarting_from_step_0(tmp_path):
    """A changed model config is not corruption: falling back (to step 0) would overwrite the run."""
    model, optimizer = stepped_model_and_optimizer(0)
    checkpointer = Checkpointer(tmp_path, CPU, keep_last=1, async_save=False)
    saved_at = checkpointer.save(5, model, optimizer, {"step": 5})
    wider = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Linear(64, 4))
    with pytest.raises(CheckpointMismatch, match="does not fit this run's model.*[Ss]ize mismatch"):
        checkpointer.load_latest(wider, torch.optim.AdamW(wider.parameters()))
    assert list_checkpoints(tmp_path) == [saved_at] and verify(saved_at) is None


def test_a_one_process_save_and_load_print_no_process_group_warning(tmp_path):
    model, optimizer = stepped_model_and_optimizer(0)
    checkpointer = Checkpointer(tmp_path, CPU, keep_last=1, async_save=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checkpointer.load(checkpointer.save(1, model, optimizer, {}), model, optimizer)
    assert not [w for w in caught if "torch.distributed is disabled" in str(w.message)]


@pytest.fixture(scope="module")
def saved(tiny_corpus, tmp_path_factory):
    """The 4-process FSDP2 x TP2 run of the parity test (checkpoints at steps 10 and 20)."""
    return shared_run("fsdp2xtp2", tmp_path_factory, tiny_corpus, 4, steps=20,
                      **{"parallel.tp": 2, "checkpoint.every": 10})


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_consolidate_writes_full_weights_that_reproduce_the_runs_val_loss(saved, tmp_path, capsys):
    out = tmp_path / "model.safetensors"
    assert main(["consolidate", str(saved), str(out)]) == 0
    assert main(["consolidate", str(saved), str(out)]) == 2  # no silent overwrite
    assert "exists" in capsys.readouterr().err
    cfg = load_config(saved / "config.yaml")
    with torch.device("meta"):
        model = get_spec(cfg.model.family).build(cfg.model)
    model.to_empty(device="cpu")
    model.init_weights()
    tensors = load_file(str(out))
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    model.load_state_dict(tensors, strict=True)
    with safe_open(str(out), "pt") as handle:
        assert handle.metadata()["strata_checkpoint"] == "step_00000020"
        assert json.loads(handle.metadata()["model_config"])["dim"] == cfg.model.dim

    from data_pipeline.formats import open_shardset
    from data_pipeline.loader import eval_batches

    batches = eval_batches(open_shardset(cfg.data.val_path), cfg.data.seq_len, cfg.data.micro_batch_size, 10**9)
    val = evaluate(model, batches, torch.device("cpu"), None)
    expected = json.loads((saved / "summary.json").read_text())["val"]
    assert val["val_tokens"] == expected["val_tokens"]
    assert abs(val["val_loss"] - expected["val_loss"]) <= 1e-5 * expected["val_loss"]

    assert main(["consolidate", str(saved), str(tmp_path / "bf16.safetensors"), "--dtype", "bfloat16"]) == 0
    assert load_file(str(tmp_path / "bf16.safetensors"))["tok_embeddings.weight"].dtype == torch.bfloat16
