"""What `strata` commands print says each thing once and says it right: a path is not repeated,
a bad flag is named by the flag, a file is not called a missing directory, a CPU machine gets no
CUDA noise from megatron-core, and each progress line is labelled with its own phase."""

from __future__ import annotations

import numpy as np
import pytest
from launch_helpers import strata

from launch.cli import main


def test_import_hf_names_the_directory_once(tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    assert main(["import-hf", str(raw), "--no-train"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"config error: {raw}: no config.json (not a Hugging Face model directory)"


@pytest.mark.parametrize("flag, value, expected", [
    ("--max-new-tokens", "-1", "argument --max-new-tokens: must be >= 0, got -1"),
    ("--temperature", "-0.5", "argument --temperature: must be a finite number >= 0, got -0.5"),
    ("--top-k", "0", "argument --top-k: must be >= 1, got 0"),
])
def test_generate_names_a_bad_sampling_flag(flag, value, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "some_run", "--prompt", "1,2", "--ids", flag, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert expected in err and "generate: generate" not in err


def test_inspect_of_a_file_says_it_is_a_file(tmp_path, capsys):
    path = tmp_path / "notes.txt"
    path.write_text("not a ShardSet\n")
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: a file, not a directory" in err and "no such directory" not in err


def test_convert_to_megatron_prints_no_cuda_or_apex_noise_on_cpu(corpus, tmp_path):
    result = strata("convert", str(corpus), str(tmp_path / "megatron"), "--format", "megatron", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "No CUDA runtime" not in result.stderr
    assert "Transformer Engine and Apex" not in result.stderr


def test_select_labels_its_write_phase_write(corpus, tmp_path, capsys):
    from data_pipeline.formats import open_shardset
    from data_pipeline.manifest import manifest_sha256
    from data_pipeline.select import Scores

    n_docs = len(open_shardset(corpus))
    rng = np.random.default_rng(0)
    nll = {role: rng.random(n_docs) for role in ("reference", "teacher")}
    scores = tmp_path / "scores.npz"
    Scores("miniplm", nll, 32, manifest_sha256(corpus), {}).save(scores)

    code = main(["select", "miniplm", str(corpus), "--out", str(tmp_path / "kept"), "--scores", str(scores)])
    assert code == 0
    err = capsys.readouterr().err
    assert "select miniplm write [" in err  # the write phase's progress line
    assert "select miniplm [" not in err  # no scoring phase: the scores were reused


@pytest.mark.parametrize("argv, overrides, field", [
    (["train", "--nproc", "2"], {"parallel.cp": 3}, "parallel: dp_replicate (1) x cp (3)"),
    (["submit", "--launcher", "local", "--nproc", "2"], {"parallel.pp": 3}, "does not divide the world size (2)"),
    (["submit", "--launcher", "ray", "--workers-per-node", "2"],
     {"parallel.pp": 2, "model.tie_embeddings": False, "parallel.pp_microbatches": 3}, "parallel.pp_microbatches:"),
    (["submit", "--launcher", "slurm", "--workers-per-node", "2", "--dry-run"],
     {"parallel.cp": 2, "data.seq_len": 30}, "data.seq_len: 30 tokens do not split"),
])
def test_a_combination_wrong_for_the_world_size_is_one_line_before_any_rank_starts(
        tiny_corpus, tmp_path, capsys, monkeypatch, argv, overrides, field):
    """Each rank would name the same error (one line per rank, after the spawn; on SLURM after the queue)."""
    import yaml

    from tests.conftest import tiny_config

    def no_spawn(*args, **kwargs):
        raise AssertionError("ranks were started")

    monkeypatch.setattr("launch.local.launch_local", no_spawn)
    monkeypatch.setattr("launch.ray_launcher.launch_ray", no_spawn)
    monkeypatch.setattr("launch.slurm.submit", no_spawn)
    config = tmp_path / "config.yaml"
    tree = tiny_config(tiny_corpus, tmp_path / "run", **{"parallel.dp_replicate": 1, **overrides})
    config.write_text(yaml.safe_dump(tree))
    capsys.readouterr()
    assert main([argv[0], str(config), *argv[1:]]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: ") and field in lines[0], captured
    assert "script" not in captured.out  # no sbatch script printed for --dry-run
