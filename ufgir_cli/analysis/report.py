"""`ufgir metrics`, `ufgir visualize` and `ufgir compare` as library calls, like ``engine/report.py`` is
for `ufgir eval`: load runs and images, measure, and return plain dicts and arrays.

Nothing here draws, prints or writes: the commands hand the results to ``ufgir_cli.viz`` and write them
under ``<run>/analysis/``, so a notebook can call the same functions and plot them its own way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data.catalog import CATALOG
from ..data.datasets import load_image, normalize, preprocess_for
from ..data.folder import read_classes
from ..data.loaders import make_loader, open_split
from ..errors import DatasetError, OptionError
from ..methods import FAMILY_TITLES, all_methods
from ..model import meta_model
from ..model.checkpoint import load_model, read_checkpoint, resolve_checkpoint
from ..model.precision import resolve_precision
from ..paths import RunDir, dataset_dir, run_dir_of
from ..recipe import Recipe, load_saved_recipe, recipe_from_dict
from . import rollout as ro
from .cka import MIN_BATCH
from .cost import cost_summary, measure_inference
from .features import analyse_batches, forward_collect

#: ``progress(description, images done since the last call, images in all)``; a first call with 0 opens the bar.
Progress = Callable[[str, int, int], None]

#: ``make_maps(model, attention) -> [(label, (B, h, w) maps)]``: what `visualize` draws from one forward pass.
MakeMaps = Callable[[nn.Module, list[torch.Tensor]], list[tuple[str, torch.Tensor]]]


def run_label(path: Path, recipe: Recipe) -> str:
    """How tables name a run: its folder and method."""
    return f"{run_dir_of(path).name} ({recipe.model.method})"


# --------------------------------------------------------------------------------------------
# names in figures: what a reader of the paper knows, never a folder name

def method_title(method: str) -> str:
    """A method as the paper names it ("ILA++", "VPT-deep"); unknown names as they are."""
    known = all_methods()
    return known[method].display_name if method in known else method


def method_family(method: str) -> str:
    """ILA, PETL, FGIR, full fine-tuning or other: the colour of a method in the compare plot."""
    known = all_methods()
    return FAMILY_TITLES.get(known[method].family, "other") if method in known else "other"


def dataset_title(dataset: str) -> str:
    """A dataset as the benchmark names it ("SoyAgeing", "Cotton80"), without the catalog's notes."""
    spec = CATALOG.get(dataset)
    if spec is None:
        return dataset
    return "Synthetic leaves" if dataset == "synthetic" else spec.title.split(" (")[0]


def run_title(recipe: Recipe) -> str:
    """How a figure names a run: method and dataset, e.g. "ILA++ · SoyAgeing"."""
    return f"{method_title(recipe.model.method)} · {dataset_title(recipe.data.dataset)}"


def block_range(a: int, b: int) -> str:
    """Blocks ``a`` .. ``b - 1`` as figures name them, inclusive: "blocks 0-5", "block 3"."""
    return f"block {a}" if b - a == 1 else f"blocks {a}-{b - 1}"


# --------------------------------------------------------------------------------------------
# metrics


def cost_section(model: nn.Module, recipe: Recipe, device: str, throughput: bool = True) -> dict:
    """Parameters, MACs and FLOPs per image (as `ufgir inspect` counts them) and, when asked, measured
    inference speed at the recipe's batch size and precision."""
    out = cost_summary(model, recipe.model.image_size)
    out["image_size"] = recipe.model.image_size
    if throughput:
        t = measure_inference(model, recipe.model.image_size, recipe.train.batch_size, device=device,
                              precision=resolve_precision(recipe.train.precision, device))
        out.update(images_per_s=t.images_per_s, latency_ms=t.latency_ms, peak_memory_mb=t.peak_memory_mb,
                   batch_size=t.batch_size, device=t.device, precision=t.precision)
    return out


