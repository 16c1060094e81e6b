"""Image datasets and samplers for training and evaluation.

Augmentation randomness is a pure function of (seed, epoch, index): the sampler hands the dataset
``(epoch, index)`` keys, and every sample seeds its own generator. So a resumed run, a run with a
different number of workers and a distributed run all see the same crops and flips.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from ..errors import DatasetError, RecipeError
from .content import decode_rgb as _decode_rgb
from .folder import SplitFile

# Truncated or garbled files raise any of these (PIL's UnidentifiedImageError is an OSError).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def load_image(path: str) -> torch.Tensor:
    """(3, H, W) uint8 RGB from any common image file: greyscale, palette, CMYK, 16-bit and
    animated files (first frame) are converted, not fatal. Decoded with Pillow (torchvision's
    decoders are deprecated)."""
    try:
        arr = _decode_rgb(path)
    except _DECODE_ERRORS as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DatasetError(f"image {path} cannot be decoded ({why}); remove it or pass --skip-corrupt") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()  # (3, H, W)


def find_unreadable(paths: list[str], threads: int | None = None) -> list[tuple[str, str]]:
    """``(path, reason)`` for every image that is missing or does not decode, in input order.

    Training checks its splits with this before it writes anything, so a bad file is a one-line
    error up front (or is skipped and counted with ``data.skip_corrupt``) instead of a crash in a
    data-loader worker hours in. Pillow releases the GIL while decoding, so threads scale.
    """

    def reason(path: str) -> str | None:
        if not os.path.isfile(path):
            return "file does not exist"
        try:
            _decode_rgb(path, draft=64)
        except _DECODE_ERRORS as e:
            return str(e).splitlines()[0] if str(e) else type(e).__name__
        return None

    with ThreadPoolExecutor(max_workers=threads or min(8, os.cpu_count() or 1)) as pool:
        found = list(pool.map(reason, paths))
    return [(p, r) for p, r in zip(paths, found, strict=True) if r is not None]


def resize_square(img: torch.Tensor, size: int, interpolation: str = "bicubic") -> torch.Tensor:
    """Square resize of a uint8 (3, H, W) image, as the paper does (aspect not kept)."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    mode = InterpolationMode.BICUBIC if interpolation == "bicubic" else InterpolationMode.BILINEAR
    return TF.resize(img, [size, size], interpolation=mode, antialias=True)


#: Augmentation presets of the reference (FGIR.md §1.5): ``weak`` = resize, random crop, flip;
#: ``medium`` adds TrivialAugmentWide and RandomErasing (p 0.3, area 0.02-0.4, aspect 0.3-3.3). The
#: rest of ``medium`` (label smoothing 0.1, uniform stochastic depth 0.1 instead of dropout) is set on
#: the recipe's optimiser and model keys when the recipe is resolved.
AUGMENTS = ("weak", "medium")


class Preprocess:
    """Paper transforms on uint8 tensors: resize to R = int(ratio * S); train: random crop S + flip
    (+ the ``medium`` preset's TrivialAugmentWide and RandomErasing); eval: centre crop S.
    Normalisation happens on the device, on the batch (see ``normalize``).

    Every random choice is drawn from the per-sample generator, so augmentation is a function of
    (seed, epoch, index) and a resumed run sees the same images. torchvision's transforms draw from
    torch's global generator: they run inside a forked RNG seeded from the per-sample one.
    """

    def __init__(self, image_size: int, train: bool, resize_ratio: float = 1.34, hflip: bool = True,
                 interpolation: str = "bicubic", augment: str = "weak",
                 mean: tuple[float, float, float] = (0.5, 0.5, 0.5)):
        if augment not in AUGMENTS:
            raise ValueError(f"augment must be one of {AUGMENTS}, got {augment!r}")
        self.size = image_size
        self.resize = int(resize_ratio * image_size)
        self.train = train
        self.hflip = hflip
        self.interpolation = interpolation
        self.augment = augment
        self.extra = None
        if train and augment == "medium":
            from torchvision.transforms import v2

            # The reference erases with 0 after Normalize, i.e. with the mean colour: on uint8 that is
            # round(255 * mean), which normalises to 0 within half a grey level.
            fill = [round(255 * m) for m in mean]
            self.extra = v2.Compose([
                v2.TrivialAugmentWide(),  # torchvision's defaults, as the reference
                v2.RandomErasing(p=0.3, scale=(0.02, 0.4), ratio=(0.3, 3.3), value=fill),
            ])

    def __call__(self, img: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        img = resize_square(img, self.resize, self.interpolation)
        R, S = self.resize, self.size
        if self.train:
            top, left = (int(v) for v in torch.randint(0, R - S + 1, (2,), generator=gen))
        else:
            top = left = int(round((R - S) / 2.0))
        img = img[:, top : top + S, left : left + S]
        if self.train and self.hflip and torch.rand((), generator=gen).item() < 0.5:
            img = img.flip(-1)
        if self.extra is not None:
            seed = int(torch.randint(0, 2**62, (), generator=gen))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                img = self.extra(img)
        return img.contiguous()


def preprocess_for(recipe, train: bool) -> Preprocess:
    """The recipe's paper transform: training augmentation (its ``data.augment`` preset), or the eval
    resize + centre crop."""
    d = recipe.data
    for key in ("resize_ratio", "interpolation"):
        if getattr(d, key) is None:  # resolved when the recipe loads, or by the build (Recipe.with_model)
            raise RecipeError(f"data.{key} is unset and model.backbone {recipe.model.backbone!r}'s pretrained config "
                              f"does not give it; set data.{key}")
    mean = recipe.model.mean or (0.5, 0.5, 0.5)
    return Preprocess(recipe.model.image_size, train, d.resize_ratio, d.hflip, d.interpolation,
                      d.augment, mean)


def normalize(x: torch.Tensor, data_config: dict) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> normalised float (B, 3, H, W), done on the device after transfer, with the
    mean and std of a model's ``data_config()`` (or an export's copy of it). The one place they are read."""
    m = torch.tensor(data_config["mean"], device=x.device).view(1, 3, 1, 1) * 255
    s = torch.tensor(data_config["std"], device=x.device).view(1, 3, 1, 1) * 255
    return (x.float() - m) / s


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed from (seed, epoch, index), stable across processes and platforms."""
    h = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & (2**64 - 1)
    h ^= h >> 31
    return h & (2**63 - 1)


