"""The saved-model folder every model shares: ``weights.safetensors`` + ``config.json`` (+ extras).

Weights go through safetensors and configs through JSON, so loading a model never unpickles
anything; every file is written atomically and an existing one is kept unless ``overwrite``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from stinfer.errors import InputError
from stinfer.io.atomic import atomic_output

WEIGHTS_FILE = "weights.safetensors"
CONFIG_FILE = "config.json"


def write_model_files(
    directory: str | os.PathLike,
    module: torch.nn.Module,
    config: dict[str, Any],
    overwrite: bool = False,
) -> Path:
    """Write ``module``'s state dict and ``config`` into ``directory`` (created if needed)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    with atomic_output(directory / WEIGHTS_FILE, overwrite) as tmp:
        save_file(state, str(tmp))
    with atomic_output(directory / CONFIG_FILE, overwrite) as tmp:
        tmp.write_text(json.dumps(config, indent=2))
    return directory


def read_model_config(
    directory: str | os.PathLike, required: Sequence[str], model_name: str
) -> dict[str, Any]:
    """The saved config of ``directory``, after checking that all ``required`` files exist."""
    directory = Path(directory)
    missing = [name for name in required if not (directory / name).is_file()]
    if missing:
        raise InputError(f"{directory}: not a saved {model_name}; missing {', '.join(missing)}.")
    return json.loads((directory / CONFIG_FILE).read_text())


def read_model_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict saved by :func:`write_model_files` (safetensors: no pickle is executed)."""
    from safetensors.torch import load_file

    return load_file(str(Path(directory) / WEIGHTS_FILE))
