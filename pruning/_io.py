"""Files: atomic writes (a reader never sees a half-written result, and a crash leaves the old file intact),
the one reader of torch files (errors that name the file and the fix), and the short hashes that key caches."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from typing import Any, Callable

import torch

from .errors import MissingInputError, UserInputError

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temp file in ``path``'s folder, then rename it onto ``path``.

    Whatever goes wrong (a full disk, an interrupt), the temp file is removed and ``path`` keeps its previous
    content.

    Raises:
        OSError: ``ENOSPC`` when the disk (or quota) filled up during the write, naming ``path``; anything else
            ``write`` raised, unchanged.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if _disk_full(e):
            previous = "is unchanged" if os.path.exists(path) else "was not written"
            raise OSError(errno.ENOSPC, f"no space left on the device while writing {path}; the file {previous}. "
                                        "Free some space and rerun the same command: the run resumes") from e
        raise


def _disk_full(error: BaseException | None) -> bool:
    """Whether ``error`` or an exception it was raised from is a full disk (torch wraps the OSError in its own)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError) and error.errno in _DISK_FULL:
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: torch derives an archive name from a path's stem
            torch.save(obj, f)

    atomic_write(path, write)


class TorchFileError(UserInputError):
    """A torch file that cannot be read; ``reason`` is what torch said (``"ExceptionType: message"``)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def read_torch_file(path: str | os.PathLike, what: str, fix: str) -> Any:
    """``torch.load`` (weights only, onto the CPU) with errors that name ``what`` and ``path`` and say ``fix``.

    Raises:
        MissingInputError: no file at ``path``.
        TorchFileError: the file is not a torch file, is truncated, or holds objects other than tensors and
            plain containers (a :class:`~pruning.errors.UserInputError`).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingInputError(f"{what} {path!r} does not exist; {fix}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = f"{type(e).__name__}: {e}"
        raise TorchFileError(f"{what} {path!r} could not be read ({reason}); {fix}", reason) from e


def short_hash(obj: Any, length: int = 16, algorithm: str = "sha256") -> str:
    """A short stable hash of JSON-serialisable ``obj`` (dict keys sorted, other objects by ``str``): cache keys,
    fingerprints and file names."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.new(algorithm, text.encode()).hexdigest()[:length]
