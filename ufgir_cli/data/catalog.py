"""The datasets `ufgir download` knows, as data: where each comes from and what a correct copy holds.

Adding a dataset means adding an entry, not code, as long as its labels follow one of the
published schemes (``labels``):

``anno``      ``anno/{train,test}.txt`` with ``<file> <label>`` lines and the files under ``images/``,
              once per ``R<r>/`` folder when ``rounds`` is set (every UFG set's current layout). An
              entry with ``image_dir`` also accepts the older layout with label and split in the file
              name, ``<image_dir>/<label>_<index>_<train|test>.<ext>`` (cotton80, soylocal, soyglobal);
              which one a copy uses is read from its contents.
``cub``       CUB-200-2011's ``images.txt``, ``image_class_labels.txt``, ``train_test_split.txt`` and
              ``classes.txt``.

Published labels are 1-based; class ids on disk are 0-based (label - 1).

Each entry lists its :class:`Source` s in the order `ufgir download` tries them. Only addresses that
someone published go in: the benchmark's own share (Baidu Pan, Google Drive) cannot be fetched by a
program and is there for the manual steps; community mirrors on the Hugging Face Hub can. Tests
shrink entries with :func:`dataclasses.replace`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import DatasetError, did_you_mean
from ..io import read_json_object
from ..paths import data_dir as default_data_dir
from ..paths import dataset_dir

UFG_REPO = "https://github.com/XiaohanYu-GU/Ultra-FGVC"
BAIDU_SHARE = "https://pan.baidu.com/s/1bPJYmFGWJg2eTr5Ipfw6uA"
BAIDU_CODE = "ICCV"
DRIVE_FOLDER = "https://drive.google.com/drive/folders/1UkWRepieAvEVEn3Z8n1Zx04bASvvqL7G"
HUB_ZIPS = "hibana2077/Ultra-FGVC"
HUB_PARQUET = "hibana2077/CV-dataset-all-in-parquet"
CUB_RECORD = "https://data.caltech.edu/records/65de6-vp158"

_UFG_TERMS = f"set by the authors; see {UFG_REPO}"
_MIRROR_TERMS = "not stated by the uploader; the official terms apply"


@dataclass(frozen=True)
class Source:
    """One place a dataset can come from.

    ``fetch`` says how: ``url`` is a plain archive download, ``hub`` one or more files of a Hugging
    Face Hub dataset repo (``repo``, ``files``, ``revision``; fetched through ``huggingface_hub``),
    ``manual`` a page a person has to open (``url``, with ``code`` the access code if any).
    ``files`` of a parquet source for pooled rounds are in the entry's ``rounds`` order.
    """

    origin: Literal["official", "mirror"]
    fetch: Literal["url", "hub", "manual"]
    provenance: str  # who publishes it and where the link is published
    terms: str
    url: str | None = None
    code: str | None = None
    repo: str | None = None
    files: tuple[str, ...] = ()
    revision: str = "main"  # a commit hash once one is known to hold the right copy
    format: Literal["archive", "parquet"] = "archive"

    @property
    def where(self) -> str:
        """The address, printed whole: a URL, or ``hf://datasets/<repo>/<file>@<revision>``."""
        if self.fetch == "hub":
            return ", ".join(f"hf://datasets/{self.repo}/{f}@{self.revision}" for f in self.files)
        return self.url + (f" (access code {self.code})" if self.code else "")


_BAIDU = Source(
    "official",
    "manual",
    f"the benchmark's README ({UFG_REPO}): one Baidu Pan share with every set",
    _UFG_TERMS,
    url=BAIDU_SHARE,
    code=BAIDU_CODE,
)


_DRIVE = Source(
    "official",
    "manual",
    "a Google Drive folder linked from the CLE-ViT and Mix-ViT READMEs (Cotton80 and SoyLocal)",
    _UFG_TERMS,
    url=DRIVE_FOLDER,
)


def _hub_zip(path: str) -> Source:
    return Source(
        "mirror",
        "hub",
        f"a community copy on the Hugging Face Hub, not the authors' (dataset {HUB_ZIPS}), official anno/ layout",
        _MIRROR_TERMS,
        repo=HUB_ZIPS,
        files=(path,),
    )


