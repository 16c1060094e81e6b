"""`ufgir predict`: top-k classes for image files with a run's eval preprocessing.

One :class:`Predictor` serves every source (run folder, checkpoint, safetensors, ONNX, pt2): each
becomes ``normalised (B, 3, S, S) -> (B, C) logits`` plus what preprocessing and class names need.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.datasets import load_image, normalize, preprocess_for
from ..data.folder import natural_key, read_classes
from ..errors import CheckpointError, DatasetError
from ..model.checkpoint import LoadedModel, load_model
from ..paths import HubRef, dataset_dir
from ..recipe import Recipe, recipe_from_dict
from .graph import load_pt2, read_sidecar, require

IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})


@dataclass
class Predictor:
    """Anything ufgir predicts with: normalised float (B, 3, S, S) -> (B, C) logits, plus what
    preprocessing and class names need. ``batch_size`` is set for static-batch exports, which
    take exactly that many images per call (batches are then cut to that size)."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    recipe: Recipe
    num_classes: int
    data_config: dict  # the model's data_config(): input size and normalisation (an export's copy of it)
    batch_size: int | None = None
    names: list[str] | None = None  # class names that came with the model (a Hub repo's)

    def class_names(self) -> tuple[list[str], str | None]:
        """The class names and where they came from: the model's own, else `class_names`."""
        if self.names is not None and len(self.names) == self.num_classes:
            return self.names, "the model's repo"
        names, source = class_names(self.recipe, self.num_classes)
        return names, str(source) if source else None


@dataclass(frozen=True)
class Prediction:
    path: Path
    top: list[tuple[int, str, float]]  # (class id, name, probability), best first



def load_predictor(source: str | os.PathLike) -> Predictor:
    """A CPU predictor for a run folder, checkpoint, safetensors, ONNX or pt2 export, or ``hf://OWNER/NAME``."""
    if HubRef.parse(source) is None and Path(source).suffix in (".onnx", ".pt2"):
        source = Path(source)
        if not source.is_file():
            raise CheckpointError(f"export {source} does not exist")
        meta = read_sidecar(source)
        recipe = recipe_from_dict(meta["recipe"])
        if source.suffix == ".onnx":
            require(("onnxruntime",), "predicting with an ONNX export")
            import onnxruntime as ort

            try:
                session = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
            except Exception as e:  # onnxruntime raises its own types (InvalidProtobuf, Fail, ...) for a bad file
                why = " ".join(str(e).split())[:200] or type(e).__name__
                raise CheckpointError(f"{source} is not a readable ONNX model ({why}); it is truncated or damaged: "
                                      "export it again with `ufgir export RUN --format onnx`") from None

            def forward(x: torch.Tensor) -> torch.Tensor:
                return torch.from_numpy(session.run([meta["output"]], {meta["input"]: x.numpy()})[0])
        else:
            forward = load_pt2(source)
        return Predictor(forward, recipe, int(meta["num_classes"]), {"mean": meta["mean"], "std": meta["std"]},
                         meta.get("batch_size"))
    return predictor_of(load_model(source))


def predictor_of(loaded: LoadedModel) -> Predictor:
    """The predictor of a model the one loader loaded (`ufgir serve` keeps the model for its maps too)."""
    return Predictor(loaded.model, loaded.recipe, loaded.model.num_classes, loaded.model.data_config(),
                     names=loaded.class_names)


def class_names(recipe: Recipe, num_classes: int) -> tuple[list[str], Path | None]:
    """Names from the dataset's classes.csv when that folder is here (nothing is downloaded or
    generated); class ids otherwise. Returns the names and the file they came from."""
    root = dataset_dir(recipe.data.dataset, recipe.data.root)
    if (root / "classes.csv").is_file():
        names = read_classes(root)
        if len(names) == num_classes:
            return names, root / "classes.csv"
    return [str(i) for i in range(num_classes)], None


def collect_images(inputs: Iterable[str | os.PathLike], on_skip: Callable[[Path, str], None]) -> list[Path]:
    """Files as given, folders searched recursively for image extensions (natural order)."""
    out: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted((p for p in item.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file()
                            and not p.name.startswith(".")), key=lambda p: natural_key(str(p.relative_to(item))))
            if not found:
                on_skip(item, f"no {'/'.join(sorted(e[1:] for e in IMAGE_EXTS))} files in this folder")
            out += found
        elif item.is_file():
            out.append(item)
        else:
            on_skip(item, "no such file or folder")
    return out


@torch.inference_mode()
def predict_images(predictor: Predictor, images: list[Path], *, topk: int = 5, batch_size: int | None = None,
                   on_skip: Callable[[Path, str], None]) -> list[Prediction]:
    """Top-k classes per image with the run's eval preprocessing (square resize to
    int(ratio * S), centre crop S, normalise); unreadable files go to ``on_skip``, not fatal.
    ``batch_size`` defaults to the recipe's evaluation batch size."""
    r = predictor.recipe
    tf = preprocess_for(r, train=False)
    names, _ = predictor.class_names()
    k = max(1, min(topk, predictor.num_classes))
    step = predictor.batch_size or batch_size or r.eval.batch_size or r.train.batch_size
    out: list[Prediction] = []
    for start in range(0, len(images), step):
        kept, batch = [], []
        for p in images[start : start + step]:
            try:
                batch.append(tf(load_image(str(p)), None))
                kept.append(p)
            except DatasetError:
                on_skip(p, "not a readable image")
        if not batch:
            continue
        x = normalize(torch.stack(batch), predictor.data_config)        # (B, 3, S, S) float
        probs = predictor.forward(x).float().softmax(-1)                      # (B, C)
        p, idx = probs.topk(k, dim=-1)
        for path, pp, ii in zip(kept, p.tolist(), idx.tolist(), strict=True):
            out.append(Prediction(path, [(c, names[c], q) for c, q in zip(ii, pp, strict=True)]))
    return out

