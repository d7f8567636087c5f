"""Output directories that never clobber: checked up front, built aside, moved into place last.

Every command that writes a directory (merge, data split, train-splits, eval, score) goes
through here, so a crash leaves either the complete result or nothing, and no input is lost.
A hard kill (SIGKILL, the OOM killer) runs no cleanup: what it leaves beside the target
(`.OUT.partial-*`, or `.OUT.old-*` from an `--overwrite` swap) is tidied by the next run to that
target, which tells it from a run still going by the lock that run holds.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from taskvec.errors import TaskvecError

LOCK_FILE = ".taskvec-lock"  # in a staging directory, locked by its run for the run's lifetime
# A staging directory without a lock file is live if touched this recently: a run just starting
# (before its lock exists) or finishing (after the lock is gone, before the rename).
UNLOCKED_GRACE_SECONDS = 60


def resolve_path(path: str | Path) -> Path:
    """`Path.resolve()`, with a symlink loop as a one-line error naming the path (Python raises
    RuntimeError for it before 3.13, OSError after)."""
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError):
        raise TaskvecError(f"{path}: cannot resolve ({os.strerror(errno.ELOOP)})") from None


def check_output(output: str | Path, inputs: Sequence[str | Path], overwrite: bool) -> Path:
    """Refuse an output that is an input, contains one (replacing it would delete the input),
    lies inside an input directory, holds the current directory, or exists (unless
    `overwrite`), after tidying what killed runs left beside it. Returns it as a Path."""
    output = Path(output)
    target = resolve_path(output)
    if target == Path.cwd().resolve() or target in Path.cwd().resolve().parents:
        raise TaskvecError(f"output {output} holds the current directory; choose another directory")
    for path in inputs:
        source = resolve_path(path)
        if target == source or target in source.parents:
            raise TaskvecError(f"input {path} is inside output {output}; choose another directory")
        if source.is_dir() and source in target.parents:
            raise TaskvecError(f"output {output} is inside input {path}; choose another directory")
    tidy_leftovers(output)
    if output.is_symlink() and not output.exists():  # found only after the whole work, by the rename
        raise TaskvecError(f"output {output} is a link to {os.readlink(output)}, which does not exist; "
                           "remove the link or choose another directory")
    if output.exists():
        if not output.is_dir():
            raise TaskvecError(f"output {output} exists and is not a directory")
        if not overwrite:
            raise TaskvecError(f"output {output} already exists; pass --overwrite to replace it")
    return output


@contextmanager
def staged_directory(output: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory beside `output`; move it into place only on success."""
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = _unused(output.parent, f".{output.name}.partial-")
    lock = None
    try:
        staging.mkdir(mode=0o700)  # in the try: a SIGTERM landing right after it still removes it
        lock = _lock(staging)
        yield staging
        (staging / LOCK_FILE).unlink()  # not part of the result
        staging.chmod(0o777 & ~_umask())  # private while built; the result should not be
        if output.exists():
            if not overwrite:
                raise TaskvecError(f"output {output} already exists; pass --overwrite to replace it")
            retired = output.parent / f".{output.name}.old-{staging.name[-8:]}"  # tied to staging
            retired.mkdir(mode=0o700)
            output.rename(retired / output.name)
            staging.rename(output)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(output)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        if lock is not None:
            os.close(lock)


def tidy_leftovers(output: Path) -> None:
    """Remove the staging directories killed runs to `output` left beside it, and put back an
    output that a killed `--overwrite` had moved aside; says on stderr what it did. Leftovers of
    a run still going (its lock is held) are not touched."""
    if not output.parent.is_dir():
        return
    name = re.escape(output.name)
    entries = sorted(output.parent.iterdir())
    for entry in entries:
        old = re.fullmatch(rf"\.{name}\.old-([a-z0-9_]{{8}})", entry.name)
        if old and not _is_live(output.parent / f".{output.name}.partial-{old[1]}"):
            if not os.path.lexists(output) and (entry / output.name).is_dir():
                (entry / output.name).rename(output)
                _note(f"restored {output} from {entry}, where a killed --overwrite had moved it")
            shutil.rmtree(entry, ignore_errors=True)
            _note(f"removed {entry}, left by a killed --overwrite")
    for entry in entries:
        if re.fullmatch(rf"\.{name}\.partial-[a-z0-9_]{{8}}", entry.name) and not _is_live(entry):
            shutil.rmtree(entry, ignore_errors=True)
            _note(f"removed stale partial output {entry}, left by a run that was killed")


def _unused(parent: Path, prefix: str) -> Path:
    """A name in `parent` that is not taken: `prefix` and 8 random characters."""
    while True:
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        if not os.path.lexists(path):
            return path


def _lock(staging: Path) -> int:
    """Lock a file in `staging` until the returned fd is closed. It is locked under another name
    and then renamed, so no other run ever finds the lock file unlocked while this one lives."""
    fresh = staging / f"{LOCK_FILE}.new"
    fd = os.open(fresh, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # a file system without locks: other runs cannot take it either (_is_live)
        pass
    fresh.rename(staging / LOCK_FILE)
    return fd


def _is_live(staging: Path) -> bool:
    """Whether a running process still owns `staging` (False if it does not exist). When it is
    uncertain (no permission, no locks on this file system), it counts as live."""
    try:
        fd = os.open(staging / LOCK_FILE, os.O_RDWR)
    except FileNotFoundError:
        try:
            return time.time() - staging.stat().st_mtime < UNLOCKED_GRACE_SECONDS
        except FileNotFoundError:
            return False
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held by its run (or locks unsupported)
        return True
    finally:
        os.close(fd)
    return False


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
