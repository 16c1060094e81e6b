"""Reading a model that `ufgir push` put on the Hugging Face Hub: ``hf://OWNER/NAME[@REVISION]``.

A pushed repo holds the model as a ufgir safetensors file (the PETL delta or every tensor; see
:mod:`.delta`) and ``ufgir.json``, the manifest: each file's sha256 and size, the backbone's timm tag
and tensor hash, the method, the class names. Files are fetched with ``hf_hub_download`` into the Hub's
own cache (``HF_HUB_CACHE``, shared with timm and every other client; ``HF_HUB_OFFLINE`` serves cached
files only), the manifest first and every later file at the commit the manifest came from, so a push
that lands meanwhile cannot mix two versions. A file whose bytes do not match the manifest is refused;
nothing is unpickled (JSON and safetensors only).

Writing a repo is ``ufgir_cli.ship.hub``'s job; it shares the names and the format defined here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import HubError
from ..io import file_sha256
from ..paths import HubRef, hub_client_settings
from .delta import read_safetensors_metadata

MANIFEST = "ufgir.json"
HUB_FORMAT = "ufgir-hub"
HUB_FORMAT_VERSION = 1
ADAPTER_FILE = "ufgir_adapter.safetensors"  # the PETL delta: re-attaches to the backbone's timm weights
MODEL_FILE = "ufgir_model.safetensors"  # every tensor (timm's own copy, if any, is model.safetensors)
RECIPE_FILE = "recipe.toml"
CLASSES_FILE = "classes.csv"
TIMM_CONFIG, TIMM_WEIGHTS = "config.json", "model.safetensors"  # what timm.create_model('hf-hub:...') reads


@dataclass(frozen=True)
class PulledRun:
    """A pushed model's files in the Hub cache, checked against its manifest."""

    ref: HubRef
    commit: str  # the commit every file came from
    manifest: dict
    weights: Path  # the ufgir safetensors file (delta or full)

    @property
    def tag(self) -> str:
        """How results name it: ``hf://OWNER/NAME@<commit>`` (a branch moves, a commit does not)."""
        return str(HubRef(self.ref.owner, self.ref.name, self.commit))

    @property
    def class_names(self) -> list[str] | None:
        names = self.manifest.get("class_names")
        return [str(n) for n in names] if isinstance(names, list) else None

    @property
    def backbone_sha256(self) -> str:
        return str(self.manifest["backbone"]["sha256"])


def _reason(err: Exception) -> str:
    """huggingface_hub's error as one clause, with what to do for the usual ones."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(err, RepositoryNotFoundError):
        return "no such model repo, or a private one: set HF_TOKEN or run `hf auth login`"
    if isinstance(err, RevisionNotFoundError):
        return "no such revision (branch, tag or commit)"
    if isinstance(err, LocalEntryNotFoundError):  # offline, or the Hub unreachable, and not in the cache
        return ("not in the Hub cache, and the Hub cannot be reached (HF_HUB_OFFLINE is set, or no network); "
                "fetch it once online")
    if isinstance(err, EntryNotFoundError):
        return "no such file in the repo"
    return " ".join(str(err).split("\n", 1)[0].split()) or type(err).__name__


def _download(ref: HubRef, filename: str, revision: str) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(ref.repo_id, filename, revision=revision, **hub_client_settings()))
    except Exception as e:  # the client raises many types (HTTP, offline, cache); each means this file failed
        raise HubError(f"{ref}: cannot fetch {filename}: {_reason(e)}") from None


def read_manifest(path: Path, ref: HubRef) -> dict:
    """``ufgir.json`` checked for the keys a pull needs; a one-line HubError otherwise."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise HubError(f"{ref}: {MANIFEST} is not valid JSON ({e}); push the model again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != HUB_FORMAT:
        raise HubError(f"{ref}: {MANIFEST} is not a ufgir manifest; the repo was not written by `ufgir push`")
    if int(manifest.get("format_version", 0)) > HUB_FORMAT_VERSION:
        raise HubError(f"{ref} was pushed by a newer ufgir (manifest format {manifest['format_version']}); upgrade ufgir")
    files, weights = manifest.get("files"), manifest.get("weights")
    if not isinstance(files, dict) or weights not in files or not isinstance(manifest.get("backbone"), dict):
        raise HubError(f"{ref}: {MANIFEST} lacks its files, weights or backbone entries; push the model again")
    return manifest


def verify_file(path: Path, entry: dict, ref: HubRef, name: str) -> None:
    """Refuse a fetched file whose size or sha256 differs from its manifest entry."""
    size, sha = path.stat().st_size, file_sha256(path)
    if size != entry.get("size") or sha != entry.get("sha256"):
        raise HubError(
            f"{ref}: {name} does not match {MANIFEST} (sha256 {sha[:12]}, {size} B; the manifest says "
            f"{str(entry.get('sha256'))[:12]}, {entry.get('size')} B); refused: the repo was changed after "
            "`ufgir push`, push it again"
        )


def pull_run(ref: HubRef) -> PulledRun:
    """Fetch (or find in the cache) a pushed model's manifest and weights; check them against each other."""
    manifest_path = _download(ref, MANIFEST, ref.revision or "main")
    commit = manifest_path.parent.name  # the cache keeps each file at <repo>/snapshots/<commit>/<path>
    manifest = read_manifest(manifest_path, ref)
    name = manifest["weights"]
    weights = _download(ref, name, commit)
    verify_file(weights, manifest["files"][name], ref, name)
    meta = read_safetensors_metadata(weights)
    want = {"method": manifest.get("method"), "num_classes": str(manifest.get("num_classes")),
            "backbone": manifest["backbone"].get("name"), "backbone_sha256": manifest["backbone"].get("sha256"),
            "adapter_only": "true" if manifest.get("adapter_only") else "false"}
    differ = sorted(k for k, v in want.items() if meta.get(k) != v)
    if differ:
        raise HubError(f"{ref}: {name} and {MANIFEST} disagree on {', '.join(differ)}; refused, push the model again")
    return PulledRun(ref, commit, manifest, weights)


__all__ = ["ADAPTER_FILE", "CLASSES_FILE", "HUB_FORMAT", "HUB_FORMAT_VERSION", "MANIFEST", "MODEL_FILE", "RECIPE_FILE",
           "TIMM_CONFIG", "TIMM_WEIGHTS", "PulledRun", "pull_run", "read_manifest", "verify_file"]
