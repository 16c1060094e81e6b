"""Checkpoints: plain tensors and Python values only, loadable with ``weights_only=True``.

A PETL checkpoint stores just the trainable tensors and the method's buffers when the backbone can
be re-created bit-exactly from ``model.weights``; the backbone's identity (timm name + sha256 over
its tensors) is stored and checked on load, so adapters are never attached to the wrong backbone.
With ``weights = "none"`` (random init) the full state_dict is stored.
"""

from __future__ import annotations

import errno
import io
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, OptionError, did_you_mean
from ..io import atomic_save
from ..paths import CHECKPOINTS, HubRef, RunDir
from ..recipe import Recipe, load_saved_recipe, recipe_from_dict
from .build import build_model
from .delta import load_delta, read_safetensors_metadata
from .hub import PulledRun, pull_run
from .state import load_strict
from .vit import UfgirViT

FORMAT = "ufgir-checkpoint"
VERSION = 1


def checkpoint_payload(model: UfgirViT, recipe: Recipe, train_state: dict | None = None,
                       metrics: dict | None = None, backbone_sha256: str | None = None) -> dict[str, Any]:
    full = recipe.model.weights == "none" or model.plan.train_backbone
    return {
        "format": FORMAT,
        "version": VERSION,
        "recipe": recipe.model_dump(mode="json"),
        "method": recipe.model.method,
        "num_classes": model.num_classes,
        "backbone": {"name": recipe.model.backbone, "weights": recipe.model.weights,
                     "sha256": backbone_sha256 or model.backbone_sha256()},
        "full": full,
        "state_dict": {k: v.detach().cpu() for k, v in (model.state_dict() if full else model.trainable_state_dict()).items()},
        "train_state": train_state,
        "metrics": metrics or {},
    }


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Serialise to memory first, then write atomically (temp + fsync + rename): a crash at any
    moment leaves either the previous checkpoint or the new one, never a torn file. A failed write
    (disk full, quota, read-only folder) is a one-line CheckpointError; the previous file stays."""
    path = Path(path)
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getbuffer()
    try:
        atomic_save(path, lambda f: f.write(data))
    except OSError as e:
        kept = f"the previous {path.name} is intact" if path.is_file() else "nothing was written"
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CheckpointError(
                f"disk full: cannot write checkpoint {path} ({len(data) / 2**20:.1f} MiB); {kept}. Free space on that disk"
            ) from None
        raise CheckpointError(f"cannot write checkpoint {path} ({e.strerror or e}); {kept}") from None


#: What a checkpoint may hold, checked after ``torch.load(weights_only=True)``: the allow-list
#: does not depend on what other code registered with ``torch.serialization.add_safe_globals``.
PLAIN_TYPES = (torch.Tensor, dict, list, tuple, str, int, float, bool, type(None))


def _foreign_type(obj: Any) -> str | None:
    """The first type in ``obj`` outside PLAIN_TYPES, or None."""
    stack = [obj]
    while stack:
        o = stack.pop()
        if not isinstance(o, PLAIN_TYPES):
            return f"{type(o).__module__}.{type(o).__qualname__}"
        if isinstance(o, dict):
            stack += list(o.keys()) + list(o.values())
        elif isinstance(o, list | tuple):
            stack += list(o)
    return None


_ZIP_MAGIC = b"PK\x03\x04"


def torch_load_failure(path: Path, err: Exception) -> str:
    """Why ``torch.load`` failed, as one whole clause (torch's own text runs on for sentences).

    ``torch.save`` writes a zip archive, whose directory is at its end: a file that starts like one
    but is not a whole archive was cut off, whatever torch happened to stumble on first.
    """
    text = str(err).strip()
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        return "the file is empty"
    if not (head.startswith(_ZIP_MAGIC) or _ZIP_MAGIC.startswith(head)):
        return "it is not a file written by torch.save"
    if not zipfile.is_zipfile(path) or isinstance(err, EOFError) or "Ran out of input" in text:
        return "the file ends early: it was cut off, e.g. by an interrupted copy or download"
    detail = re.search(r"WeightsUnpickler error: (\S.*)", text)
    if detail:
        return detail.group(1).split(". ")[0].rstrip(".")
    first = text.splitlines()[0] if text else type(err).__name__
    return first.split(". ")[0].rstrip(".")


def _other_checkpoints(path: Path) -> str:
    """What to use instead of an unreadable checkpoint: another one of its run, if there is one."""
    if path.parent.name != CHECKPOINTS:
        return "replace it with a complete copy"
    others = sorted(p.stem for p in path.parent.glob("*.pt") if p.resolve() != path.resolve())
    if not others:
        return "the run has no other checkpoint; train it again"
    return f"use the run's {others[0]}.pt instead (--checkpoint {others[0]})"


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a ufgir checkpoint safely: ``weights_only=True`` (pickled code is never run), then only
    tensors and plain Python values are accepted. Every failure is a one-line CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors come in many types
        text = str(e)
        code = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if code:
            raise CheckpointError(
                f"checkpoint {path} carries pickled code ({code.group(1)}); refused without running it: only "
                "tensors and plain values are loaded. Use checkpoints written by ufgir, or weights as safetensors"
            ) from None
        why = torch_load_failure(path, e)
        raise CheckpointError(f"checkpoint {path} cannot be read: {why}; {_other_checkpoints(path)}") from None
    foreign = _foreign_type(ckpt)
    if foreign is not None:
        raise CheckpointError(
            f"checkpoint {path} holds an object of type {foreign}; refused: only tensors and plain values are loaded"
        )
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a ufgir checkpoint; for one written by the reference code use `ufgir import-upstream`"
        )
    missing = [k for k in ("recipe", "method", "num_classes", "backbone", "state_dict") if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}; it was not written by ufgir")
    return ckpt


def check_identity(ckpt: dict[str, Any], recipe: Recipe, source: str) -> None:
    """Refuse a checkpoint of another method, backbone or class count than ``recipe`` asks for."""
    m = recipe.model
    backbone = (ckpt.get("backbone") or {}).get("name")
    if ckpt.get("method") != m.method or backbone != m.backbone:
        raise CheckpointError(
            f"{source} was trained as {ckpt.get('method')} on {backbone}, "
            f"but the recipe asks for {m.method} on {m.backbone}; use the run's own recipe"
        )
    num_classes = int(ckpt["num_classes"])
    if m.num_classes is not None and m.num_classes != num_classes:
        raise CheckpointError(
            f"{source} has {num_classes} classes but the recipe and dataset have {m.num_classes}; "
            "use the dataset it was trained on"
        )


def load_into(model: UfgirViT, ckpt: dict[str, Any], source: str, backbone_sha256: str | None = None) -> None:
    """Load a checkpoint's tensors into ``model`` strictly; a one-line CheckpointError on mismatch.

    An adapter-only checkpoint is loaded only onto the backbone it was trained on (sha256 check).
    """
    full = bool(ckpt.get("full", True))
    if not full:
        want = ckpt["backbone"]["sha256"]
        have = backbone_sha256 or model.backbone_sha256()
        if want != have:
            raise CheckpointError(
                f"{source}: the backbone built from model.weights={model.cfg.weights!r} differs from the one it was "
                f"trained on (sha256 {have[:12]} != {want[:12]}); point model.weights at the original weights"
            )
    expected = None if full else model.trainable_state_dict().keys()
    load_strict(model, ckpt["state_dict"], source, expected=expected)


def model_from_checkpoint(ckpt: dict[str, Any], source: str = "checkpoint", device: str = "cpu",
                          recipe: Recipe | None = None) -> tuple[UfgirViT, Recipe]:
    """Rebuild the model a checkpoint belongs to and load its tensors, strictly."""
    recipe = recipe or recipe_from_dict(ckpt["recipe"])
    check_identity(ckpt, recipe, source)
    cfg = recipe.model
    if ckpt.get("full", True):  # every tensor is in the file: no need to fetch the backbone's weights
        cfg = cfg.model_copy(update={"weights": "none"})
    model = build_model(cfg, int(ckpt["num_classes"]))
    load_into(model, ckpt, source)
    return model.to(device).eval(), recipe


def checkpoint_tag(path: Path) -> str:
    """``best``/``last`` for a run's own checkpoints, the path for any other file (metrics.json field)."""
    return path.stem if RunDir.of(path).is_own_checkpoint(path) and path.stem in ("best", "last") else str(path)


def resolve_checkpoint(path: str | os.PathLike | RunDir, checkpoint: str = "auto") -> Path:
    """A run folder + best/last/auto -> the checkpoint file; a file path is returned as is. Another
    ``checkpoint`` (a file path) names a checkpoint that is not the run's own."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        raise CheckpointError(f"{p} is neither a run folder nor a checkpoint file")
    run = RunDir(p)
    if checkpoint in ("best", "last"):
        f = run.checkpoint(checkpoint)
        if not f.is_file():
            hint = " (best.pt exists only when selecting on eval.split = val)" if checkpoint == "best" else ""
            raise CheckpointError(f"run {p} has no {checkpoint} checkpoint{hint}")
        return f
    if checkpoint != "auto":
        if not Path(checkpoint).exists() and did_you_mean(checkpoint, ("best", "last", "auto")):
            raise CheckpointError(f"--checkpoint {checkpoint!r} is neither best, last, auto nor a checkpoint file"
                                  f"{did_you_mean(checkpoint, ('best', 'last', 'auto'))}")
        return resolve_checkpoint(checkpoint)
    for f in (run.best, run.last):
        if f.is_file():
            return f
    raise CheckpointError(f"run {p} has no checkpoints/last.pt; was training interrupted before the first save?")


@dataclass
class LoadedModel:
    """A model loaded from a run folder, a checkpoint file, a safetensors export or the Hub, with where
    it came from."""

    model: UfgirViT  # in eval mode, on ``device``
    recipe: Recipe
    file: Path  # the checkpoint or safetensors file read (for a Hub model: in the Hub cache)
    run: RunDir  # the run the source belongs to (a loose file's: its folder; a Hub model's: HubRef.run_dir)
    backbone_sha256: str  # the backbone the weights were trained on
    device: str
    hub: PulledRun | None = None  # set for ``hf://`` sources

    @property
    def tag(self) -> str:
        """How ``metrics.json`` names the checkpoint: ``best``, ``last``, the file's path, or
        ``hf://OWNER/NAME@<commit>``."""
        return self.hub.tag if self.hub is not None else checkpoint_tag(self.file)

    @property
    def class_names(self) -> list[str] | None:
        """Class names that came with the model (a Hub repo's); None: the dataset's folder has them."""
        return self.hub.class_names if self.hub is not None else None

    def eval_dir(self, split: str) -> Path:
        """Where an evaluation of this model on ``split`` goes (see `RunDir.eval_dir_for`); a Hub
        model's own ``eval/<split>/`` under its run folder."""
        return self.run.eval_dir(split) if self.hub is not None else self.run.eval_dir_for(split, self.file)


def _load_hub(ref: HubRef, checkpoint: str, device: str) -> LoadedModel:
    if checkpoint != "auto":
        raise OptionError(f"--checkpoint {checkpoint}: {ref} holds one model; --checkpoint picks among a run "
                          "folder's checkpoints (pin a version with @REVISION instead)")
    pulled = pull_run(ref)
    model, recipe = load_delta(pulled.weights, device=device)
    return LoadedModel(model.eval(), recipe, pulled.weights, RunDir(ref.run_dir()), pulled.backbone_sha256, device,
                       hub=pulled)


def load_model(source: str | os.PathLike | RunDir, checkpoint: str = "auto", device: str = "cpu") -> LoadedModel:
    """The one way to load a model: a run folder (``checkpoint`` best/last/auto or a file), a checkpoint
    file, a safetensors export (full or adapter-only), or ``hf://OWNER/NAME[@REVISION]`` (a model that
    `ufgir push` wrote, fetched into the Hub cache and checked against its ``ufgir.json``). ``device``
    may be ``auto``. A checkpoint of a run with its ``recipe.toml`` uses that recipe when it equals the
    checkpoint's own."""
    from .precision import resolve_device

    ref = HubRef.parse(source)
    if ref is not None:
        return _load_hub(ref, checkpoint, resolve_device(device))
    p, device = Path(source), resolve_device(device)
    if p.suffix == ".safetensors":
        sha = read_safetensors_metadata(p)["backbone_sha256"]
        model, recipe = load_delta(p, device=device)
        return LoadedModel(model.eval(), recipe, p, RunDir.of(p), sha, device)
    f = resolve_checkpoint(p, checkpoint)
    ckpt = read_checkpoint(f)
    run, recipe = RunDir.of(f), None
    if run.is_own_checkpoint(f) and run.is_run():
        recipe = load_saved_recipe(run.recipe_file)
        if recipe.model_dump(mode="json") != ckpt["recipe"]:
            recipe = None  # the checkpoint's own recipe is authoritative
    model, recipe = model_from_checkpoint(ckpt, source=str(f), device=device, recipe=recipe)
    return LoadedModel(model, recipe, f, RunDir.of(p), ckpt["backbone"]["sha256"], device)


def load_run(path: str | os.PathLike | RunDir, checkpoint: str = "auto", device: str = "cpu") -> tuple[UfgirViT, Recipe]:
    """(model, recipe) from a run folder, a checkpoint file, a safetensors export or ``hf://OWNER/NAME``."""
    loaded = load_model(path, checkpoint, device)
    return loaded.model, loaded.recipe
