"""Never lose a run: bit-exact resume after SIGKILL, SIGTERM/SIGINT, a kill during a checkpoint
write, and non-finite numbers.

Training runs here pin torch to one thread, in this process and in subprocesses alike: results are
then comparable bit for bit, and two cores shared with other work are not oversubscribed.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ufgir_cli.cli import app
from ufgir_cli.engine.callbacks import Callback
from ufgir_cli.engine.train import apply_update, fit
from ufgir_cli.errors import TrainingError
from ufgir_cli.model.checkpoint import read_checkpoint
from ufgir_cli.recipe import load_recipe

runner = CliRunner()


@contextlib.contextmanager
def torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def data6(tmp_path_factory) -> Path:
    """4 classes x 12 train_val images (48: 6 steps of 8 per epoch), 4 test images each, 64 px."""
    from ufgir_cli.data.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("data6") / "synthetic"
    generate_synthetic(root, num_classes=4, train_val=12, test=4, size=64)
    return root


def overrides(root: Path, *, workers: int = 0, **train) -> dict:
    """A tiny run: micro ViT at 64 px, random init, fp32, dropout and augmentation on."""
    return {
        "model": {"weights": "none", "drop": 0.1},
        "data": {"root": str(root), "num_workers": workers, "hflip": True},
        "train": {"epochs": 1, "batch_size": 8, "precision": "fp32", **train},
        "eval": {"every": 0},
        "optim": {"lr": 0.05},
        "schedule": {"warmup_steps": 2},
        "logging": {"log_every": 1},
    }


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def comparable(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k not in ("time", "train/images_per_s")}


def run_script(code: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run python code in its own process group; whatever it leaves (data-loader workers) is killed."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    p = subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        _kill_group(p.pid)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# ---- SIGKILL at a random moment of the third epoch, then --resume: bit-exact -----------------


def test_sigkill_in_third_epoch_then_resume_is_bit_exact(data6, tmp_path):
    over = overrides(data6, workers=2, epochs=4, deterministic=True, checkpoint_every=2)
    over["eval"]["every"] = 2
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "killed"
    t0 = time.time()
    ref = fit(load_recipe("quickstart", over), ref_dir)
    t_ref = time.time() - t0

    # Steps 13-18 are epoch 3 (6 steps per epoch). From on_step(K) a timer sends SIGKILL after a
    # random delay: it lands anywhere in the following step (loading, forward, backward, logging or
    # a checkpoint write); on_step(K + 1) waits for it, so the kill always lands in epoch 3.
    k, delay = random.randint(13, 17), random.uniform(0.0, 0.5)
    script = f"""
import os, signal, threading, time
from pathlib import Path
from ufgir_cli.engine.callbacks import Callback
from ufgir_cli.engine.train import fit
from ufgir_cli.recipe import load_recipe

class KillSoon(Callback):
    def on_step(self, step, logs):
        if step == {k}:
            threading.Timer({delay}, os.kill, (os.getpid(), signal.SIGKILL)).start()
        if step == {k + 1}:
            time.sleep(60)

