"""The datasets `ufgir download` knows, as data: where each comes from and what a correct copy holds.

Adding a dataset means adding an entry, not code, as long as its labels follow one of the three
published schemes (``labels``):

``filename``  ``<image_dir>/<label>_<index>_<train|test>.<ext>``: label and split in the file name
              (cotton80, soylocal, soyglobal).
``anno``      ``anno/{train,test}.txt`` with ``<file> <label>`` lines and the files under ``images/``,
              once per ``R<r>/`` folder when ``rounds`` is set (soygene, soyageing).
``cub``       CUB-200-2011's ``images.txt``, ``image_class_labels.txt``, ``train_test_split.txt`` and
              ``classes.txt``.

Published labels are 1-based; class ids on disk are 0-based (label - 1). Archive URLs can move or
be released only on request, so every URL is overridable (``--url``) and a local copy is always
accepted (``--archive``, ``--from-folder``). Tests shrink entries with :func:`dataclasses.replace`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..errors import DatasetError

UFG_PAGE = "https://maxwell.ict.griffith.edu.au/cvipl/UFG_dataset.html"
UFG_REPO = "https://github.com/XiaohanYu-GU/Ultra-FGVC"
_UFG_FILES = "https://maxwell.ict.griffith.edu.au/cvipl/UFG_dataset"
CUB_RECORD = "https://data.caltech.edu/records/65de6-vp158"


@dataclass(frozen=True)
class DatasetSpec:
    """One catalog entry. Expected sizes are ``None`` only for generated datasets."""

    name: str
    title: str
    kind: Literal["archive", "generated"]
    labels: Literal["filename", "anno", "cub", "generated"]
    num_classes: int | None
    train_val: int | None
    test: int | None
    url: str | None = None  # the archive; `--url` overrides it
    archive: str | None = None  # file name in the download cache, shared by entries of one archive
    sha256: str | None = None  # None: unknown, the computed hash is recorded in dataset.json
    image_dir: str = ""  # `filename` scheme: the folder that holds the images
    rounds: tuple[int, ...] = ()  # `anno` scheme: the R<r>/ folders to pool, one class id per label
    sources: tuple[str, ...] = ()  # official pages
    terms: str | None = None  # licence / terms of use

    @property
    def num_images(self) -> int | None:
        return None if self.train_val is None or self.test is None else self.train_val + self.test


def _ufg(
    name: str,
    title: str,
    classes: int,
    train_val: int,
    test: int,
    archive: str,
    image_dir: str = "",
    rounds: tuple[int, ...] = (),
) -> DatasetSpec:
    """A UFG benchmark entry: file-name labels when ``image_dir`` is given, else ``anno`` files."""
    return DatasetSpec(
        name=name,
        title=title,
        kind="archive",
        labels="filename" if image_dir else "anno",
        num_classes=classes,
        train_val=train_val,
        test=test,
        url=f"{_UFG_FILES}/{archive}",
        archive=archive,
        image_dir=image_dir,
        rounds=rounds,
        sources=(UFG_PAGE, UFG_REPO),
        terms=UFG_PAGE,
    )


_AGEING_ROUNDS = (1, 3, 4, 5, 6)  # the benchmark has no R2

_ENTRIES: tuple[DatasetSpec, ...] = (
    _ufg("cotton80", "Cotton80", 80, 240, 240, "Cotton80.zip", image_dir="cotton_square_new"),
    _ufg("soylocal", "SoyLocal", 200, 600, 600, "SoyLocal.zip", image_dir="soybean200_square"),
    _ufg("soyglobal", "SoyGlobal", 1938, 5814, 5814, "SoyGlobal.zip", image_dir="soybean2000"),
    _ufg("soygene", "SoyGene", 1110, 12763, 11143, "SoyGene.zip"),
    _ufg(
        "soyageing", "SoyAgeing (R1, R3-R6 pooled)", 198, 4950, 4950, "SoyAgeing.zip", rounds=_AGEING_ROUNDS
    ),
    *(
        _ufg(f"soyageing_r{r}", f"SoyAgeing R{r}", 198, 990, 990, "SoyAgeing.zip", rounds=(r,))
        for r in _AGEING_ROUNDS
    ),
    DatasetSpec(
        name="cub200",
        title="CUB-200-2011",
        kind="archive",
        labels="cub",
        num_classes=200,
        train_val=5994,
        test=5794,
        url=f"{CUB_RECORD}/files/CUB_200_2011.tgz?download=1",
        archive="CUB_200_2011.tgz",
        sources=(CUB_RECORD,),
        terms=CUB_RECORD,
    ),
    DatasetSpec(
        name="synthetic",
        title="Synthetic ultra-fine-grained leaves (generated, no download)",
        kind="generated",
        labels="generated",
        num_classes=None,
        train_val=None,
        test=None,
    ),
)

CATALOG: dict[str, DatasetSpec] = {spec.name: spec for spec in _ENTRIES}


def get_spec(name: str) -> DatasetSpec:
    """The catalog entry called ``name``; an unknown name lists the known ones."""
    try:
        return CATALOG[name]
    except KeyError:
        raise DatasetError(f"unknown dataset {name!r}; choose one of: {', '.join(CATALOG)}") from None
