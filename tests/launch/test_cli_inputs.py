"""Wrong command-line input fails at once, with exit code 2 and a message naming the flag, field
or file, before any work: `--set` values, unknown flags, a run directory that already holds a
run, data paths that are not ShardSets. Also: several overrides after one `--set`."""

from __future__ import annotations

import pytest
from launch_helpers import tiny_config, write_config

from launch.cli import build_parser, main


def test_one_set_takes_several_overrides_and_set_repeats():
    args = build_parser().parse_args(["train", "c.yaml", "--set", "a.b=1", "c.d=x", "--set", "e=2"])
    assert args.config == "c.yaml" and args.overrides == ["a.b=1", "c.d=x", "e=2"]


@pytest.mark.parametrize("argv, expected", [
    (["train", "--set", "a=1", "c.yaml"], "argument --set: expected KEY=VALUE, got 'c.yaml' (give the config file before --set)"),
    (["train", "c.yaml", "--nproc", "0"], "argument --nproc: must be >= 1, got 0"),
    (["train", "c.yaml", "--bogus"], "strata train: error: unrecognized arguments: --bogus"),
    (["select", "miniplm", "s", "--out", "o", "--bogus"], "strata select miniplm: error: unrecognized arguments: --bogus"),
])
def test_bad_arguments_exit_2_naming_the_flag_and_the_command(argv, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err


def test_a_new_run_refuses_a_run_dir_that_holds_another_runs_checkpoints(corpus, tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step_00000010").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("the first run's config\n")
    config = write_config(tmp_path / "c.yaml", tiny_config(corpus, run_dir))
    for argv in (["train", str(config)], ["submit", str(config), "--launcher", "local"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"train.run_dir: {run_dir} already holds a run (checkpoints up to step_00000010)" in err
        assert f"strata train --resume {run_dir}" in err
    assert (run_dir / "config.yaml").read_text() == "the first run's config\n"  # untouched


@pytest.mark.parametrize("override, expected", [
    ("data.val_path={corpus_parent}", "config error: data.val_path: not a ShardSet (no manifest.json): {corpus_parent}"),
    ("data.val_sets={{old: {missing}}}", "config error: data.val_sets.old: no such directory: {missing}"),
    ("data.val_path=file://{missing}", "config error: data.val_path: {missing}: cannot fetch its manifest.json"),
])
def test_a_data_path_that_is_not_a_shardset_stops_before_training(override, expected, corpus, tmp_path, capsys):
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", tiny_config(corpus, run_dir))
    names = {"corpus_parent": corpus.parent, "missing": tmp_path / "missing"}
    assert main(["train", str(config), "--set", override.format(**names)]) == 2
    assert expected.format(**names) in capsys.readouterr().err
    assert not run_dir.exists()  # failed before the trainer made its directory

