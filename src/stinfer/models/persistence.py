"""The saved-model folder every model shares: ``config.json`` + ``weights.safetensors`` (+ extras).

``config.json`` (format version 1)::

    {
      "model_type": "stevs",           # the registry name (stinfer.models.registry)
      "format_version": 1,              # FORMAT_VERSION of the stinfer that wrote it
      "stinfer_version": "0.1.0",
      "config": {...},                  # the model's config dataclass, as a plain dict
      "state": {...}                    # fitted values that are not arrays (genes, centres...)
    }

``weights.safetensors`` holds every array: the torch module's state dict under its own names
(for models with a module) and the fitted arrays under the names the model's ``load`` reads
(a k-NN's training coordinates, a ridge's coefficients, CoxFormer's embedding table).
Weights go through safetensors and configs through JSON, so loading a model never unpickles
anything. The folder is written whole or not at all (:func:`model_folder`: a temporary sibling
renamed into place); an existing saved model is replaced only with ``overwrite``, and a folder
that is not a saved model, or that holds files stinfer did not write, is never replaced.

Folders written before ``model_type`` existed (format version 0: STEvs, CoxFormer spatial and
CoxFormer embeddings) are recognised by their files (:data:`LEGACY_LAYOUTS`) and still load.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stinfer.errors import InputError
from stinfer.io.atomic import atomic_folder, atomic_output, check_replaceable_folder
from stinfer.train import is_global_zero

WEIGHTS_FILE = "weights.safetensors"
CONFIG_FILE = "config.json"
FORMAT_VERSION = 1
"""The ``config.json`` layout this stinfer writes and the newest it reads (0: no header)."""

LEGACY_LAYOUTS: dict[str, tuple[str, ...]] = {
    "stevs": (CONFIG_FILE, WEIGHTS_FILE, "genes.json"),
    "coxformer_spatial": (CONFIG_FILE, WEIGHTS_FILE, "state.json", "embeddings.npy"),
    "coxformer_embeddings": (CONFIG_FILE, "autoencoder.pt", "graph.npz", "completed.npz"),
}
"""The files of each model type saved before format version 1 (no ``model_type`` field)."""


def read_model_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every array of ``weights.safetensors`` in ``directory`` (safetensors: no pickle runs)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(directory) / WEIGHTS_FILE
    try:
        return load_file(str(path))
    except SafetensorError as error:
        raise InputError(f"{path}: not a readable safetensors file ({error}).") from error


# --------------------------------------------------------------------------- format version 1
@dataclass
class SavedModel:
    """A saved-model folder after its ``config.json`` was read and checked.

    ``config`` is the model's config dict and ``state`` its fitted non-array values; for a
    format-0 folder ``config`` is the whole ``config.json`` and ``state`` is empty.
    """

    directory: Path
    model_type: str
    format_version: int
    config: dict[str, Any]
    state: dict[str, Any]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every array of ``weights.safetensors`` (safetensors: no pickle is executed)."""
        return read_model_weights(self.directory)


RUN_FILES = frozenset({"train_history.json", "embeddings.h5ad"})
"""Files stinfer writes into a model folder beside the model's own (``stinfer train``'s history,
the gene embeddings of a CoxFormer embeddings model)."""

MODEL_FOLDER_FILES = frozenset(
    {
        CONFIG_FILE,
        WEIGHTS_FILE,
        *RUN_FILES,
        *(n for names in LEGACY_LAYOUTS.values() for n in names),
    }
)
"""Every name stinfer may have written into a saved-model folder; ``overwrite`` replaces a
folder holding only these (anything else is a user's file, and the folder is refused)."""


def _is_saved_model(directory: Path) -> bool:
    try:
        read_model_header(directory)
    except InputError:
        return False
    return True


