"""torchrun + DistributedDataParallel on CPU (gloo): same weights as one process, exact sharded eval,
and a dead rank ends the job instead of hanging it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ufgir_cli.model.checkpoint import load_run

pytestmark = pytest.mark.slow

DRIVER = textwrap.dedent(
    """
    import json, os, signal, sys
    from pathlib import Path
    from ufgir_cli.engine.callbacks import Callback
    from ufgir_cli.engine.train import fit
    from ufgir_cli.recipe import load_recipe

    cfg = json.loads(sys.argv[1])
    run_dir = Path(sys.argv[2])
    die_at, stop_at, resume = int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "resume"

    class Die(Callback):
        def on_step(self, step, logs):
            if step == die_at and os.environ.get("RANK") == "1":
                os._exit(3)
            if step == stop_at:  # what a scheduler's SIGTERM does, on every rank
                os.kill(os.getpid(), signal.SIGTERM)

    fit(load_recipe("quickstart", cfg), run_dir, callbacks=[Die()], resume=resume)
    """
)


def _cfg(root: Path, batch: int, method: str = "adapter", epochs: int = 2) -> dict:
    return {
        "data": {"root": str(root), "num_workers": 0},
        "model": {"weights": "none", "method": method, "drop": 0.0, **({"ila_ds_locs": [1, 3]} if "ila" in method else {"ila_ds_locs": []})},
        "train": {"epochs": epochs, "batch_size": batch, "precision": "fp32", "compile": False, "seed": 3},
        "eval": {"every": 1},
        "optim": {"lr": 0.05},
        "schedule": {"warmup_steps": 2},
        "logging": {"tensorboard": False},
    }


def _run(tmp: Path, cfg: dict, run_dir: Path, nproc: int, die_at: int = -1, timeout: float = 240,
         stop_at: int = -1, resume: bool = False):
    script = tmp / "driver.py"
    script.write_text(DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "UFGIR_DIST_TIMEOUT": "30", "HF_HUB_OFFLINE": "1"}
    args = [json.dumps(cfg), str(run_dir), str(die_at), str(stop_at), "resume" if resume else "new"]
    if nproc == 1:
        cmd = [sys.executable, str(script), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-port", str(29500 + os.getpid() % 1000), str(script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def test_two_ranks_match_one_process(small_synthetic, tmp_path):
    single = _run(tmp_path, _cfg(small_synthetic, batch=8), tmp_path / "one", 1)
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = _run(tmp_path, _cfg(small_synthetic, batch=4), tmp_path / "two", 2)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    m1, _ = load_run(tmp_path / "one")
    m2, _ = load_run(tmp_path / "two")
    names = [n for n, p in m1.named_parameters() if p.requires_grad]
    assert names
    sd1, sd2 = m1.state_dict(), m2.state_dict()
    worst = max((sd1[n] - sd2[n]).abs().max().item() for n in names)
    assert worst <= 1e-5, worst
    # sharded evaluation over unpadded shards reports exactly the single-process numbers
    r1 = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    r2 = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in r1] == [r["step"] for r in r2]
    from ufgir_cli.engine.report import eval_run

    metrics, _, _ = eval_run(tmp_path / "two", num_workers=0)
    assert metrics["top1"] == r2[-1]["test/top1"]


def test_ila_under_gloo_stays_finite(small_synthetic, tmp_path):
    res = _run(tmp_path, _cfg(small_synthetic, batch=4, method="ila_pp", epochs=1), tmp_path / "ila", 2)
    assert res.returncode == 0, res.stderr[-2000:]
    m, _ = load_run(tmp_path / "ila")
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_dead_rank_fails_the_job(small_synthetic, tmp_path):
    """Rank 1 exits with code 3 at step 2: torchrun ends the job and names that rank and its code
    (an import error or a crash elsewhere would name another code)."""
    res = _run(tmp_path, _cfg(small_synthetic, batch=4, epochs=3), tmp_path / "dead", 2, die_at=2, timeout=180)
    assert res.returncode != 0
    assert re.search(r"rank\s*:\s*1\b", res.stderr) and re.search(r"exitcode\s*:\s*3\b", res.stderr), res.stderr[-2000:]


def test_two_rank_resume_is_bit_exact_with_dropout(small_synthetic, tmp_path):
    """Each rank's dropout stream is checkpointed, so a stopped and resumed 2-rank run with dropout
    on ends with the same weights as one that ran straight through."""
    cfg = _cfg(small_synthetic, batch=4, epochs=2)
    cfg["model"]["drop"] = 0.1
    cfg["eval"]["every"] = 0
    straight = _run(tmp_path, cfg, tmp_path / "straight", 2)
    assert straight.returncode == 0, straight.stderr[-2000:]
    stopped = _run(tmp_path, cfg, tmp_path / "stopped", 2, stop_at=3)
    assert stopped.returncode != 0 and "Resume with" in stopped.stderr, stopped.stderr[-2000:]
    ckpt = torch.load(tmp_path / "stopped" / "checkpoints" / "last.pt", weights_only=True)
    ts = ckpt["train_state"]
    assert ts["step"] == 3 and len(ts["rng_ranks"]) == 2
    assert not torch.equal(ts["rng_ranks"][0]["torch"], ts["rng_ranks"][1]["torch"])  # distinct streams
    resumed = _run(tmp_path, cfg, tmp_path / "stopped", 2, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "stopped" / "checkpoints" / "last.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for name, t in a.items():
        assert torch.equal(t, b[name]), name
