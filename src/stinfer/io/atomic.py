"""Writing outputs atomically, never overwriting results silently, never deleting others' files.

Every file stinfer writes goes through :func:`atomic_output`: the content is written to a
temporary file in the destination folder, flushed to disk (``fsync``) and moved into place with
:func:`os.replace` only when writing finished, so an interrupted run never leaves a half-written
output. A folder that must appear whole (a saved model, a training run) is written into a
temporary sibling folder and renamed into place by :func:`atomic_folder`.

Temporary names start with ``.`` and hold :data:`TEMP_TAG` and the writer's process id
(``.<name>.stinfer-tmp-<pid>-<random>``); the next stinfer writing into the same folder removes
those a killed run left behind (:func:`remove_stale_temporaries`), and nothing else.
Files are created with ``0o666 & ~umask`` and folders with ``0o777 & ~umask``, like any tool.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
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
        remove_stale_temporaries(path.parent)
        fd, tmp_name = tempfile.mkstemp(
            prefix=temporary_prefix(path.name), suffix=path.suffix, dir=path.parent
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
        _fsync_path(tmp_path)
        os.replace(tmp_path, path)
        _fsync_path(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


TEMP_TAG = "stinfer-tmp"
"""Part of every temporary file or folder name stinfer writes (``.<name>.stinfer-tmp-<pid>-...``)."""

STALE_AFTER_SECONDS = 5.0
"""A leftover temporary is removed only when its writer is gone and it is at least this old."""

_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\." + TEMP_TAG + r"-(?P<pid>[0-9]+)-(?P<rest>.*)$")
_ASIDE_SUFFIX = ".replaced"  # an earlier output folder renamed aside while its successor moves in
_SWEPT_FOLDERS: set[Path] = set()


def temporary_prefix(name: str) -> str:
    """The start of the name of a temporary for the output ``name`` written by this process."""
    return f".{name}.{TEMP_TAG}-{os.getpid()}-"


def _process_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a process id stinfer wrote: treat as in use, never remove
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists but belongs to another user
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and folders a killed stinfer run left in ``folder``.

    Only entries whose name matches stinfer's temporary pattern (:func:`temporary_prefix`),
    whose writing process no longer runs on this machine and which are older than
    :data:`STALE_AFTER_SECONDS` are removed; anything else is left alone. An earlier output
    folder that :func:`atomic_folder` had renamed aside when its process was killed is renamed
    back when nothing took its place. Each folder is swept once per process. Returns the
    removed paths.
    """
    folder = Path(folder)
    key = folder.absolute()
    if key in _SWEPT_FOLDERS:
        return []
    _SWEPT_FOLDERS.add(key)
    removed = []
    now = time.time()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if match is None or _process_alive(int(match["pid"])):
            continue
        try:
            if now - entry.stat(follow_symlinks=False).st_mtime < STALE_AFTER_SECONDS:
                continue
            original = folder / match["name"]
            if match["rest"].endswith(_ASIDE_SUFFIX) and not original.exists():
                os.rename(entry.path, original)  # the swap never finished: keep the earlier one
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        except OSError:
            continue
        removed.append(Path(entry.path))
    return removed


def _fsync_path(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to disk, where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # a folder cannot be fsynced on every platform/filesystem; the rename still holds
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder; when the block succeeds it becomes ``path``, whole.

    The temporary folder is a sibling of ``path`` (same filesystem, so the rename is atomic).
    An existing ``path`` is renamed aside first and removed only once the new folder is in
    place; the caller decides beforehand whether it may be replaced (a folder stinfer wrote,
    with ``overwrite``: see :func:`check_replaceable_folder`). On any exception, Ctrl-C or
    SIGTERM included, the temporary folder is removed and ``path`` is left as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path.parent)
        tmp = Path(tempfile.mkdtemp(prefix=temporary_prefix(path.name), dir=path.parent))
    except OSError as error:
        raise InputError(
            f"{path}: cannot write the output in {path.parent} ({error.strerror or error}); "
            "choose another --out."
        ) from error
    os.chmod(tmp, 0o777 & ~_current_umask())  # mkdtemp makes it owner-only
    aside = tmp.with_name(tmp.name + _ASIDE_SUFFIX)
    try:
        yield tmp
        _fsync_path(tmp)
        if path.exists():
            os.rename(path, aside)
        os.rename(tmp, path)
        _fsync_path(path.parent)
    finally:
        if aside.exists() and not path.exists():
            os.rename(aside, path)  # interrupted between the two renames: put the earlier back
        for leftover in (tmp, aside):
            if leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)


def visible_entries(folder: Path) -> set[str]:
    """Names in ``folder`` other than stinfer's own temporaries (empty if it does not exist)."""
    if not folder.is_dir():
        return set()
    return {name for name in os.listdir(folder) if not _TEMP_NAME.match(name)}


def check_replaceable_folder(
    path: str | os.PathLike,
    overwrite: bool,
    is_own: bool,
    own_names: set[str] | frozenset[str],
    what: str,
) -> Path:
    """Check that the output folder ``path`` may be (re)written; return it as a Path.

    The one rule for every folder stinfer writes: a new or empty folder is fine; a non-empty
    folder that stinfer does not recognise as its own output (``is_own`` false: no manifest,
    no saved-model header) is refused with or without ``overwrite``, so nothing stinfer did not
    write is ever deleted; one of stinfer's own folders is replaced only with ``overwrite`` and
    only when it holds nothing but names stinfer writes there (``own_names``). ``what`` names
    the output in messages ("saved model", "benchmark output").
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{path}: exists and is not a folder; give a folder for the {what}.")
    entries = visible_entries(path)
    if not entries:
        return path
    if not is_own:
        raise InputError(
            f"{path}: folder exists, is not empty and is not a {what} stinfer wrote; "
            "stinfer never replaces files it did not write (not even with --overwrite): "
            "choose another folder or empty this one."
        )
    if not overwrite:
        raise InputError(
            f"{path}: already exists; pass --overwrite (overwrite=True) to replace it."
        )
    foreign = sorted(entries - set(own_names))
    if foreign:
        raise InputError(
            f"{path}: holds files stinfer did not write ({', '.join(foreign[:5])}"
            f"{', ...' if len(foreign) > 5 else ''}); --overwrite replaces only stinfer's own "
            "outputs: move them out or choose another folder."
        )
    return path


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
