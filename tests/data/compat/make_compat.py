"""Write the compatibility test data in this folder (issue 25, item 6: nothing that exists breaks).

Run once by the release that wrote these files; kept to show how they were made, not to be run
again (files written by a later release would prove nothing about today's). For each method in
METHODS a tiny run is trained through the real training entry point (``engine.train.fit``) and
exported through the real ``ufgir export`` command, so every file has exactly the format a user's
run has:

    <method>/recipe.toml, <method>/checkpoints/last.pt   the run folder as ``ufgir train`` leaves it
                                                         (only these two files are kept)
    <method>/adapter.safetensors                         ``ufgir export RUN --adapter-only``
    full_ila_pp/model.safetensors                        ``ufgir export RUN`` (the whole model)
    expected.pt                                          the fixed input (float16) and each file's logits

The runs' backbone is the package's micro ViT with its shipped weights (``model.weights = "timm"``),
so checkpoints and deltas hold only the trained tensors and re-attach to it bit-exactly. The full
export is of a random one-block micro ViT (``weights = "none"``), so that a whole model stays small.
The logits are those of the model each artefact loads into through the public loaders, in eval
mode, on ``INPUT_SEED``'s input; ``tests/test_compat.py`` checks that they still come out.

    HF_HUB_OFFLINE=1 python tests/data/compat/make_compat.py [OUT]
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from typer.testing import CliRunner

HERE = Path(__file__).resolve().parent
#: method -> its model keys beyond the shared ones: the representative set whose state-dict keys differ.
METHODS: dict[str, dict] = {
    "ila_pp": {"ila_ds_locs": [1, 3]},  # adapters in every block + down-sampling ILAs after blocks 1 and 3
    "vpt_deep": {"prompt_len": 4},  # per-block prompts
    "vqt": {"prompt_len": 4},  # query-only prompts and their head
    "transfg": {},  # the aggregator block after token selection
    "glsim": {},  # anchor CLS token + aggregator with its own norm
    "cal": {"cal_maps": 8},  # its head, BatchNorm and the feature_center buffer
    "mpncov": {"cov_dim": 16},  # covariance head, backbone without CLS token
    "linear": {},  # head and CLS token only
}
#: The full export is of a run of its own, on a random one-block backbone (``weights = "none"``): a whole
#: model is kept, so it has to be small. Its run is not kept (its checkpoint would be a whole model too).
FULL_EXPORT = ("ila_pp", {"weights": "none", "depth": 1, "ila_ds_locs": [0]})
INPUT_SEED, BATCH, SIZE, CLASSES = 0, 2, 64, 4


def recipe_for(method: str, **model_keys):
    from ufgir_cli.recipe import load_recipe

    model = {"backbone": "ufgir_vit_micro_patch8_64", "weights": "timm", "image_size": SIZE, "method": method,
             "layer_norm_eps": 1e-6, "drop": 0.0, "mean": [0.5] * 3, "std": [0.5] * 3, **model_keys}
    return load_recipe(None, {
        "description": f"compatibility test data: {method}",
        "data": {"dataset": "synthetic", "num_workers": 0},
        "model": model,
        # Momentum 0: the optimiser keeps no per-tensor state, which would double the checkpoints' size.
        "optim": {"lr": 0.1, "momentum": 0.0, "nesterov": False},
        "schedule": {"name": "constant", "warmup_steps": 0},  # 3 full-size steps: the tensors move away from init
        "train": {"epochs": 1, "batch_size": 8, "precision": "fp32", "device": "cpu", "threads": 1},
        "eval": {"every": 0},
        "logging": {"tensorboard": False},
    }, env=False)


@torch.no_grad()
def logits_of(source: Path, x: torch.Tensor) -> torch.Tensor:
    import ufgir_cli

    model, _ = ufgir_cli.load_run(str(source))
    return model.eval()(x)


def export(run: Path, out: Path, *args: str) -> None:
    from ufgir_cli.cli import app

    r = CliRunner().invoke(app, ["export", str(run), "--out", str(out), *args])
    if r.exit_code != 0:
        raise SystemExit(f"ufgir export {run} {' '.join(args)} failed:\n{r.output}")


@torch.no_grad()
def check_moved(name: str, recipe, found: torch.Tensor, x: torch.Tensor) -> None:
    """The trained tensors must matter, or a test of their loading would prove nothing."""
    from ufgir_cli.model import build_model

    torch.manual_seed(0)
    moved = (build_model(recipe.model, CLASSES).eval()(x) - found).abs().max().item()
    if moved < 1e-3:
        raise SystemExit(f"{name}: training moved the logits by only {moved:.2g}; train longer")
    print(f"{name:12s} logits {tuple(found.shape)}, moved {moved:.3g} by training")


def make_run(method: str, work: Path, out: Path, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Train; keep the run's recipe and checkpoint and its adapter-only export; their logits."""
    from ufgir_cli.engine.train import fit

    run, dest = work / "runs" / method, out / method
    recipe = recipe_for(method, **METHODS[method])
    fit(recipe, run)
    shutil.rmtree(dest, ignore_errors=True)
    (dest / "checkpoints").mkdir(parents=True)
    shutil.copyfile(run / "recipe.toml", dest / "recipe.toml")
    shutil.copyfile(run / "checkpoints" / "last.pt", dest / "checkpoints" / "last.pt")
    export(run, work / "export" / method / "adapter.safetensors", "--adapter-only")
    shutil.copyfile(work / "export" / method / "adapter.safetensors", dest / "adapter.safetensors")
    found = {"checkpoint": logits_of(dest, x), "delta": logits_of(dest / "adapter.safetensors", x)}
    if not torch.equal(found["delta"], found["checkpoint"]):
        raise SystemExit(f"{method}: the adapter delta gives other logits than the checkpoint")
    check_moved(method, recipe, found["checkpoint"], x)
    return {f"{method}/{k}": v for k, v in found.items()}


def make_full_export(work: Path, out: Path, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Train FULL_EXPORT's run and keep only ``ufgir export RUN`` (safetensors, the whole model)."""
    from ufgir_cli.engine.train import fit

    method, keys = FULL_EXPORT
    run, dest = work / "runs" / f"full_{method}", out / f"full_{method}"
    recipe = recipe_for(method, **keys)
    fit(recipe, run)
    export(run, work / "export" / run.name / "model.safetensors")
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    shutil.copyfile(work / "export" / run.name / "model.safetensors", dest / "model.safetensors")
    found = logits_of(dest / "model.safetensors", x)
    if not torch.equal(found, logits_of(run, x)):
        raise SystemExit(f"full_{method}: the export gives other logits than its run")
    check_moved(run.name, recipe, found, x)
    return {f"full_{method}/safetensors": found}


def main(out: Path = HERE) -> None:
    from ufgir_cli.data.synthetic import generate_synthetic
    from ufgir_cli.io import atomic_save

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ["UFGIR_DATA_DIR"] = str(work / "data")
        generate_synthetic(work / "data" / "synthetic", num_classes=CLASSES, train_val=6, test=4, size=SIZE)
        # Stored as float16 (half the bytes); every float16 value is exact in float32, the models' input.
        x16 = torch.randn(BATCH, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(INPUT_SEED)).half()
        x = x16.float()
        expected = {"input": x16}
        for method in METHODS:
            expected |= make_run(method, work, out, x)
        expected |= make_full_export(work, out, x)
        atomic_save(out / "expected.pt", lambda f: torch.save(expected, f))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
