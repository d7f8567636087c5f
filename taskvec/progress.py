"""Progress bars in one place: every long step shows one, on a terminal unless told otherwise."""

from __future__ import annotations

from collections.abc import Iterable


def progress_bar(progress: bool | None, iterable: Iterable | None = None, **options):
    """A tqdm bar: progress=None shows it only on a terminal, True always, False never."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=None if progress is None else not progress, **options)