def measure(path: Path, *, split: str = "test", data_recipe: Recipe | None = None, checkpoint: str = "auto",
            device: str = "auto", batches: int | None = None, batch_size: int | None = None, cka: bool = True,
            features: bool = True, cost: bool = True, progress: Progress | None = None) -> tuple[dict, Recipe]:
    """Everything `ufgir metrics` reports for one run, and the run's recipe.

    Images come from ``data_recipe``'s dataset (another run's, so that two runs see the same images)
    or the run's own; minibatches hold at least ``MIN_BATCH`` images when attention CKA is asked for.
    """
    loaded = load_model(path, checkpoint, device)
    model, recipe, device = loaded.model, loaded.recipe, loaded.device
    if (cka or features) and any(b.out_grid is None for b in model.feature_info):
        raise OptionError(f"ufgir metrics {path}: attention CKA and the feature metrics read every block's patch grid, "
                          "which the model's token reduction takes away; pass --no-attention-cka --no-features "
                          "(parameters, MACs and throughput remain)")
    res: dict = {
        "run": str(run_dir_of(path)), "checkpoint": loaded.tag, "method": recipe.model.method,
        "backbone": recipe.model.backbone, "image_size": recipe.model.image_size,
        "tokens_per_block": model.tokens_per_block,
        "tokens_attended": [b.tokens_attended for b in model.feature_info],
        "encoder_groups": [list(g) for g in ro.encoder_groups(model.grids)],
        "dataset": (data_recipe or recipe).data.dataset,
    }
    if cka or features:
        data = data_recipe or recipe
        sf = open_split(data, split)
        bs = batch_size or max(MIN_BATCH if cka else 1, recipe.eval.batch_size or recipe.train.batch_size)
        loader = make_loader(sf, recipe, train=False, batch_size=bs)
        data_cfg = model.data_config()
        stream = (normalize(x.to(device), data_cfg) for x, _, _ in loader if len(x))
        total = len(sf.samples) if batches is None else min(len(sf.samples), batches * bs)
        what = f"analysing {run_dir_of(path).name}"
        report = progress or (lambda *_: None)
        report(what, 0, total)
        res.update(analyse_batches(model, stream, cka=cka, features=features, max_batches=batches,
                                   on_batch=lambda n: report(what, n, total)))
        res.update(dataset=data.data.dataset, split=split, batch_size=bs)
    if cost:
        res["cost"] = cost_section(model, recipe, device)
    return res, recipe


# --------------------------------------------------------------------------------------------
# visualize


@dataclass(frozen=True)
class Shown:
    """What `ufgir visualize` draws: the images as the model saw them and the maps over them."""

    images: np.ndarray                      # (B, S, S, 3) uint8
    maps: list[tuple[str, np.ndarray]]      # (label, (B, S, S) in [0, 1]) per kind of map
    captions: list[tuple]                   # per image: predicted and true class (None for files), file name
    stems: list[str]                        # per image: its file name without suffix
    title: str                              # the run: method and dataset
    classes: tuple[int, int] | None = None  # classes shown, of the split's (None: the user's own files)


def _class_names(recipe: Recipe, own: list[str] | None = None) -> list[str] | None:
    """The class names that came with the model (``own``: a Hub repo's), else the dataset's when its
    folder is present (a model can be shown without its data)."""
    if own is not None:
        return own
    try:
        return read_classes(dataset_dir(recipe.data.dataset, recipe.data.root))
    except DatasetError:
        return None


