"""`strata eval`: scores checkpoints and HF directories on ShardSets as the trainer's eval does."""

from __future__ import annotations

import json

import pytest

from engine.entry import run_training
from engine.export import export_hf
from launch.cli import main
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def run(tiny_corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("eval") / "run"
    tree = tiny_config(tiny_corpus, run_dir, **{"data.val_sets": {"again": str(tiny_corpus / "val")}})
    result = run_training(tree)
    return run_dir, result


def scores(capsys, argv) -> list[dict]:
    capsys.readouterr()
    assert main(["eval", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_run_is_scored_on_its_own_sets_as_its_last_eval(run, capsys):
    run_dir, result = run
    # the trainer's eval: micro batch 4 x 1 rank, train.eval_batches 2
    (row,) = scores(capsys, [str(run_dir), "--batch-size", "4", "--max-batches", "2"])
    assert row["step"] == 6 and row["seq_len"] == 32 and sorted(row["results"]) == ["again", "val"]
    for name, suffix in (("val", ""), ("again", "/again")):
        assert row["results"][name]["val_loss"] == pytest.approx(result.val[f"val_loss{suffix}"], rel=1e-6)
        assert row["results"][name]["val_bpb"] == pytest.approx(result.val[f"val_bpb{suffix}"], rel=1e-6)


def test_every_checkpoint_gives_a_curve(run, tiny_corpus, capsys):
    run_dir, _ = run
    assert main(["eval", str(run_dir), "--all-checkpoints", "--data", f"held={tiny_corpus / 'val'}", "--json"]) == 0
    out, err = capsys.readouterr()
    rows = json.loads(out)
    assert [r["step"] for r in rows] == [3, 6]
    assert "[2/2] " in err  # progress of a curve, on stderr
    assert all(list(r["results"]) == ["held"] for r in rows)
    assert rows[1]["results"]["held"]["val_loss"] < rows[0]["results"]["held"]["val_loss"]  # it learned


def test_an_hf_export_scores_like_its_checkpoint(run, tiny_corpus, tmp_path, capsys):
    run_dir, _ = run
    hf_dir = export_hf(run_dir, tmp_path / "hf")
    data = ["--data", str(tiny_corpus / "val"), "--seq-len", "32"]
    (strata,) = scores(capsys, [str(run_dir), *data])
    (hf,) = scores(capsys, [str(hf_dir), *data])
    assert hf["step"] is None and hf["checkpoint"] == "hf"
    assert hf["results"]["val"]["val_loss"] == pytest.approx(strata["results"]["val"]["val_loss"], rel=1e-5)


def test_the_table_and_the_errors(run, tmp_path, capsys):
    run_dir, _ = run
    assert main(["eval", str(run_dir), "--max-batches", "1"]) == 0
    out = capsys.readouterr().out
    assert "again" in out and "step_00000006" in out
    assert main(["eval", str(tmp_path / "nope")]) == 2  # errors go to stderr, as one line
    assert "no such checkpoint" in capsys.readouterr().err
    assert main(["eval", str(run_dir), "--data", "a=x", "--data", "a=y"]) == 2
    assert "given twice" in capsys.readouterr().err
    assert main(["eval", str(run_dir), "--seq-len", "4096"]) == 2
    assert "exceeds the model's max_seq_len" in capsys.readouterr().err
    assert main(["eval", str(run_dir), "--data", f"v={tmp_path}"]) == 2  # before any model is loaded
    assert f"eval error: --data v={tmp_path}: not a ShardSet (no manifest.json)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(run_dir), "--batch-size", "0"])
    assert exit_info.value.code == 2 and "argument --batch-size: must be >= 1" in capsys.readouterr().err


def test_tasks_are_scored_beside_the_val_sets(run, tmp_path, capsys):
    run_dir, _ = run
    task = tmp_path / "mc.jsonl"  # engine.downstream's task format
    task.write_text(
        json.dumps({"context": "import", "choices": [" os", " sys", " re"], "label": 0}) + "\n"
        + json.dumps({"query": "def f(self", "choices": ["):", ", x):"], "gold": 1}) + "\n"
    )  # fmt: skip
    (row,) = scores(capsys, [str(run_dir), "--task", f"mc={task}", "--max-batches", "1"])
    assert sorted(row["results"]) == ["again", "val"]  # --task alone keeps the run's val sets
    assert row["tasks"]["mc"]["items"] == 2 and row["tasks"]["mc"]["skipped"] == {}
    assert main(["eval", str(run_dir), "--task", str(task), "--max-batches", "1"]) == 0  # NAME: the file's stem
    r = row["tasks"]["mc"]
    assert f"{r['acc']:.4f} / {r['acc_norm']:.4f}" in capsys.readouterr().out


def test_the_table_says_how_many_task_lines_were_skipped_and_why(run, tmp_path, capsys):
    run_dir, _ = run
    task = tmp_path / "mc.jsonl"
    good = json.dumps({"context": "import", "choices": [" os", " sys"], "label": 0})
    task.write_text(f"{good}\n{good}\nnot json\n" + json.dumps({"context": "x"}) + "\n")
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--task", f"mc={task}", "--num-fewshot", "1", "--max-batches", "1"]) == 0
    out = capsys.readouterr().out
    assert "mc (1-shot)" in out
    assert "note: task mc: 2 items scored, 2 skipped (invalid JSON 1, missing field 1)" in out, out
