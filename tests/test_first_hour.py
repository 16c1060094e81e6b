"""Issue 18, a new user's first hour: commands that work as first typed, output that survives pipes
(80 columns, no TTY) and Ctrl-C, and advice that fits the case."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ufgir_cli.cli import app
from ufgir_cli.recipe import dump_resolved, load_recipe
from ufgir_cli.recipe_docs import dump_every_key, recipe_sources

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    """``python -m ufgir_cli`` with stdout a pipe (no TTY) at 80 columns."""
    env = {**os.environ, "COLUMNS": "80", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run([sys.executable, "-m", "ufgir_cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def _flat(text: str) -> str:
    """Help and error panels without their box and line breaks."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def _tiny_sets(root: Path, **extra: str) -> list[str]:
    sets = {"model.weights": "'none'", "data.root": f"'{root}'", "data.num_workers": "0", "train.precision": "'fp32'",
            "train.batch_size": "8", "train.epochs": "1", **extra}
    return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


def _fake_run(runs: Path, name: str, age_s: float) -> Path:
    run = runs / name
    (run / "checkpoints").mkdir(parents=True)
    (run / "recipe.toml").write_text(dump_resolved(load_recipe("quickstart", env=False)))
    (run / "checkpoints" / "last.pt").write_bytes(b"")
    t = time.time() - age_s
    for f in (run / "recipe.toml", run / "checkpoints" / "last.pt"):
        os.utime(f, (t, t))
    return run


# ---- 1. RUN defaults to the most recent run --------------------------------------------------

def test_run_defaults_to_the_most_recent_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _fake_run(tmp_path / "runs", "old", 100)
    new = _fake_run(tmp_path / "runs", "new", 10)
    seen = []

    def fake_eval_run(run, *args, **kw):
        seen.append(run)
        raise SystemExit(0)

    monkeypatch.setattr("ufgir_cli.engine.report.eval_run", fake_eval_run)
    res = runner.invoke(app, ["eval"])
    assert seen == [Path("runs") / new.name], res.output
    assert "run: runs/new (the most recent under runs" in res.output


@pytest.mark.parametrize("args", [["eval"], ["metrics"], ["visualize", "rollout"], ["visualize", "attention"],
                                  ["export"]])
def test_no_run_anywhere_says_how_to_make_one(tmp_path, monkeypatch, args):
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert "make demo" in res.output and "ufgir train --recipe quickstart" in res.output
    assert "Missing argument" not in res.output


# ---- 2. output meant to be saved is never wrapped ---------------------------------------------

def test_recipes_show_piped_is_the_toml_itself(tmp_path):
    res = _cli("recipes", "show", "quickstart")
    assert res.returncode == 0, res.stderr
    assert res.stdout == dump_every_key(*recipe_sources("quickstart", env=False))  # every key, each value's source
    saved = tmp_path / "my.toml"
    saved.write_text(res.stdout)
    assert load_recipe(saved) == load_recipe("quickstart")
    assert tomllib.loads(runner.invoke(app, ["recipes", "show", "quickstart"]).output)["description"].endswith(
        "under a minute of training")


def test_train_prints_header_warning_and_next_hint_unwrapped_at_80_columns(small_synthetic, tmp_path):
    """One tiny real run: the header names the threads, a too-long warm-up is warned about,
    provenance.json records the threads, and the `next:` hint with its long path stays one line."""
    out = tmp_path / ("a_rather_long_folder_name_for_runs_" * 2)
    res = _cli("train", "-r", "quickstart", "--quiet", "--out", str(out), "--name", "r", "--threads", "1",
               *_tiny_sets(small_synthetic, **{"schedule.warmup_steps": "500"}))
    assert res.returncode == 0, res.stderr + res.stdout
    run = out / "r"
    lines = res.stdout.splitlines()
    assert f"next: ufgir eval {run}   ·   tensorboard --logdir {run}" in lines
    assert any(line.startswith("training on cpu (fp32, 1 CPU threads)") and str(run) in line for line in lines)
    warning = next(line for line in lines if line.startswith("warning:"))
    assert "schedule.warmup_steps=500" in warning and "never reaches optim.lr" in warning
    hw = json.loads((run / "provenance.json").read_text())["hardware"]
    assert hw["threads"] == 1 and hw["cpus_available"] >= 1


# ---- 3. Ctrl-C: the resume command is the last line, on its own ------------------------------

