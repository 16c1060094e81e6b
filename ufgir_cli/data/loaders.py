"""A recipe's dataset as loaders: where its folder is, its validated splits, and DataLoaders.

Every command that reads images (train, eval, metrics, visualize, the benchmarks) comes here, so a
dataset is located, checked and augmented one way. Nothing here knows the model or the training loop.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..cores import data_workers
from ..errors import DatasetError, RecipeError
from ..paths import dataset_dir
from ..recipe import Recipe
from .catalog import catalog_name
from .datasets import EpochSampler, ImageFolderSplit, collate, find_unreadable, init_worker, preprocess_for
from .folder import SplitFile, read_info, read_split
from .integrity import check_recorded


def dataset_root(recipe: Recipe) -> Path:
    """The recipe's dataset folder. The ``synthetic`` set is generated here by whichever command
    first needs it, so `make demo` and the tests need no download step."""
    name = catalog_name(recipe.data.dataset) or recipe.data.dataset  # `Cotton80` is `cotton80`
    root = dataset_dir(name, recipe.data.root)
    if name == "synthetic":
        from .synthetic import ensure_synthetic

        ensure_synthetic(root)
    return root


def open_split(recipe: Recipe, split: str) -> SplitFile:
    """One validated split of the recipe's dataset (missing files tolerated with data.skip_corrupt)."""
    return read_split(dataset_root(recipe), split, check_files=not recipe.data.skip_corrupt)


def read_splits(recipe: Recipe) -> tuple[SplitFile, SplitFile, list[str]]:
    """Both split files, validated, with every image decode-checked, before anything is written.

    Returns ``(train split, eval split, skipped)``: with ``data.skip_corrupt`` missing or unreadable
    images are left out and listed in ``skipped`` (paths relative to the dataset folder); without
    it the first one is a one-line DatasetError. The split sizes and the verdict recorded in
    dataset.json are checked first (:func:`~.integrity.check_recorded`).
    """
    root = dataset_root(recipe)
    skip = recipe.data.skip_corrupt
    names = (recipe.train.split, recipe.eval.split)
    files = [read_split(root, name, check_files=not skip) for name in names]
    check_recorded(root, read_info(root), {name: len(sf.samples) for name, sf in zip(names, files, strict=True)})
    splits, skipped = [], []
    for name, sf in zip(names, files, strict=True):
        bad = find_unreadable([p for p, _ in sf.samples])
        if bad and not skip:
            path, why = bad[0]
            more = f" ({len(bad)} unreadable images in this split)" if len(bad) > 1 else ""
            raise DatasetError(
                f"image {os.path.relpath(path, root)} in {root / 'splits' / f'{name}.csv'} cannot be decoded "
                f"({why}){more}; replace or remove it, or pass --skip-corrupt to leave such images out"
            )
        if bad:
            drop = {p for p, _ in bad}
            sf = dataclasses.replace(sf, samples=[s for s in sf.samples if s[0] not in drop])
            if not sf.samples:
                raise DatasetError(f"no image of split {name} in {root} can be decoded; check the dataset folder")
            skipped += [os.path.relpath(p, root) for p, _ in bad]
        splits.append(sf)
    return splits[0], splits[1], skipped


def with_num_classes(recipe: Recipe, num_classes: int) -> Recipe:
    """The recipe with ``model.num_classes`` taken from the dataset (an explicit, different value is an error)."""
    m = recipe.model
    if m.num_classes is not None and m.num_classes != num_classes:
        raise RecipeError(
            f"model.num_classes is {m.num_classes} but dataset {recipe.data.dataset!r} has {num_classes} classes; "
            "unset model.num_classes to take it from the dataset"
        )
    return recipe.model_copy(update={"model": m.model_copy(update={"num_classes": num_classes})})


def make_loader(split: SplitFile, recipe: Recipe, *, train: bool, batch_size: int, rank: int = 0, world: int = 1,
                workers: int | None = None) -> DataLoader:
    """Batches of uint8 images for one split; ``rank``/``world`` shard it for DistributedDataParallel."""
    d = recipe.data
    tf = preprocess_for(recipe, train)
    ds = ImageFolderSplit(split, tf, seed=recipe.train.seed, skip_corrupt=d.skip_corrupt)
    sampler = EpochSampler(len(ds), shuffle=train, seed=recipe.train.seed, rank=rank, world=world, pad=train)
    workers = data_workers(d.num_workers if workers is None else workers, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return DataLoader(
        ds, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate,
        pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0 and train,
        worker_init_fn=init_worker, generator=torch.Generator().manual_seed(recipe.train.seed),
        prefetch_factor=4 if workers > 0 else None,
    )