def _hub_parquet(*names: str) -> Source:
    return Source(
        "mirror",
        "hub",
        f"a community copy on the Hugging Face Hub, not the authors' (dataset {HUB_PARQUET}), parquet",
        _MIRROR_TERMS,
        repo=HUB_PARQUET,
        files=tuple(f"datasets/ufgvc/{n}" for n in names),
        format="parquet",
    )


#: The generated ``synthetic`` set: classes, and train_val and test images per class (`data/synthetic.py`).
DEMO_CLASSES, DEMO_TRAIN_VAL, DEMO_TEST = 10, 40, 20


@dataclass(frozen=True)
class DatasetSpec:
    """One catalog entry, or a dataset of the user's own (``kind="user"``, made by `ufgir datasets add`
    and described by its own ``dataset.json``: :func:`user_spec`). Expected sizes are ``None`` for
    generated and user datasets."""

    name: str
    title: str
    kind: Literal["archive", "generated", "user"]
    labels: Literal["anno", "cub", "generated", "folder"]
    num_classes: int | None
    train_val: int | None
    test: int | None
    archive: str | None = None  # the file to get by hand, and its name in the download cache
    sha256: str | None = None  # None: unknown, the computed hash is recorded in dataset.json
    image_dir: str = ""  # set: the older file-name layout is accepted besides ``anno``
    rounds: tuple[int, ...] = ()  # `anno` scheme: the R<r>/ folders to pool, one class id per label
    sources: tuple[Source, ...] = ()  # tried in order by `ufgir download`
    terms: str | None = None  # licence / terms of use of the dataset itself
    test_fraction: float = 0.5  # `folder` scheme without a test split: the share of each class held out

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
    mirrors: tuple[Source, ...],
    image_dir: str = "",
    rounds: tuple[int, ...] = (),
    drive: bool = False,
) -> DatasetSpec:
    """A UFG benchmark entry: the official share first (by hand), then the mirrors a program can fetch."""
    return DatasetSpec(
        name=name,
        title=title,
        kind="archive",
        labels="anno",
        num_classes=classes,
        train_val=train_val,
        test=test,
        archive=archive,
        image_dir=image_dir,
        rounds=rounds,
        sources=(_BAIDU, *((_DRIVE,) if drive else ()), *mirrors),
        terms=_UFG_TERMS,
    )


_AGEING_ROUNDS = (1, 3, 4, 5, 6)  # the benchmark has no R2


def _ageing(rounds: tuple[int, ...]) -> Source:
    return _hub_parquet(*(f"soy_ageing_R{r}_dataset.parquet" for r in rounds))