@pytest.mark.parametrize("terminal", [False, True])
def test_interrupt_during_evaluation_ends_with_the_resume_line(tmp_path, monkeypatch, terminal):
    """With an evaluation bar open, the resume command is the last line: plain (a stop asked for is
    no error), after the display's final state, TTY or not."""
    from ufgir_cli.cli._common import console
    from ufgir_cli.engine.state import Interrupted

    def fake_fit(recipe, run_dir, *, callbacks, resume, overwrite):
        (cb,) = callbacks
        cb.on_train_start({"run_dir": str(run_dir), "device": "cpu", "precision": "fp32", "threads": 1, "epochs": 2,
                           "steps_per_epoch": 4, "start_step": 0, "params_total": 10, "params_trainable": 5,
                           "train_images": 32, "eval_images": 16})
        cb.on_epoch_start(0, 4, 0)
        for step in range(4):
            cb.on_step(step + 1, {"train/loss_step": 1.0, "train/lr": 0.1})
        cb.on_eval_start("test", 2)
        cb.on_eval_batch(8)
        raise Interrupted.at(2, 4, run_dir)

    monkeypatch.setattr("ufgir_cli.engine.train.fit", fake_fit)
    monkeypatch.setattr(console, "_force_terminal", terminal)
    res = runner.invoke(app, ["train", "-r", "quickstart", "--out", str(tmp_path), "--name", "r"])
    assert res.exit_code == 130, res.output
    last = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", res.output).rstrip().splitlines()[-1]
    assert last == f"interrupted by SIGINT at step 4; checkpoint saved. Resume with: ufgir train --resume {tmp_path / 'r'}"


# ---- 4. threads from the cores actually available ---------------------------------------------

def test_threads_follow_affinity_quota_and_workers(tmp_path, monkeypatch):
    from ufgir_cli import cores as threads

    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert threads.cgroup_cpu_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads.cgroup_cpu_quota(tmp_path) is None
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(threads, "cgroup_cpu_quota", lambda: None)
    assert threads.available_cores() == 8
    assert threads.intra_op_threads(None, workers=2) == 6
    assert threads.intra_op_threads(0, workers=2, local_world=2) == 2
    assert threads.intra_op_threads(None, workers=12) == 1
    assert threads.intra_op_threads(3, workers=2) == 3
    monkeypatch.setattr(threads, "cgroup_cpu_quota", lambda: 1.5)  # a container limited to 1.5 CPUs of 8
    assert threads.available_cores() == 2


def test_threads_is_a_recipe_key_and_a_train_option(tmp_path, monkeypatch):
    assert load_recipe("quickstart").train.threads is None
    seen = []

    def fake_fit(recipe, run_dir, **kw):
        seen.append(recipe)
        raise SystemExit(0)

    monkeypatch.setattr("ufgir_cli.engine.train.fit", fake_fit)
    runner.invoke(app, ["train", "-r", "quickstart", "--threads", "3", "--device", "cpu", "--out", str(tmp_path)])
    assert seen[0].train.threads == 3 and seen[0].train.device == "cpu"
    before = torch.get_num_threads()
    from ufgir_cli.engine.train import _torch_flags_restored

    with _torch_flags_restored():
        torch.set_num_threads(1)
    assert torch.get_num_threads() == before


# ---- 5. compare skips what is not a run and writes under runs/ --------------------------------

def test_compare_skips_its_own_outputs_and_writes_under_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = _fake_run(tmp_path / "runs", "a", 0)
    (tmp_path / "runs" / "compare_test.png").write_bytes(b"\x89PNG")
    (tmp_path / "runs" / "compare_test.json").write_text("{}")
    res = runner.invoke(app, ["compare", *sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "runs").iterdir())])
    assert res.exit_code == 1, res.output  # nothing to compare is a failure (issue 37)
    text = " ".join(res.output.split())
    assert "runs/compare_test.png: not a run folder, checkpoint" in text
    assert "runs/compare_test.json: not a run folder, checkpoint" in text
    assert f"`ufgir eval runs/{run.name} --split test`" in text and "nothing to compare" in text
    assert not list(tmp_path.glob("compare_*"))


# ---- 6. one geometry and one class count ------------------------------------------------------

