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

from dataclasses import dataclass
from typing import Literal

from ..errors import DatasetError

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
    """One catalog entry. Expected sizes are ``None`` only for generated datasets."""

    name: str
    title: str
    kind: Literal["archive", "generated"]
    labels: Literal["anno", "cub", "generated"]
    num_classes: int | None
    train_val: int | None
    test: int | None
    archive: str | None = None  # the file to get by hand, and its name in the download cache
    sha256: str | None = None  # None: unknown, the computed hash is recorded in dataset.json
    image_dir: str = ""  # set: the older file-name layout is accepted besides ``anno``
    rounds: tuple[int, ...] = ()  # `anno` scheme: the R<r>/ folders to pool, one class id per label
    sources: tuple[Source, ...] = ()  # tried in order by `ufgir download`
    terms: str | None = None  # licence / terms of use of the dataset itself

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


def get_spec(name: str) -> DatasetSpec:
    """The catalog entry called ``name``; an unknown name lists the known ones."""
    try:
        return CATALOG[name]
    except KeyError:
        raise DatasetError(f"unknown dataset {name!r}; choose one of: {', '.join(CATALOG)}") from None
