"""Files of a Hugging Face Hub dataset repo, fetched by ``huggingface_hub`` and nothing else.

The client brings what a hand-written download would have to redo: the shared cache (a file is
fetched once for every entry that uses it), resumption of a transfer cut mid-file, ``HF_TOKEN``,
``HF_HUB_OFFLINE`` (cached files only). Only the file endpoint is used, never a repo listing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..errors import DatasetError
from ..paths import hub_client_settings
from .fetch import check_host

Progress = Callable[[str, int, int | None], None]


def hub_file(repo: str, path: str, revision: str, progress: Progress, force: bool = False) -> tuple[Path, str]:
    """The local copy of ``path`` in dataset repo ``repo`` at ``revision``, and the commit it came from.

    Any failure (offline, no such repo or file, HTTP error, cut transfer) is one DatasetError line
    naming the file, so the caller can report it and try its next source; a host name that does not
    resolve is :class:`~.fetch.Unreachable`, which ends the attempt (every source would fail alike).
    """
    from huggingface_hub import hf_hub_download

    check_hub()
    try:
        local = hf_hub_download(
            repo,
            path,
            repo_type="dataset",
            revision=revision,
            **hub_client_settings(),
            force_download=force,
            tqdm_class=_bar_class(progress),
        )
    except Exception as e:  # the client raises many types (HTTP, offline, cache); each means this file failed
        reason = " ".join(str(e).split("\n", 1)[0].split()) or type(e).__name__
        raise DatasetError(f"hf://datasets/{repo}/{path}@{revision}: {reason}") from None
    local = Path(local)
    # the cache keeps each file at <repo folder>/snapshots/<commit>/<path>
    commit = local.parts[-len(Path(path).parts) - 1]
    return local, commit


def check_hub() -> None:
    """:class:`~.fetch.Unreachable` when the Hub's host does not resolve, before the client's retries start
    (in offline mode, ``HF_HUB_OFFLINE``, the client reads its cache only: nothing to check)."""
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        check_host(hub_client_settings()["endpoint"] or constants.ENDPOINT)


def _bar_class(progress: Progress) -> type:
    """A silent tqdm whose byte counts go to ``progress("download", ...)`` (rich draws them in the CLI)."""
    from huggingface_hub.utils import tqdm

    class _Bar(tqdm):
        def __init__(self, *args, **kwargs) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> None:
            self.n += n or 0  # a disabled tqdm counts nothing itself
            progress("download", int(self.n), self.total)

    return _Bar