fit(load_recipe("quickstart", {over!r}), Path({str(run_dir)!r}), callbacks=[KillSoon()])
"""
    res = run_script(script)
    why = f"kill after step {k} + {delay:.2f}s"
    assert res.returncode == -signal.SIGKILL, (why, res.stderr[-2000:])
    saved = read_checkpoint(run_dir / "checkpoints" / "last.pt")["train_state"]
    assert 12 <= saved["step"] <= k + 1 and saved["epoch"] == 2, why  # a checkpoint inside epoch 3
    logged = [r["step"] for r in records(run_dir)]
    assert logged == list(range(1, logged[-1] + 1)) and logged[-1] >= saved["step"], why

    t0 = time.time()
    out = runner.invoke(app, ["train", "--resume", str(run_dir), "--quiet"])
    t_resume = time.time() - t0
    assert out.exit_code == 0, out.output

    # Same tensors (weights, BatchNorm buffers, optimiser momentum), same log, same evaluation.
    a, b = read_checkpoint(ref_dir / "checkpoints" / "last.pt"), read_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name, t in a["state_dict"].items():
        assert torch.equal(t, b["state_dict"][name]), f"{name} differs ({why})"
    for sa, sb in zip(a["train_state"]["optimizer"]["state"].values(), b["train_state"]["optimizer"]["state"].values(),
                      strict=True):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"]), why
    ra, rb = records(ref_dir), records(run_dir)
    assert [r["step"] for r in rb] == [r["step"] for r in ra] == list(range(1, 25)), why
    assert [comparable(r) for r in rb] == [comparable(r) for r in ra], why  # losses, lr, grad norms, test/top1
    assert rb[-1]["test/top1"] == ref["final_top1"] and "test/top1" in rb[11]  # evaluated at epochs 2 and 4

    # TensorBoard: the resumed run's purge marker hides the killed run's steps after the checkpoint.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    tb = [e.step for e in acc.Scalars("train/loss")]
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 2
    assert tb == list(range(1, 25)), (why, tb)
    print(f"\nreference run {t_ref:.1f}s, resume from step {saved['step']} {t_resume:.1f}s ({why})")


# ---- SIGTERM / SIGINT to the whole process group (scheduler, Ctrl-C) ---------------------------


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_prints_resume_command_and_exits(small_synthetic, tmp_path, sig, code):
    """The signal goes to the process group, data-loader workers included, as Slurm and Ctrl-C do."""
    out = tmp_path / "runs"
    sets = ["model.weights='none'", f"data.root='{small_synthetic}'", "data.num_workers=2", "train.epochs=4",
            "train.precision='fp32'", "logging.log_every=1", "train.batch_size=8", "eval.every=0"]
    cmd = [sys.executable, "-m", "ufgir_cli", "train", "-r", "quickstart", "--quiet", "--out", str(out), "--name", "r"]
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    p = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "r" / "metrics.jsonl"
    try:
        deadline = time.time() + 120
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
            assert p.poll() is None and time.time() < deadline, p.communicate()
            time.sleep(0.05)
        os.killpg(p.pid, sig)
        stdout, stderr = p.communicate(timeout=120)
    finally:
        _kill_group(p.pid)
    assert p.returncode == code, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"interrupted by {sig.name} at step" in lines[0], stderr[-3000:]
    assert f"Resume with: ufgir train --resume {out / 'r'}" in lines[0]
    state = read_checkpoint(out / "r" / "checkpoints" / "last.pt")["train_state"]
    # Saved at the step the signal finished; at an epoch's last step the epoch record (with its
    # evaluation) is not written yet: the resume writes it.
    assert 2 <= state["step"] < 12 and records(out / "r")[-1]["step"] in (state["step"], state["step"] - 1)
    if sig == signal.SIGTERM:  # and it resumes to the end, every step logged once
        res = runner.invoke(app, ["train", "--resume", str(out / "r"), "--quiet"])
        assert res.exit_code == 0, res.output
        assert [r["step"] for r in records(out / "r")] == list(range(1, 13))


def test_sigint_in_process_finishes_the_step(small_synthetic, tmp_path):
    class CtrlC(Callback):
        def on_step(self, step, logs):
            if step == 2:
                os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs in the background
    with pytest.raises(TrainingError) as e:
        fit(load_recipe("quickstart", overrides(small_synthetic, epochs=2)), tmp_path / "r", callbacks=[CtrlC()])
    assert e.value.exit_code == 130 and "interrupted by SIGINT at step 2" in str(e.value)
    assert read_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt")["train_state"]["step"] == 2
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


def test_sigint_during_evaluation_stops_within_it_and_resumes_exactly(small_synthetic, tmp_path):
    """A signal in the middle of an evaluation stops after the current batch, saves the state as it
    was before evaluating, and the resume evaluates again: the log equals an uninterrupted run's."""
    class CtrlCInEval(Callback):
        batches = 0

        def on_eval_batch(self, n):
            self.batches += 1
            if self.batches == 1:
                os.kill(os.getpid(), signal.SIGINT)

    over = overrides(small_synthetic, epochs=2)
    over["eval"]["every"] = 1
    ref = fit(load_recipe("quickstart", over), tmp_path / "ref")
    run, stopper = tmp_path / "r", CtrlCInEval()
    with pytest.raises(TrainingError) as e:
        fit(load_recipe("quickstart", over), run, callbacks=[stopper])
    assert e.value.exit_code == 130 and "interrupted by SIGINT at step 3" in str(e.value) and stopper.batches == 1
    saved = read_checkpoint(run / "checkpoints" / "last.pt")["train_state"]
    assert (saved["step"], saved["epoch"]) == (3, 0) and [r["step"] for r in records(run)] == [1, 2]
    summary = fit(load_recipe("quickstart", over), run, resume=True)
    assert [comparable(r) for r in records(run)] == [comparable(r) for r in records(tmp_path / "ref")]
    assert summary["final_top1"] == ref["final_top1"]


