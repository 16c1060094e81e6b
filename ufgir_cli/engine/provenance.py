"""provenance.json: where a run folder came from, so a result can be traced and reproduced.

One schema for every run folder. Always: the software versions, the git commit, the hardware and
the backbone (name, weights, sha256 of its tensors). A trained run adds ``dataset`` (its folder,
the sha256 of its split files, the images skipped as unreadable); an imported one adds
``imported_from`` (the reference checkpoint's path and sha256, and when it was imported).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..cores import available_cores
from ..data.folder import SplitFile, read_info
from ..io import atomic_write_json, file_sha256
from ..paths import RunDir
from ..recipe import Recipe

SPLIT_FILES = ("train", "val", "train_val", "test")


def _git_commit() -> str | None:
    """The commit of the ufgir checkout this runs from; None for an installed wheel."""
    with contextlib.suppress(Exception):
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5).stdout.strip() or None
    return None


def provenance(recipe: Recipe, backbone_sha256: str, *, device: str | None = None, precision: str | None = None,
               threads: int | None = None, split: SplitFile | None = None, skipped: Sequence[str] = (),
               imported_from: Path | None = None,
               import_format: str = "reference implementation (fgir_vit) checkpoint") -> dict[str, Any]:
    """The provenance record; ``split`` adds the ``dataset`` section, ``imported_from`` (the file whose
    tensors were imported, ``import_format`` says what it is) its own.

    ``device``, ``precision`` and ``threads`` (torch's intra-op threads) are what training ran with;
    an import computes nothing, so they are None there.
    """
    import timm
    import torchvision

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    record: dict[str, Any] = {
        "ufgir": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "torchvision": torchvision.__version__, "timm": timm.__version__, "git_commit": _git_commit(),
        "hardware": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                     "cpu_count": os.cpu_count(), "cpus_available": available_cores(), "gpus": gpus,
                     "device": device, "precision": precision, "threads": threads,
                     # what a scheduler gave the run: its GPUs as this process sees them, and its job
                     "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                     "slurm_job_id": os.environ.get("SLURM_JOB_ID")},
        "backbone": {"name": recipe.model.backbone, "weights": recipe.model.weights, "sha256": backbone_sha256},
    }
    if split is not None:
        h = hashlib.sha256()
        for name in SPLIT_FILES:
            p = split.root / "splits" / f"{name}.csv"
            if p.is_file():
                h.update(p.read_bytes())
        record["dataset"] = {"name": recipe.data.dataset, "root": str(split.root), "splits_sha256": h.hexdigest(),
                             "archive_sha256": read_info(split.root).get("archive_sha256"),
                             "skipped_images": list(skipped)}
    if imported_from is not None:
        record["imported_from"] = {"path": str(imported_from.resolve()), "sha256": file_sha256(imported_from),
                                   "format": import_format,
                                   "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return record


def write_provenance(run_dir: Path, recipe: Recipe, backbone_sha256: str, **sections: Any) -> None:
    """Write ``run_dir/provenance.json`` atomically; ``sections`` as for :func:`provenance`."""
    atomic_write_json(RunDir(run_dir).provenance_file, provenance(recipe, backbone_sha256, **sections))
