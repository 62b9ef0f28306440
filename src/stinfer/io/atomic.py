"""Writing outputs atomically, never overwriting results silently.

Every file stinfer writes goes through :func:`atomic_output`: the content is written to a
temporary file in the destination folder and moved into place with :func:`os.replace` only
when writing finished, so an interrupted run never leaves a half-written output.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from stinfer.errors import InputError


def check_writable(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Return ``path`` as a Path after checking it may be written.

    Raises :class:`InputError` when the file exists and ``overwrite`` is false, when the
    destination is an existing directory, or when its nearest existing parent is not a folder
    this process may write to (checked before any work, so a long run does not fail at the end).
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a directory; give a file name for the output.")
    if path.exists() and not overwrite:
        raise InputError(
            f"{path}: already exists; pass --overwrite (overwrite=True) to replace it."
        )
    ancestor = path.absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise InputError(
            f"{path}: cannot write the output: {ancestor} is not a folder stinfer may write "
            "to; choose another --out."
        )
    return path


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write to; move it onto ``path`` when the block succeeds.

    The temporary file lives in the destination folder (same filesystem, so the final rename
    is atomic) and keeps the destination's suffix, so writers that dispatch on the extension
    (``AnnData.write_h5ad``, ``matplotlib.savefig``) behave as for the final name. On any
    exception the temporary file is removed and the destination is left untouched.
    """
    path = check_writable(path, overwrite)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent
        )
    except OSError as error:
        raise InputError(
            f"{path}: cannot write the output in {path.parent} ({error.strerror or error}); "
            "choose another --out."
        ) from error
    # mkstemp creates the file readable by its owner only; outputs get the usual permissions
    os.fchmod(fd, 0o666 & ~_current_umask())
    os.close(fd)
    tmp_path = Path(tmp_name)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _current_umask() -> int:
    """The process's file-creation mask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_h5ad(adata, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write an AnnData to ``path`` atomically (see :func:`atomic_output`)."""
    with atomic_output(path, overwrite) as tmp:
        adata.write_h5ad(tmp)
    return Path(path)


def write_text(text: str, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a text file (JSON, CSV, Markdown) atomically."""
    with atomic_output(path, overwrite) as tmp:
        tmp.write_text(text)
    return Path(path)