# ---- SIGKILL during a checkpoint write ------------------------------------------------------------


def test_sigkill_during_checkpoint_write_keeps_previous(small_synthetic, tmp_path):
    run_dir = tmp_path / "r"
    over = overrides(small_synthetic, checkpoint_every=1)  # saves after steps 1, 2, 3 (epoch end)
    script = f"""
import io, os, signal
from pathlib import Path
import ufgir_cli.io as uio
import ufgir_cli.model.checkpoint as ck
from ufgir_cli.engine.train import fit
from ufgir_cli.recipe import load_recipe

calls = 0
def torn_save(path, writer):
    global calls
    calls += 1
    if calls < 3:
        return uio.atomic_save(path, writer)
    buf = io.BytesIO()
    writer(buf)
    with uio.atomic_open(path, "wb") as f:  # the real temp file, half written, then the kill
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

ck.atomic_save = torn_save
fit(load_recipe("quickstart", {over!r}), Path({str(run_dir)!r}))
"""
    res = run_script(script)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    ckpts = run_dir / "checkpoints"
    assert read_checkpoint(ckpts / "last.pt")["train_state"]["step"] == 2  # the previous one, whole
    stale = list(ckpts.glob(".last.pt.*.tmp"))
    assert len(stale) == 1 and 0 < stale[0].stat().st_size < (ckpts / "last.pt").stat().st_size
    summary = fit(load_recipe("quickstart", over), run_dir, resume=True)
    assert summary["steps"] == 3 and read_checkpoint(ckpts / "last.pt")["train_state"]["epoch"] == 1
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.pt"]  # the stale temp file is gone


# ---- --resume from the CLI: refusals, one line each, nothing written -----------------------------


