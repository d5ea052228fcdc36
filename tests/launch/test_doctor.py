"""`strata doctor`: machine facts, and a config's problems named before a long run (exit 1)."""

from __future__ import annotations

import json

import pytest
import yaml

from launch.cli import main
from tests.conftest import tiny_config


def doctor(capsys, *argv) -> tuple[int, dict]:
    capsys.readouterr()
    code = main(["doctor", *argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def by_name(report: dict) -> dict[str, dict]:
    return {f"{c['area']}/{c['name']}": c for c in report["checks"]}


def write(tmp_path, tree) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def test_this_machine_passes(capsys):
    code, report = doctor(capsys)
    checks = by_name(report)
    assert code == 0 and report["failed"] == 0
    assert checks["machine/python"]["status"] == checks["machine/torch"]["status"] == "ok"
    assert "packages/ray" in checks and "gpu/cuda" in checks


def test_a_runnable_config_passes_and_says_what_it_found(tiny_corpus, tmp_path, capsys):
    code, report = doctor(capsys, write(tmp_path, tiny_config(tiny_corpus, tmp_path / "run")), "--nproc", "2")
    checks = by_name(report)
    assert code == 0, [c for c in report["checks"] if c["status"] == "failure"]
    assert "2 process(es) = dp_replicate 1 x dp_shard 2 x cp 1 x tp 1" in checks["parallel/degrees"]["detail"]
    assert checks["data/source tiny"]["status"] == "ok" and "documents" in checks["data/source tiny"]["detail"]
    assert checks["model/parameters"]["detail"].startswith("llama, ")
    assert "free" in checks["disk/run_dir"]["detail"]


@pytest.mark.parametrize(
    ("overrides", "nproc", "check", "words"),
    [
        ({"data.sources": [{"path": "/nowhere/train", "name": "gone"}]}, 1, "data/source gone", "/nowhere/train"),
        ({"model.vocab_size": 16}, 1, "data/source tiny", "tokenizer vocab"),
        ({"parallel.tp": 2}, 3, "parallel/degrees", "does not divide the world size (3)"),
        ({"train.eval_tasks": {"mc": "/nowhere/mc.jsonl"}}, 1, "data/task mc", "/nowhere/mc.jsonl"),
        ({"data.global_batch_size": 12, "data.micro_batch_size": 4}, 2, "parallel/batch", "not a multiple"),
        ({"parallel.cp": 2, "data.seq_len": 30}, 2, "parallel/context_parallel", "do not split into 4 equal parts"),
    ],
)
def test_problems_are_named_and_exit_1(tiny_corpus, tmp_path, capsys, overrides, nproc, check, words):
    tree = tiny_config(tiny_corpus, tmp_path / "run", **overrides)
    code, report = doctor(capsys, write(tmp_path, tree), "--nproc", str(nproc))
    found = by_name(report)[check]
    assert code == 1 and found["status"] == "failure" and words in found["detail"], found


def test_gla_triton_on_cpu_needs_the_interpreter(tiny_corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    tree = tiny_config(tiny_corpus, tmp_path / "run", **{"model.family": "gla", "model.gla_backend": "triton"})
    code, report = doctor(capsys, write(tmp_path, tree))
    assert code == 1 and by_name(report)["model/gla_backend"]["status"] == "failure"


def test_a_bad_config_is_exit_2_naming_the_field(tmp_path, capsys):
    assert main(["doctor", write(tmp_path, {"optim": {"lr": "fast"}})]) == 2
    assert "optim.lr" in capsys.readouterr().err


def test_the_table(tiny_corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["doctor", write(tmp_path, tiny_config(tiny_corpus, tmp_path / "run"))]) == 0
    out = capsys.readouterr().out
    assert "strata doctor" in out and "no check failed" in out and "source tiny" in out


def test_set_takes_several_overrides_as_train_does_and_nproc_must_be_positive(tiny_corpus, tmp_path, capsys):
    config = write(tmp_path, tiny_config(tiny_corpus, tmp_path / "run"))
    code, report = doctor(capsys, config, "--set", "parallel.dp_replicate=1", "parallel.cp=2", "--nproc", "2")
    assert code == 0 and "cp 2" in by_name(report)["parallel/degrees"]["detail"], report
    with pytest.raises(SystemExit) as exit_info:
        main(["doctor", config, "--nproc", "0"])
    assert exit_info.value.code == 2 and "--nproc" in capsys.readouterr().err