_ENTRIES: tuple[DatasetSpec, ...] = (
    _ufg(
        "cotton80", "Cotton80", 80, 240, 240, "Cotton80.zip",
        (_hub_zip("Cotton80/Cotton80.zip"), _hub_parquet("cotton80_dataset.parquet")),
        image_dir="cotton_square_new", drive=True,
    ),
    _ufg(
        "soylocal", "SoyLocal", 200, 600, 600, "SoyLocal.zip",
        (_hub_zip("SoyLocal/SoyLocal.zip"), _hub_parquet("soybean_dataset.parquet")),
        image_dir="soybean200_square", drive=True,
    ),
    _ufg(
        "soyglobal", "SoyGlobal", 1938, 5814, 5814, "SoyGlobal.zip",
        (_hub_parquet("soyglobal_dataset.parquet"),), image_dir="soybean2000",
    ),
    _ufg("soygene", "SoyGene", 1110, 12763, 11143, "SoyGene.zip", (_hub_parquet("soygene_dataset.parquet"),)),
    _ufg(
        "soyageing", "SoyAgeing (R1, R3-R6 pooled)", 198, 4950, 4950, "SoyAgeing.zip",
        (_ageing(_AGEING_ROUNDS),), rounds=_AGEING_ROUNDS,
    ),
    *(
        _ufg(f"soyageing_r{r}", f"SoyAgeing R{r}", 198, 990, 990, "SoyAgeing.zip", (_ageing((r,)),), rounds=(r,))
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
        archive="CUB_200_2011.tgz",
        sources=(
            Source(
                "official",
                "manual",
                f"the CaltechDATA record of the dataset ({CUB_RECORD})",
                f"see {CUB_RECORD}",
                url=CUB_RECORD,
            ),
            Source(
                "official",
                "url",
                f"the CaltechDATA record of the dataset ({CUB_RECORD})",
                f"see {CUB_RECORD}",
                url=f"{CUB_RECORD}/files/CUB_200_2011.tgz?download=1",
            ),
        ),
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
)  # fmt: skip

CATALOG: dict[str, DatasetSpec] = {spec.name: spec for spec in _ENTRIES}


USER_KIND = "user"  # dataset.json's "kind" for a dataset made by `ufgir datasets add`
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def catalog_name(name: str) -> str | None:
    """The catalog's own spelling of ``name`` (names are case-insensitive: ``Cotton80`` is ``cotton80``)."""
    if name in CATALOG:
        return name
    return next((k for k in CATALOG if k.lower() == name.lower()), None)


def get_spec(name: str, data_dir: str | os.PathLike | None = None) -> DatasetSpec:
    """The dataset called ``name``: a catalog entry (any case), else a dataset of the user's own that
    `ufgir datasets add` recorded in ``<data dir>/<name>/dataset.json``; an unknown name lists the
    known ones and suggests the nearest."""
    found = catalog_name(name)
    if found is not None:
        return CATALOG[found]
    info = read_json_object(dataset_dir(name, data_dir) / "dataset.json")
    if info.get("kind") == USER_KIND:
        return user_spec(name, info)
    own = user_datasets(data_dir)
    known = [*CATALOG, *own]
    raise DatasetError(f"unknown dataset {name!r}{did_you_mean(name, known)}; choose one of: {', '.join(known)}, "
                       "or add your own with `ufgir datasets add NAME --from-folder DIR`")


def user_spec(name: str, info: dict | None = None, test_fraction: float = 0.5) -> DatasetSpec:
    """The entry of a dataset of the user's own; ``info`` (its dataset.json) gives the sizes it was made with."""
    if not _SAFE_NAME.fullmatch(name):
        raise DatasetError(f"dataset name {name!r}: use letters, digits, '_', '.' or '-' (at most 64), "
                           "starting with a letter or digit")
    info = info or {}
    counts = info.get("counts") or {}
    return DatasetSpec(name=name, title=info.get("title") or name, kind=USER_KIND, labels="folder",
                       num_classes=info.get("num_classes"), train_val=counts.get("train_val"), test=counts.get("test"),
                       terms=info.get("terms") or "your own data", test_fraction=info.get("test_fraction", test_fraction))


def user_datasets(data_dir: str | os.PathLike | None = None) -> dict[str, dict]:
    """Datasets of the user's own in the data dir, by name -> their dataset.json (one source of truth:
    the folder describes itself; nothing else records them)."""
    base = Path(data_dir).expanduser() if data_dir else default_data_dir()
    if not base.is_dir():
        return {}
    found = {}
    for folder in sorted(base.iterdir()):
        info = read_json_object(folder / "dataset.json") if folder.is_dir() and folder.name not in CATALOG else {}
        if info.get("kind") == USER_KIND:
            found[folder.name] = info
    return found


def rebuild_command(name: str, info: dict) -> str:
    """The command that makes dataset ``name`` again, given its dataset.json: `ufgir datasets add ...
    --force` for one of the user's own (from the folder it came from), `ufgir download NAME --force` else."""
    src = str(info.get("source") or "")
    if info.get("kind") == USER_KIND:
        flag = "--from-csv" if src.lower().endswith(".csv") else "--from-folder"
        return f"ufgir datasets add {name} {flag} {src or 'DIR'} --force"
    if info.get("origin") == "user" and src:  # made from a copy of the user's: `--force` alone goes to the mirrors
        flag = "--url" if "://" in src else "--from-folder" if Path(src).is_dir() else "--archive"
        return f"ufgir download {name} {flag} {src} --force"
    return f"ufgir download {name} --force"