def check_model_destination(directory: str | os.PathLike, overwrite: bool = False) -> Path:
    """Check, before any work, that a model may be saved into ``directory``; return it.

    A new or empty folder is fine; an earlier saved model (``config.json`` readable by
    :func:`read_model_header`) needs ``overwrite`` and must hold only names stinfer writes
    there (:data:`MODEL_FOLDER_FILES`); any other non-empty folder is an :class:`InputError`,
    with or without ``overwrite``, so no file stinfer did not write is ever deleted.
    """
    directory = Path(directory)
    is_own = directory.is_dir() and _is_saved_model(directory)
    return check_replaceable_folder(directory, overwrite, is_own, MODEL_FOLDER_FILES, "saved model")


@contextlib.contextmanager
def model_folder(directory: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder that replaces ``directory`` whole when the block ends.

    Checks ``directory`` with :func:`check_model_destination`, then writes through
    :func:`stinfer.io.atomic.atomic_folder`: an interrupted save leaves ``directory`` as it
    was, and an earlier model is removed only once the new one is in place. Write the model
    with :func:`write_model_files` (and any :data:`RUN_FILES`) into the yielded folder.
    """
    directory = check_model_destination(directory, overwrite)
    with atomic_folder(directory) as tmp:
        yield tmp


def write_model_folder(
    directory: str | os.PathLike,
    model_type: str,
    config: Mapping[str, Any],
    state: Mapping[str, Any] | None = None,
    module: torch.nn.Module | None = None,
    arrays: Mapping[str, np.ndarray | torch.Tensor] | None = None,
    overwrite: bool = False,
) -> Path:
    """Save a model into ``directory`` (created if needed) in the format of this module.

    Parameters
    ----------
    model_type
        The registry name written into ``config.json`` (e.g. ``"stevs"``).
    config, state
        JSON-serialisable dicts: the model's config and its fitted non-array values.
    module
        A torch module whose state dict goes into ``weights.safetensors`` under its own names.
    arrays
        Further arrays (numpy or torch) stored beside the module's weights; a name that is
        also a weight of ``module`` is a bug (``ValueError``).
    overwrite
        Replace an earlier saved model in ``directory``; without it an existing saved model is
        an :class:`InputError` and nothing is written (:func:`check_model_destination`).

    In a DDP run only rank 0 writes (every rank holds the same weights after training); the
    other ranks return ``directory`` without touching it.
    """
    if not is_global_zero():
        return Path(directory)
    directory = check_model_destination(directory, overwrite)
    with model_folder(directory, overwrite) as tmp:
        write_model_files(tmp, model_type, config, state, module, arrays)
    return directory


def write_model_files(
    directory: Path,
    model_type: str,
    config: Mapping[str, Any],
    state: Mapping[str, Any] | None = None,
    module: torch.nn.Module | None = None,
    arrays: Mapping[str, np.ndarray | torch.Tensor] | None = None,
) -> None:
    """Write ``config.json`` and ``weights.safetensors`` into the new folder ``directory``
    (the one :func:`model_folder` yields); see :func:`write_model_folder` for the arguments."""
    from safetensors.torch import save_file

    from stinfer import __version__

    tensors = {}
    if module is not None:
        tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    for name, value in (arrays or {}).items():
        if name in tensors:
            raise ValueError(f"array {name!r} has the name of a module weight.")
        if isinstance(value, torch.Tensor):
            tensors[name] = value.detach().cpu().contiguous()
        else:
            tensors[name] = torch.from_numpy(np.ascontiguousarray(value))
    header = {
        "model_type": model_type,
        "format_version": FORMAT_VERSION,
        "stinfer_version": __version__,
        "config": dict(config),
        "state": dict(state or {}),
    }
    text = json.dumps(header, indent=2)  # a value JSON cannot hold fails before any file
    with atomic_output(directory / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp))
    with atomic_output(directory / CONFIG_FILE) as tmp:
        tmp.write_text(text)


def _legacy_model_type(directory: Path, header: dict[str, Any]) -> str:
    """The type of a folder saved before format version 1, from its files (one must match)."""
    matches = [
        model_type
        for model_type, files in LEGACY_LAYOUTS.items()
        if all((directory / name).is_file() for name in files)
    ]
    if matches == ["stevs"] and not {"module", "training"} <= set(header):
        matches = []
    if len(matches) != 1:
        layouts = "; ".join(f"{t}: {', '.join(files)}" for t, files in LEGACY_LAYOUTS.items())
        raise InputError(
            f"{directory / CONFIG_FILE}: no 'model_type' field, and the folder's files match "
            f"{'no' if not matches else 'more than one'} model saved by an earlier stinfer "
            f"({layouts}); save the model again with this stinfer."
        )
    return matches[0]


def read_model_header(directory: str | os.PathLike) -> SavedModel:
    """Read and check ``directory/config.json``: the model type and the format version.

    Raises
    ------
    InputError
        The folder or ``config.json`` is missing or not JSON; ``model_type`` is missing or not
        a string; ``format_version`` is missing, not a positive integer, or newer than
        :data:`FORMAT_VERSION` (the model was saved by a newer stinfer); or a format-0 folder
        (no header) matches no earlier layout. Each message names the file and the field.
    """
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise InputError(f"{directory}: not a saved model; missing {CONFIG_FILE}.")
    try:
        header = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: not valid JSON ({error}).") from error
    if not isinstance(header, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(header).__name__}.")
    if "model_type" not in header and "format_version" not in header:
        return SavedModel(directory, _legacy_model_type(directory, header), 0, header, {})
    model_type = header.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise InputError(
            f"{path}: field 'model_type' is {model_type!r}; it must name the model's type "
            "(e.g. 'stevs'), see stinfer.models.list_models()."
        )
    version = header.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise InputError(
            f"{path}: field 'format_version' must be an integer >= 1, got {version!r}."
        )
    if version > FORMAT_VERSION:
        from stinfer import __version__

        raise InputError(
            f"{path}: field 'format_version' is {version}, newer than format {FORMAT_VERSION} "
            f"that stinfer {__version__} reads (saved by stinfer "
            f"{header.get('stinfer_version', '?')}); upgrade stinfer to load this model."
        )
    config, state = header.get("config", {}), header.get("state", {})
    if not isinstance(config, dict) or not isinstance(state, dict):
        raise InputError(f"{path}: fields 'config' and 'state' must be JSON objects.")
    return SavedModel(directory, model_type, version, config, state)


def read_saved_model(
    directory: str | os.PathLike, model_type: str, legacy_files: Sequence[str] = ()
) -> SavedModel:
    """:func:`read_model_header`, checked to be a ``model_type`` folder with all its files.

    ``legacy_files`` are the files a format-0 folder must hold besides ``config.json``; a
    format-1 folder must hold ``weights.safetensors``. A folder of another type is an
    :class:`InputError` (a CoxFormer folder is never parsed as STEvs).
    """
    if not (Path(directory) / CONFIG_FILE).is_file():
        raise InputError(f"{directory}: not a saved {model_type} model; missing {CONFIG_FILE}.")
    saved = read_model_header(directory)
    if saved.model_type != model_type:
        found = (
            f"holds a {saved.model_type!r} model (saved before config.json named its type)"
            if saved.format_version == 0
            else f"field 'model_type' is {saved.model_type!r}"
        )
        raise InputError(
            f"{saved.directory / CONFIG_FILE}: {found}, not {model_type!r}; load it with "
            "stinfer.models.load(path), which picks the class."
        )
    required = legacy_files if saved.format_version == 0 else (WEIGHTS_FILE,)
    missing = [name for name in required if not (saved.directory / name).is_file()]
    if missing:
        raise InputError(
            f"{saved.directory}: not a complete saved {model_type} model; missing "
            f"{', '.join(missing)}."
        )
    return saved
