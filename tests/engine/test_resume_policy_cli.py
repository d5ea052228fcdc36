"""`strata resume`: the config it builds (policy defaults, step counting, run dir), training through
it, its refusals, `--from-hf`, and the continual recipes in configs/."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from test_resume_policy import LR_CONST, REWARM, run_source, two_sources

from engine.config import load_config
from engine.export import export_hf, load_checkpoint_weights
from launch.cli import build_parser, main
from launch.commands.resume import build_resume_config
from tests.conftest import tiny_config

RECIPES = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(scope="module")
def source(tiny_corpus, tmp_path_factory):
    return run_source(tiny_corpus, tmp_path_factory.mktemp("source") / "run")


def write_yaml(path: Path, tree: dict) -> Path:
    path.write_text(yaml.safe_dump(tree))
    return path


def new_config(corpus: Path, tmp_path: Path, run_dir: Path, **overrides) -> Path:
    """A continual config: replay 'tiny' 25% + new 'b' 75%, rewarm; train.steps = steps to add."""
    values = {"schedule": dict(REWARM), "train.steps": 4, "data.sources": two_sources(corpus), **overrides}
    return write_yaml(tmp_path / "new.yaml", tiny_config(corpus, run_dir, **values))


def test_resume_with_a_new_config_trains_and_pins_the_policy(tiny_corpus, source, tmp_path, capsys):
    run_dir = tmp_path / "b"
    config = new_config(tiny_corpus, tmp_path, run_dir)
    assert main(["resume", str(source.run_dir), "--config", str(config), "--optimizer", "reset"]) == 0
    out = capsys.readouterr().out
    assert "note: schedule: 'restart' by default (a new config was given)" in out
    assert "note: data: 'new' by default (the mixture changed)" in out
    assert "  optimizer: reset (fresh AdamW: zero moments, step 0)" in out
    assert "  step:      continued at 6 -> ends at 10 (4 steps;" in out
    saved = load_config(run_dir / "config.yaml")
    assert saved.train.steps == 10  # 4 steps counted from the source's step 6
    policy = saved.continual
    assert (policy.optimizer, policy.schedule, policy.data, policy.step) == ("reset", "restart", "new", "continue")
    assert policy.source == str(source.step_dir.resolve()) and policy.current_lr == pytest.approx(LR_CONST)
    assert json.loads((run_dir / "summary.json").read_text())["step"] == 10


def test_resume_without_a_config_continues_everything_by_default(tiny_corpus, source, tmp_path, capsys):
    src = tmp_path / "src"  # a private copy: the default run dir is a sibling of the source
    source_copy = run_source(tiny_corpus, src)
    assert main(["resume", str(source_copy.step_dir), "--steps", "2", "--no-train"]) == 0
    out = capsys.readouterr().out
    assert "note: schedule: 'continue' by default (no new config was given)" in out
    assert "note: data: 'continue' by default (same sources as the source run)" in out
    run_dir = tmp_path / "src-resume-6"
    saved = load_config(run_dir / "config.yaml")
    assert saved.train.steps == 8 and saved.continual.schedule == "continue"
    assert saved.continual.source_schedule == source_copy.schedule
    assert saved.continual.data == "continue" and saved.continual.optimizer == "keep"
    # a second `resume` into the same run is refused: it has its own checkpoints now
    assert main(["resume", str(source_copy.step_dir), "--steps", "2"]) == 2
    assert "already has checkpoints" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "give a SOURCE checkpoint or --from-hf DIR"),
        (["--steps", "2", "--run-dir", "{source}"], "is the source run"),
        (["--steps", "2", "--config", "{tmp}/missing.yaml"], "config file not found"),
        (["--schedule", "continue", "--step", "reset", "--run-dir", "{tmp}/x"], "schedule: 'continue' needs step 'continue'"),
        (["--anneal", "2", "--schedule", "continue"], "an anneal branch needs schedule 'restart'"),
        (["--anneal", "2", "--steps", "3"], "--steps: an anneal branch runs --anneal STEPS steps"),
        (["--anneal-to", "1e-4", "--run-dir", "{tmp}/y"], "only with --anneal"),
    ],
)
def test_resume_refuses_contradictions_with_exit_2(source, tmp_path, capsys, argv, message):
    argv = [a.format(source=source.run_dir, tmp=tmp_path) for a in argv]
    positional = [str(source.run_dir)] if argv else []
    assert main(["resume", *positional, *argv]) == 2
    assert message in capsys.readouterr().err


def test_resume_from_hf_loads_the_weights_and_resets_the_rest(tiny_corpus, source, tmp_path, capsys):
    hf_dir = export_hf(source.step_dir, tmp_path / "hf")
    assert main(["resume", "--from-hf", str(hf_dir)]) == 2
    assert "--from-hf: needs --config" in capsys.readouterr().err
    run_dir = tmp_path / "from_hf"
    config = new_config(tiny_corpus, tmp_path, run_dir, schedule={"name": "cosine", "warmup_steps": 1})
    assert main(["resume", "--from-hf", str(hf_dir), "--config", str(config), "--no-train"]) == 0
    out = capsys.readouterr().out
    assert f"  weights:   loaded from the Hugging Face directory {hf_dir.resolve()}" in out
    assert "  optimizer: reset" in out and "  step:      reset to 0 -> ends at 4 (4 steps)" in out
    weights, _, _ = load_checkpoint_weights(run_dir)  # the new run's own step-0 checkpoint
    assert (run_dir / "checkpoints" / "step_00000000").is_dir()
    for name, tensor in weights.items():
        torch.testing.assert_close(tensor, source.weights[name], rtol=0, atol=0, msg=name)
    assert (run_dir / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
    policy = load_config(run_dir / "config.yaml").continual
    assert policy.from_hf == str(hf_dir.resolve()) and policy.start_step == 0


@pytest.mark.parametrize(
    ("recipe", "expected"),
    [
        ("continual_rewarm.yaml", ("keep", "restart", "new", "continue")),
        ("continual_infinite.yaml", ("keep", "restart", "new", "continue")),
        ("continual_replay.yaml", ("keep", "restart", "continue", "continue")),
    ],
)
def test_recipes_give_the_policy_they_document(source, recipe, expected, tmp_path):
    args = build_parser().parse_args(
        ["resume", str(source.run_dir), "--config", str(RECIPES / recipe), "--run-dir", str(tmp_path / "r"),
         "--set", "data.seq_len=32"]  # fmt: skip
    )
    cfg, notes = build_resume_config(args)
    assert cfg.model == load_config(source.run_dir / "config.yaml").model  # omitted: the source's
    assert "model: the source run's (the new config has no model section)" in notes
    policy = cfg.continual
    assert (policy.optimizer, policy.schedule, policy.data, policy.step) == expected
    recipe_steps = yaml.safe_load((RECIPES / recipe).read_text())["train"]["steps"]
    assert cfg.train.steps == 6 + recipe_steps and policy.start_step == 6
    if recipe == "continual_replay.yaml":
        assert {s.name: s.weight for s in cfg.data.sources} == {"new_domain": 0.75, "stdlib": 0.25}


@pytest.mark.slow  # two spawned ranks: ~20-60 s on 2 busy cores
def test_resume_on_two_processes_reshards_the_source_and_follows_the_same_curve(tiny_corpus, source, tmp_path):
    """The 1-process source continued by 2 FSDP ranks (gloo), optimizer kept and data continued,
    gives the losses of the same continuation in one process."""
    losses = {}
    for nproc in (1, 2):
        run_dir = tmp_path / f"p{nproc}"
        config = new_config(tiny_corpus, tmp_path, run_dir, **{"train.deterministic": True, "data.prefetch": 0})
        argv = ["resume", str(source.step_dir), "--config", str(config), "--data", "continue", "--nproc", str(nproc)]
        assert main(argv) == 0
        records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        losses[nproc] = {r["step"]: r["loss"] for r in records if "loss" in r}
        assert json.loads((run_dir / "continual.json").read_text())["data"]["sampler_step"] == 6
    assert sorted(losses[2]) == [7, 8, 9, 10]
    for step in (7, 8, 9, 10):
        assert losses[2][step] == pytest.approx(losses[1][step], rel=1e-4), step


def test_context_extension_recipe_merges_the_model_and_trains_longer_rows(tiny_corpus, source, tmp_path, capsys):
    """configs/continual_long_context.yaml: a partial model section (max_seq_len, rope_theta) over
    the source's model; every tensor loads and the run trains on rows longer than the source's."""
    run_dir = tmp_path / "long"
    overrides = ["model.max_seq_len=128", "model.rope_theta=40000", "data.seq_len=64", "data.global_batch_size=4",
                 "data.micro_batch_size=4", f"data.sources=[{{path: {tiny_corpus / 'train'}, name: tiny}}]",
                 f"data.val_path={tiny_corpus / 'val'}", "train.steps=3", "train.eval_every=0",
                 f"train.run_dir={run_dir}", "checkpoint.every=0"]  # fmt: skip
    argv = ["resume", str(source.run_dir), "--config", str(RECIPES / "continual_long_context.yaml")]
    assert main([*argv, *(x for o in overrides for x in ("--set", o))]) == 0
    assert "note: model: the source run's, with this config's max_seq_len, rope_theta" in capsys.readouterr().out
    saved, before = load_config(run_dir / "config.yaml").model, load_config(source.run_dir / "config.yaml").model
    assert (saved.max_seq_len, saved.rope_theta, saved.dim) == (128, 40000.0, before.dim)
    summary = json.loads((run_dir / "summary.json").read_text())
    source_val = json.loads((source.run_dir / "summary.json").read_text())["val"]["val_loss"]
    assert summary["exit_code"] == 0 and summary["val"]["val_loss"] < source_val + 0.1  # trained weights, not a fresh init
    capsys.readouterr()
    assert main(["report", str(run_dir), "--json"]) == 0  # a continual run reports its source and policy
    (report,) = json.loads(capsys.readouterr().out)["runs"]
    assert report["continual"]["source"] == str(source.step_dir.resolve())
    assert (report["continual"]["start_step"], report["continual"]["optimizer"]) == (6, "kept")


def test_steps_flag_is_what_the_schedule_is_checked_against(tiny_corpus, source, tmp_path):
    """A schedule whose warmup exceeds the config file's own train.steps but fits --steps N runs."""
    config = new_config(tiny_corpus, tmp_path, tmp_path / "long", **{"schedule": {**REWARM, "warmup_steps": 20}})
    argv = ["resume", str(source.run_dir), "--config", str(config), "--steps", "30", "--no-train"]
    assert main(argv) == 0
    assert load_config(tmp_path / "long" / "config.yaml").train.steps == 36
    assert main([*argv[:-3], "--steps", "10", "--no-train", "--run-dir", str(tmp_path / "short")]) == 2


def test_skip_data_flag_pins_the_policy_and_continues_everything_else(tiny_corpus, tmp_path, capsys):
    source_copy = run_source(tiny_corpus, tmp_path / "src")
    assert main(["resume", str(source_copy.step_dir), "--steps", "2", "--skip-data", "5", "--no-train"]) == 0
    out = capsys.readouterr().out
    assert "note: data: 5 global batches (~1,280 tokens) skipped, never trained on" in out
    assert "schedule section is not used" not in out  # no --config: the source's schedule is the one that goes on
    policy = load_config(tmp_path / "src-resume-6" / "config.yaml").continual
    assert (policy.optimizer, policy.schedule, policy.data, policy.step, policy.skip_data_steps) == (
        "keep", "continue", "continue", "continue", 5)