@pytest.fixture(scope="module")
def finished(small_synthetic, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("fin") / "r"
    with torch_threads(1):
        fit(load_recipe("quickstart", overrides(small_synthetic)), run)
    return run


def _one_line_error(res, code: int = 2) -> str:
    assert res.exit_code == code, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    return lines[0]


def test_resume_refusals_are_one_line(finished, tmp_path):
    import shutil

    empty = tmp_path / "empty"
    empty.mkdir()
    assert "not a run folder (no recipe.toml)" in _one_line_error(runner.invoke(app, ["train", "--resume", str(empty)]))
    assert "no such run folder" in _one_line_error(runner.invoke(app, ["train", "--resume", str(tmp_path / "nope")]))

    no_ckpt = tmp_path / "no_ckpt"
    no_ckpt.mkdir()
    shutil.copy(finished / "recipe.toml", no_ckpt / "recipe.toml")
    msg = _one_line_error(runner.invoke(app, ["train", "--resume", str(no_ckpt)]))
    assert "has no checkpoints/last.pt to resume" in msg and "--overwrite" in msg
    assert sorted(p.name for p in no_ckpt.iterdir()) == ["recipe.toml"]  # nothing written

    msg = _one_line_error(runner.invoke(app, ["train", "--resume", str(finished)]))
    assert "already finished its 1 epochs" in msg and "ufgir eval" in msg

    msg = _one_line_error(runner.invoke(app, ["train", "--resume", str(finished), "--set", "optim.lr=0.1"]))
    assert "drop --set" in msg and "only --set train.epochs=N may extend it" in msg
    msg = _one_line_error(runner.invoke(app, ["train", "--resume", str(finished), "--set", "train.epochs=0"]))
    assert "train.epochs=0" in msg


@pytest.mark.parametrize("quiet", [True, False])
def test_resume_may_train_longer_over_the_new_total(finished, tmp_path, quiet):
    """--resume --set train.epochs=N: the steps from the checkpoint on follow the schedule over the new
    total (recorded, with the note that it is not a longer run from the start); both output modes say
    where it resumes."""
    import shutil

    from ufgir_cli.engine.optim import lr_at
    from ufgir_cli.recipe import load_saved_recipe

    run = tmp_path / "longer"
    shutil.copytree(finished, run)
    start = read_checkpoint(run / "checkpoints" / "last.pt")["train_state"]["step"]
    res = runner.invoke(app, ["train", "--resume", str(run), "--set", "train.epochs=3", *(["--quiet"] if quiet else [])])
    assert res.exit_code == 0, res.output
    assert f"resuming from step {start} (epoch 2 of 3)" in res.output
    assert "train.epochs raised from 1 to 3" in res.output
    recipe = load_saved_recipe(run / "recipe.toml")
    assert recipe.train.epochs == 3
    (ext,) = json.loads((run / "provenance.json").read_text())["schedule_extensions"]
    total = 3 * start
    assert ext["at_step"] == start and (ext["epochs_before"], ext["epochs_after"]) == (1, 3)
    assert ext["total_steps_after"] == total and "not equal to one that was 3 epochs long" in ext["note"]
    logged = records(run)
    assert [r["step"] for r in logged] == list(range(1, total + 1))
    for r in logged[start:]:  # after the checkpoint: the schedule over the new total
        assert r["train/lr"] == pytest.approx(lr_at(r["step"] - 1, total, recipe.optim.lr, recipe.schedule))
    assert read_checkpoint(run / "checkpoints" / "last.pt")["train_state"]["epoch"] == 3
    msg = _one_line_error(runner.invoke(app, ["train", "--resume", str(run), "--set", "train.epochs=2"]))
    assert "fewer than the run's 3" in msg


def test_resume_refuses_a_checkpoint_of_another_model(finished, tmp_path):
    import shutil

    run = tmp_path / "edited"
    shutil.copytree(finished, run)
    text = (run / "recipe.toml").read_text().replace("epochs = 1", "epochs = 3")
    (run / "recipe.toml").write_text(text.replace('method = "ila_pp"', 'method = "adapter"').replace(
        "ila_ds_locs = [1, 3]", "ila_ds_locs = []"))
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    msg = _one_line_error(runner.invoke(app, ["train", "--resume", str(run)]))
    assert "was trained as ila_pp" in msg and "asks for adapter" in msg
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before


# ---- bad numbers -------------------------------------------------------------------------------


def patch_model(monkeypatch, on_build) -> dict:
    """Call ``on_build(model)`` on the model the loop builds; returns a dict holding it."""
    import ufgir_cli.engine.train as train_mod

    real, seen = train_mod.build_model, {}

    def build(cfg, num_classes):
        seen["model"] = real(cfg, num_classes)
        on_build(seen["model"])
        return seen["model"]

    monkeypatch.setattr(train_mod, "build_model", build)
    return seen


def nan_loss_at(step: int):
    """The step-th training forward (the training entry point, ``model(x, target, criterion)``)
    returns a NaN loss."""
    def on_build(model):
        calls = [0]

        def hook(module, args, out):
            if module.training:
                calls[0] += 1
                return out._replace(loss=out.loss * float("nan")) if calls[0] == step else out
            return out

        model.register_forward_hook(hook)
    return on_build


def inf_grad_at(step: int):
    """The step-th backward gives the first trainable tensor an infinite gradient (finite loss)."""
    def on_build(model):
        calls = [0]

        def hook(grad):
            calls[0] += 1
            return grad * float("inf") if calls[0] == step else grad

        next(p for p in model.parameters() if p.requires_grad).register_hook(hook)
    return on_build


def test_nonfinite_loss_stops_with_step_lr_and_hint_and_keeps_checkpoint(small_synthetic, tmp_path, monkeypatch):
    patch_model(monkeypatch, nan_loss_at(3))
    run = tmp_path / "r"
    with pytest.raises(TrainingError) as e:
        fit(load_recipe("quickstart", overrides(small_synthetic, checkpoint_every=1, epochs=2)), run)
    msg = str(e.value)
    assert "loss is nan at step 3 (epoch 1, lr " in msg and "\n" not in msg, msg
    assert f"{run / 'checkpoints' / 'last.pt'} holds the last good weights" in msg and "lower optim.lr" in msg
    assert e.value.exit_code == 1
    ck = read_checkpoint(run / "checkpoints" / "last.pt")
    assert ck["train_state"]["step"] == 2
    assert all(t.isfinite().all() for t in ck["state_dict"].values() if t.is_floating_point())


def test_nonfinite_gradient_stops_through_the_cli(small_synthetic, tmp_path, monkeypatch):
    patch_model(monkeypatch, inf_grad_at(2))
    sets = ["model.weights='none'", f"data.root='{small_synthetic}'", "data.num_workers=0", "train.precision='fp32'",
            "train.checkpoint_every=1", "train.batch_size=8"]
    res = runner.invoke(app, ["train", "-r", "quickstart", "--quiet", "--out", str(tmp_path), "--name", "r",
                              *[a for s in sets for a in ("--set", s)]])
    assert res.exit_code == 1, res.output
    err = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "gradient norm is " in err[0] and "at step 2 (epoch 1, lr" in err[0], res.output
    assert read_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt")["train_state"]["step"] == 1


def test_nonfinite_weights_are_never_saved(small_synthetic, tmp_path, monkeypatch):
    seen = patch_model(monkeypatch, lambda model: None)

    class Poison(Callback):
        def on_step(self, step, logs):
            if step == 2:
                with torch.no_grad():
                    next(p for p in seen["model"].parameters() if p.requires_grad).fill_(float("nan"))

    run = tmp_path / "r"
    with pytest.raises(TrainingError, match=r"weights turned non-finite .* by step 2; not saved"):
        fit(load_recipe("quickstart", overrides(small_synthetic, checkpoint_every=1)), run, callbacks=[Poison()])
    assert read_checkpoint(run / "checkpoints" / "last.pt")["train_state"]["step"] == 1


def test_apply_update_counts_scaler_skips_on_cpu():
    """The fp16 skip logic with a real GradScaler (its CPU build): a step whose gradients hold inf
    is skipped (weights unchanged, scale halved) and reported; a finite one is applied."""
    lin = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x = torch.randn(3, 4)

    scaler.scale(lin(x).sum()).backward()
    lin.weight.grad[0, 0] = float("inf")
    scaler.unscale_(opt)
    w = lin.weight.detach().clone()
    assert apply_update(opt, scaler) is True
    assert torch.equal(lin.weight, w) and scaler.get_scale() == 2.0**9 and lin.weight.grad is None

    scaler.scale(lin(x).sum()).backward()
    scaler.unscale_(opt)
    assert apply_update(opt, scaler) is False and not torch.equal(lin.weight, w)

    lin(x).sum().backward()
    assert apply_update(opt, torch.amp.GradScaler("cpu", enabled=False)) is False


@pytest.mark.parametrize("skip", [True, False])
def test_fp16_loss_scaling_skip_nonfinite_in_the_loop(small_synthetic, tmp_path, monkeypatch, skip):
    """The loop with loss scaling on. CUDA fp16 is not available here, so a CPU GradScaler stands in
    (fp32 maths): with train.skip_nonfinite the poisoned step is skipped, counted and saved in the
    summary and checkpoint; without it training stops with the fp16 hint."""
    import ufgir_cli.engine.train as train_mod

    monkeypatch.setattr(train_mod, "grad_scaler", lambda rt: torch.amp.GradScaler("cpu", init_scale=256.0))
    seen = patch_model(monkeypatch, inf_grad_at(2))
    weights = {}

    class Snapshot(Callback):
        def on_step(self, step, logs):
            weights[step] = next(p for p in seen["model"].parameters() if p.requires_grad).detach().clone()

    r = load_recipe("quickstart", overrides(small_synthetic, skip_nonfinite=skip))
    if not skip:
        with pytest.raises(TrainingError, match=r"gradient norm is (inf|nan) at step 2 .*train\.skip_nonfinite=true"):
            fit(r, tmp_path / "r", callbacks=[Snapshot()])
        return
    summary = fit(r, tmp_path / "r", callbacks=[Snapshot()])
    assert summary["nonfinite_skipped"] == 1 and summary["steps"] == 3
    assert torch.equal(weights[1], weights[2]) and not torch.equal(weights[2], weights[3])  # step 2 skipped
    assert read_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt")["train_state"]["nonfinite_skipped"] == 1
    assert records(tmp_path / "r")[1]["train/grad_norm"] is None  # inf is logged as null