class ImageFolderSplit(Dataset):
    """One split of a dataset folder. Items are keyed by ``(epoch, index)`` or a plain index.

    Returns ``(uint8 image (3, S, S), target, index)``; a corrupt image with ``skip_corrupt`` comes
    back with target -1 and is dropped by the collate function (and counted).
    """

    def __init__(self, split: SplitFile, transform: Preprocess, seed: int = 0, skip_corrupt: bool = False):
        self.samples = split.samples
        self.split = split
        self.transform = transform
        self.seed = seed
        self.skip_corrupt = skip_corrupt

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def targets(self) -> list[int]:
        return [t for _, t in self.samples]

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        path, target = self.samples[index]
        gen = None
        if self.transform.train:
            gen = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index))
        try:
            img = load_image(path)
        except DatasetError:
            if not self.skip_corrupt:
                raise
            S = self.transform.size
            return torch.zeros(3, S, S, dtype=torch.uint8), -1, index
        return self.transform(img, gen), target, index


def collate(batch: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    kept = [b for b in batch if b[1] >= 0]
    if not kept:
        S = batch[0][0].shape[-1]
        return torch.zeros(0, 3, S, S, dtype=torch.uint8), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    x = torch.stack([b[0] for b in kept])                      # (B, 3, S, S) uint8
    y = torch.tensor([b[1] for b in kept], dtype=torch.long)
    i = torch.tensor([b[2] for b in kept], dtype=torch.long)
    return x, y, i


class EpochSampler(Sampler):
    """Yields ``(epoch, index)`` keys: a seeded permutation per epoch (or the natural order), sharded
    across ``world`` ranks without padding for evaluation, and able to start mid-epoch on resume.

    Training shards are padded to equal length (every rank must step the same number of times);
    evaluation shards are not (``drop_pad``), so combined metrics equal a single-process run.
    """

    def __init__(self, n: int, *, shuffle: bool, seed: int = 0, rank: int = 0, world: int = 1,
                 pad: bool = True):
        self.n, self.shuffle, self.seed, self.rank, self.world, self.pad = n, shuffle, seed, rank, world, pad
        self.epoch = 0
        self.start = 0  # samples of this rank's shard already consumed (resume)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _order(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if self.pad and self.world > 1:
            total = math.ceil(self.n / self.world) * self.world
            order += order[: total - self.n]
        return order[self.rank :: self.world]

    @property
    def epoch_size(self) -> int:
        """Keys this rank draws in a whole epoch (padded for training shards)."""
        return len(self._order())

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for idx in self._order()[self.start :]:
            yield self.epoch, idx

    def __len__(self) -> int:
        return self.epoch_size - self.start


def init_worker(worker_id: int) -> None:
    """Data-loader worker set-up: seed python/numpy from torch's per-worker seed (augmentation
    itself is keyed per sample) and ignore the signals that stop a run (``engine.state.STOP_SIGNALS``:
    SIGINT, SIGTERM and Slurm's time-limit warning SIGUSR2).

    Ctrl-C and schedulers (Slurm, ``kill -TERM -PGID``) signal the whole process group. A worker
    that died of it would crash the main process ("DataLoader worker exited unexpectedly") before
    it could finish the step and save; ignoring the signal leaves the decision to the main process,
    and the workers still exit with it (torch's watchdog) however it ends.
    """
    import random
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGUSR2", None)):
        if sig is not None:  # no SIGUSR2 on Windows
            signal.signal(sig, signal.SIG_IGN)
    s = torch.initial_seed() % 2**32
    random.seed(s)
    np.random.seed(s)


__all__ = ["EpochSampler", "ImageFolderSplit", "Preprocess", "collate", "find_unreadable", "init_worker", "load_image",
           "normalize", "resize_square", "sample_seed"]