def pick_per_class(targets: Sequence[int], per_class: int, count: int) -> list[int]:
    """Indices of the first ``per_class`` samples of each class, of at most ``count`` classes spread
    evenly over the class ids (so a 200-class test split shows classes 0, 28, 57, ... not 0-7), in
    class order; never more than ``count`` samples."""
    by_class: dict[int, list[int]] = {}
    for i, t in enumerate(targets):
        by_class.setdefault(t, []).append(i)
    classes = sorted(by_class)
    n = max(1, min(len(classes), count // per_class))
    chosen = [classes[k * (len(classes) - 1) // max(1, n - 1)] for k in range(n)]
    return [i for c in chosen for i in by_class[c][:per_class]][:count]


@dataclass(frozen=True)
class Loaded:
    """Images as the model's eval transform gives them, and what they are."""

    x: torch.Tensor                  # (B, 3, S, S) uint8
    targets: list[int | None]        # true classes (None for the user's own files)
    stems: list[str]                 # file names without suffix
    files: list[str | None]          # the user's file names (None for a split's images)
    class_names: list[str] | None
    classes: tuple[int, int] | None  # classes shown, of the split's (None for the user's files)


def load_images(recipe: Recipe, split: str, images: Sequence[Path] | None, count: int, per_class: int = 1,
                names: list[str] | None = None) -> Loaded:
    """The ``images`` files, or else ``per_class`` images of each of up to ``count // per_class`` classes of
    ``split`` (see :func:`pick_per_class`), as the model's eval transform sees them. ``names``: the model's
    own class names, if any."""
    tf = preprocess_for(recipe, train=False)
    if images:
        x = torch.stack([tf(load_image(str(p)), None) for p in images])       # (B, 3, S, S) uint8
        return Loaded(x, [None] * len(images), [p.stem for p in images], [p.name for p in images],
                      _class_names(recipe, names), None)
    sf = open_split(recipe, split)
    rows = [sf.samples[i] for i in pick_per_class([t for _, t in sf.samples], per_class, count)]
    x = torch.stack([tf(load_image(path), None) for path, _ in rows])          # (B, 3, S, S) uint8
    shown = (len({t for _, t in rows}), len({t for _, t in sf.samples}))
    return Loaded(x, [t for _, t in rows], [Path(path).stem for path, _ in rows], [None] * len(rows),
                  sf.class_names, shown)


def _captions(preds: list[int], loaded: Loaded) -> list[tuple[str, str | None, str | None]]:
    """(predicted, true or None, the user's file name or None) per image, for the figures' captions."""
    class_names = loaded.class_names

    def name(c: int | None) -> str | None:
        if c is None:
            return None
        return class_names[c] if class_names and c < len(class_names) else f"class {c}"

    return [(name(p), name(t), f) for t, p, f in zip(loaded.targets, preds, loaded.files, strict=True)]


def visualize(path: Path, make_maps: MakeMaps, *, split: str = "test", images: Sequence[Path] | None = None,
              count: int = 8, per_class: int = 1, checkpoint: str = "auto", device: str = "auto") -> Shown:
    """Run the model once over the images and turn its attention into maps at image resolution."""
    loaded = load_model(path, checkpoint, device)
    model, recipe, device = loaded.model, loaded.recipe, loaded.device
    imgs = load_images(recipe, split, images, count, per_class, loaded.class_names)
    x = imgs.x
    data_cfg = model.data_config()
    out = forward_collect(model, normalize(x.to(device), data_cfg))
    preds = out.logits.argmax(dim=1).tolist()
    maps = [(label, ro.upsample(m, tuple(x.shape[-2:])).cpu().numpy()) for label, m in make_maps(model, out.attention)]
    return Shown(x.permute(0, 2, 3, 1).numpy(), maps, _captions(preds, imgs), imgs.stems,  # images (B, S, S, 3)
                 run_title(recipe), imgs.classes)


@dataclass
class Selected:
    """What `ufgir visualize crops` draws: per image, panels of images with rectangles on them."""

    panels: list[tuple[str, np.ndarray, list[list[tuple[int, int, int, int]]]]]  # (label, (B, S, S, 3) uint8,
    #                                       per image its rectangles (top, left, height, width) in pixels)
    captions: list[tuple]                   # per image: predicted and true class (None for files), file name
    stems: list[str]
    title: str
    what: str                               # what is selected, for the figure's title
    classes: tuple[int, int] | None = None  # classes shown, of the split's (None: the user's own files)


def _to_uint8(x: torch.Tensor, mean, std) -> np.ndarray:
    """Normalised images (B, 3, S, S) -> (B, S, S, 3) uint8 for display."""
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return ((x.float().cpu() * s + m).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


#: CAL's boxes, tightest first (colour-blind safe, visible on leaves), and their names in panel labels.
BOX_COLOURS, BOX_COLOUR_NAMES = ("#ff2a2a", "#0072b2", "#f0e442"), ("red", "blue", "yellow")


#: Patches a method marks apart from those it picks (SimTrans's anchor).
ANCHOR_COLOUR = BOX_COLOURS[1]


def _patch_rects(indices: torch.Tensor, grid: tuple[int, int], patch: int, colour: str | None = None) -> list[tuple]:
    """Patch indices (into the patch grid, row-major) -> one rectangle per distinct patch, (top, left,
    height, width) in pixels, with ``colour`` when given."""
    return [(int(j) // grid[1] * patch, int(j) % grid[1] * patch, patch, patch, *([colour] if colour else []))
            for j in sorted(set(indices.tolist()))]


@dataclass
class Panels:
    """What a method looked at for a batch, ready to draw: panels of images with rectangles on them
    (see :class:`Selected`), what is selected in words, and the predictions."""

    panels: list[tuple[str, np.ndarray, list[list[tuple]]]]
    what: str
    preds: list[int]


@torch.no_grad()
def selection_panels(model: nn.Module, x: torch.Tensor) -> Panels | None:
    """The panels of what ``model``'s method selects or crops for uint8 images ``x`` (B, 3, S, S) as its
    eval transform gives them; None for a method that selects nothing. GLSim's and RAMS's box on the image
    and the crop its second pass sees, CAL's evaluation boxes and their crops, the patches TransFG and
    FFVT hand to their aggregator block, or SimTrans's parts and anchor at each of its structure
    injections (one panel each)."""
    device = next(model.parameters()).device
    cfg = model.data_config()
    xn = normalize(x.to(device), cfg)
    sel = model.method.select(model, xn)
    if sel is None:
        return None
    preds = model(xn).argmax(dim=1).tolist()
    shown = x.permute(0, 2, 3, 1).cpu().numpy()
    patch = model.vit.patch_embed.patch_size[0]
    if sel.boxes is not None:
        K = sel.boxes.shape[0]
        # several boxes: a colour each, named in the crop panels (a single one is the loosest: the last colour)
        colours, names = (BOX_COLOURS[-K:], BOX_COLOUR_NAMES[-K:]) if K > 1 else ((None,), ("",))
        boxes = [[(t, left, b - t, r - left, *([colours[k]] if colours[k] else []))
                  for k, (t, b, left, r) in enumerate(per_image)]
                 for per_image in sel.boxes.transpose(0, 1).tolist()]                  # per image, K boxes
        panels = [("image and boxes" if K > 1 else "image and box", shown, boxes)]
        panels += [(f"{label} ({name})" if name else label, _to_uint8(c, cfg["mean"], cfg["std"]), [[] for _ in preds])
                   for label, c, name in zip(sel.labels, sel.crops, names, strict=True)]
    elif sel.steps:  # one panel per step: its patches, and its anchors in another colour
        panels = [(step.label, shown, [_patch_rects(p, sel.grid, patch) + _patch_rects(a, sel.grid, patch, ANCHOR_COLOUR)
                                       for p, a in zip(step.picked, step.anchors or [torch.empty(0)] * len(preds),
                                                       strict=True)])
                  for step in sel.steps]
    else:
        panels = [("selected patches", shown, [_patch_rects(p, sel.grid, patch) for p in sel.patches])]
    return Panels(panels, sel.what, preds)


def selections(path: Path, *, split: str = "test", images: Sequence[Path] | None = None, count: int = 8,
               per_class: int = 1, checkpoint: str = "auto", device: str = "auto") -> Selected:
    """What a fine-grained method looks at over a run's images (:func:`selection_panels`)."""
    loaded = load_model(path, checkpoint, device)
    model, recipe = loaded.model, loaded.recipe
    imgs = load_images(recipe, split, images, count, per_class, loaded.class_names)
    shown = selection_panels(model, imgs.x)
    if shown is None:
        raise OptionError(f"visualize crops shows what GLSim, RAMS, CAL, TransFG, FFVT and SimTrans select; "
                          f"{recipe.model.method} selects nothing (try `ufgir visualize rollout`)")
    return Selected(shown.panels, _captions(shown.preds, imgs), imgs.stems, run_title(recipe), shown.what, imgs.classes)


def _group_blocks(text: str, grids: list[tuple[int, int]]) -> tuple[int, int]:
    """``--group a-b`` (blocks a to b, inclusive, as the figures name them) -> (a, b + 1), checked to lie
    inside one encoder group."""
    names = ", ".join(f"{a}-{b - 1}" for a, b in ro.encoder_groups(grids))
    try:
        a, b = (int(v) for v in text.split("-"))
    except ValueError:
        raise OptionError(f"--group: {text!r} is not of the form a-b (blocks a to b); this model's groups: {names}") from None
    if not 0 <= a <= b < len(grids):
        raise OptionError(f"--group: {text!r} is outside blocks 0-{len(grids) - 1}; this model's groups: {names}")
    try:
        return ro.parse_group(f"{a}-{b + 1}", grids)
    except ValueError:
        raise OptionError(f"--group: blocks {a}-{b} span a down-sampling ILA (the token count changes inside "
                          f"them); use one of {names} or rollout --across") from None


def rollout_maps(model: nn.Module, attention: list[torch.Tensor], *, group: str | None = None,
                 across: bool = False, fusion: ro.Fusion = "mean", discard: float = 0.0) -> list[tuple[str, torch.Tensor]]:
    """Attention rollout per encoder group (or blocks ``group`` = "a-b", inclusive), or ``across`` all of
    them; labelled by their blocks, inclusive."""
    if any(g is None for g in model.grids):
        raise OptionError("attention rollout multiplies maps over a patch grid, which the model's token reduction "
                          "takes away; visualize attention (--layer) on a block before the first reduction instead")
    grids = [tuple(g) for g in model.grids]
    if across:
        return [(block_range(0, len(grids)), ro.rollout_across(attention, grids, ro.downsample_kernels(model), fusion, discard))]
    groups = ro.encoder_groups(grids) if group is None else [_group_blocks(group, grids)]
    return [(block_range(a, b), ro.rollout(attention[a:b], grids[a], fusion, discard)) for a, b in groups]


def block_attention(model: nn.Module, attention: list[torch.Tensor], *, layer: int | None = None,
                    fusion: ro.Fusion = "mean") -> list[tuple[str, torch.Tensor]]:
    """The head-fused CLS attention of block ``layer`` (default: the last)."""
    depth = len(attention)
    block = depth - 1 if layer is None else layer
    if block >= depth:
        raise OptionError(f"--layer: {block} is not a block of this {depth}-block model (0-{depth - 1})")
    if model.grids[block] is None:
        first = next(i for i, g in enumerate(model.grids) if g is None)
        raise OptionError(f"--layer: block {block} attends over tokens without a patch grid (a token reduction ends "
                          f"it after block {first - 1}); give a block 0-{first - 1}")
    return [(block_range(block, block + 1), ro.attention_l(attention[block], tuple(model.grids[block]), fusion))]


# --------------------------------------------------------------------------------------------
# compare


def saved_recipe(path: Path) -> Recipe:
    """The saved recipe of a run folder, or the one stored in a checkpoint file."""
    saved = RunDir.of(path).recipe_file
    if saved.is_file():
        return load_saved_recipe(saved)
    return recipe_from_dict(read_checkpoint(resolve_checkpoint(path))["recipe"])


def static_cost(recipe: Recipe, num_classes: int) -> dict:
    """Parameters and MACs of a recipe's model, built on the meta device (no weights, no compute)."""
    cfg = recipe.model
    return cost_summary(meta_model(cfg, cfg.num_classes or num_classes), cfg.image_size)