def test_inspect_uses_the_dataset_class_count_and_the_shared_geometry(monkeypatch, tmp_path):
    monkeypatch.setenv("UFGIR_DATA_DIR", str(tmp_path / "nodata"))
    res = runner.invoke(app, ["inspect", "-r", "quickstart"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "trainable 26,298" in text and "for 10 classes, the synthetic dataset as `ufgir train` generates it" in text
    rows = [line.split("│")[1:6] for line in res.output.splitlines() if re.match(r"│\s+\d+ │", line)]
    table = [[c.strip() for c in r] for r in rows]
    # block, group, grid, tokens attended, tokens out: block 1 attends 65 and hands 37 on
    assert table[1][:2] == ["1", "0-1"] and table[1][3:] == ["65", "37"]
    assert table[3][3:] == ["37", "17"] and table[4][1] == "4-5"
    from ufgir_cli.analysis.rollout import encoder_groups
    from ufgir_cli.model import build_model

    model = build_model(load_recipe("quickstart", {"model": {"weights": "none"}}).model, 10)
    assert [f"{a}-{b - 1}" for a, b in encoder_groups(model.grids)] == ["0-1", "2-3", "4-5"]
    assert [b.tokens_attended for b in model.feature_info] == [65, 65, 37, 37, 17, 17]
    res = runner.invoke(app, ["inspect", "-r", "quickstart", "--num-classes", "200"])
    assert "trainable 44,728" in " ".join(res.output.split()) and "--num-classes" in res.output


# ---- 7. advice that fits ----------------------------------------------------------------------

def test_truncated_checkpoint_names_the_cause_and_a_real_alternative(tmp_path):
    ck = tmp_path / "run" / "checkpoints"
    ck.mkdir(parents=True)
    torch.save({"x": torch.zeros(1000)}, ck / "last.pt")
    data = (ck / "last.pt").read_bytes()
    (ck / "last.pt").write_bytes(data[: len(data) // 2])
    res = runner.invoke(app, ["eval", str(ck / "last.pt")])
    msg = res.output.strip()
    assert res.exit_code == 2 and "\n" not in msg
    assert "ends early" in msg and "the run has no other checkpoint" in msg and "earlier checkpoint" not in msg
    (ck / "best.pt").write_bytes(b"")
    assert "use the run's best.pt instead (--checkpoint best)" in runner.invoke(app, ["eval", str(ck / "last.pt")]).output


def test_visualize_bad_image_gets_no_skip_corrupt_advice(tmp_path):
    run = _fake_run(tmp_path / "runs", "a", 0)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    res = runner.invoke(app, ["visualize", "rollout", str(run), "--images", str(bad)])
    text = _flat(res.output)
    assert res.exit_code == 2 and "bad.png cannot be decoded" in text and "skip-corrupt" not in text, text


def test_empty_recipe_file_is_an_error_naming_it(tmp_path):
    empty = tmp_path / "empty.toml"
    empty.write_text("\n")
    res = runner.invoke(app, ["train", "-r", str(empty)])
    assert res.exit_code == 2 and f"recipe file {empty} is empty" in " ".join(res.output.split())


def test_unknown_dataset_names_no_placeholder(tmp_path):
    from ufgir_cli.data.folder import read_split
    from ufgir_cli.errors import DatasetError

    with pytest.raises(DatasetError) as e:
        read_split(tmp_path / "nosuch", "train_val")
    assert "NAME" not in str(e.value) and "'nosuch' is not in `ufgir datasets`" in str(e.value)
    with pytest.raises(DatasetError, match="run `ufgir download soyageing`"):
        read_split(tmp_path / "soyageing", "train_val")


def test_import_upstream_errors_mention_no_internals(tmp_path):
    import argparse

    torch.save({"config": argparse.Namespace(), "model": {}}, tmp_path / "odd.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    for name, expected in (("odd.pth", "its config has no 'image_size'"), ("empty.pth", "the file is empty")):
        res = runner.invoke(app, ["import-upstream", str(tmp_path / name), "--out", str(tmp_path / "r")])
        assert res.exit_code == 2 and expected in " ".join(res.output.split()), res.output
        assert "Traceback" not in res.output and "list index" not in res.output


def test_existing_run_folder_exits_2(tmp_path):
    run = _fake_run(tmp_path, "r", 0)
    res = runner.invoke(app, ["train", "-r", "quickstart", "--out", str(tmp_path), "--name", run.name])
    assert res.exit_code == 2 and "exists" in res.output


def test_version_metavars_and_device_help():
    from ufgir_cli import __version__

    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"ufgir {__version__}"
    device_help = set()
    for cmd in (["train"], ["eval"], ["metrics"], ["visualize", "rollout"], ["inspect"], ["compare"], ["export"]):
        text = runner.invoke(app, [*cmd, "--help"]).output
        assert "<bool>" not in text and "<str>" not in text and "<int>" not in text, (cmd, text)
        flat = _flat(text)
        if "--device" in flat:
            device_help.add(re.search(r"--device TEXT (cpu, cuda.*?when available\))", flat).group(1))
    assert device_help == {"cpu, cuda, cuda:N, or auto (cuda when available)"}
    assert "--device" in runner.invoke(app, ["train", "--help"]).output


# ---- 8. a quiet build ---------------------------------------------------------------------------

def test_build_metadata_has_no_deprecated_forms():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert isinstance(meta["project"]["license"], str)  # an SPDX expression, not the deprecated table
    assert not any(c.startswith("License ::") for c in meta["project"].get("classifiers", []))
    packages = meta["tool"]["setuptools"]["packages"]
    shipped = {p.parent for p in (ROOT / "ufgir_cli").rglob("*") if p.is_file() and p.suffix in (".safetensors", ".toml")}
    for folder in shipped:  # every folder with data files is a listed package, or setuptools warns
        assert ".".join(folder.relative_to(ROOT).parts) in packages, folder
