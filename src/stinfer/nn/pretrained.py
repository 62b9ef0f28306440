"""Load pretrained weights from a local file into a module, matching tensors by name and shape.

STEvs uses an ImageNet-pretrained Swin-T (Sec. 3.1, C.2.1); machines without internet need the
weights from a file the user names. :func:`load_matching_weights` reads ``.safetensors`` or
``torch.save`` files (``weights_only=True``), unwraps common checkpoint containers
(``state_dict``, ``model``, ...), strips wrapper prefixes (``module.``, ``model.``,
``backbone.``, ...), optionally converts the names with a timm checkpoint filter (see
:func:`timm_checkpoint_filter`), and loads every tensor whose name and shape match. What was
loaded and skipped is returned in a :class:`LoadReport` and logged.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from stinfer.errors import InputError

__all__ = [
    "DEFAULT_PREFIXES",
    "LoadReport",
    "load_matching_weights",
    "read_state_dict",
    "timm_checkpoint_filter",
]

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]
StateDictTransform = Callable[[StateDict], StateDict]

DEFAULT_PREFIXES: tuple[str, ...] = (
    "module.",
    "_orig_mod.",
    "model.",
    "backbone.",
    "encoder.",
    "image_encoder.",
)
_CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


@dataclass
class LoadReport:
    """What :func:`load_matching_weights` did.

    Attributes
    ----------
    path
        The weights file.
    loaded
        Module parameter/buffer names that received a tensor from the file.
    skipped_shape
        ``(name, shape in file, shape in module)`` for names that matched but whose shape did not.
    unexpected
        Names in the file with no counterpart in the module.
    missing
        Module names that the file did not provide (they keep their initial values).
    """

    path: Path
    loaded: list[str] = field(default_factory=list)
    skipped_shape: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    @property
    def num_loaded(self) -> int:
        return len(self.loaded)

    @property
    def num_skipped(self) -> int:
        """Tensors of the file that were not loaded (shape mismatch or no such name)."""
        return len(self.skipped_shape) + len(self.unexpected)

    def summary(self) -> str:
        """One line: loaded / skipped / missing counts."""
        return (
            f"{self.path.name}: loaded {self.num_loaded} tensors, skipped {self.num_skipped} "
            f"({len(self.skipped_shape)} shape mismatches, {len(self.unexpected)} unknown names), "
            f"{len(self.missing)} module tensors left at their initial values"
        )


def read_state_dict(path: str | Path) -> StateDict:
    """Read a flat ``name -> tensor`` mapping from a safetensors or ``torch.save`` file.

    ``torch.load`` runs with ``weights_only=True`` (no pickled code is executed). Checkpoints that
    wrap the weights (``{"state_dict": ...}``, ``{"model": ...}``, Lightning checkpoints) are
    unwrapped.

    Raises
    ------
    InputError
        If the file is missing, has an unknown suffix, or holds no tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"pretrained weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        content: object = load_file(str(path), device="cpu")
    elif path.suffix in _TORCH_SUFFIXES:
        content = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise InputError(
            f"unknown weights format {path.suffix!r} for {path}; use .safetensors or "
            f"one of {_TORCH_SUFFIXES} (a torch.save state dict)"
        )
    while isinstance(content, Mapping):
        inner = next(
            (content[k] for k in _CONTAINER_KEYS if isinstance(content.get(k), Mapping)), None
        )
        if inner is None or any(isinstance(v, torch.Tensor) for v in content.values()):
            break
        content = inner
    tensors = (
        {str(k): v for k, v in content.items() if isinstance(v, torch.Tensor)}
        if isinstance(content, Mapping)
        else {}
    )
    if not tensors:
        raise InputError(f"{path} holds no tensors (expected a state dict of named tensors)")
    return tensors


def _strip_prefixes(name: str, known: set[str], prefixes: Sequence[str]) -> str:
    """Strip wrapper prefixes from ``name`` until it names a module tensor (or cannot be stripped)."""
    while name not in known:
        prefix = next((p for p in prefixes if name.startswith(p)), None)
        if prefix is None:
            break
        name = name[len(prefix) :]
    return name


def timm_checkpoint_filter(model: nn.Module) -> StateDictTransform | None:
    """The timm ``checkpoint_filter_fn`` of ``model``'s family, bound to ``model``, if it has one.

    timm uses these functions to convert original checkpoints (e.g. Microsoft's Swin release) to
    its names and to resize position tables; for Swin with a window other than 7 it interpolates
    the relative position bias tables, so they load instead of being skipped for their shape.
    """
    module = sys.modules.get(type(model).__module__)
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    if filter_fn is None:
        return None

    def transform(state_dict: StateDict) -> StateDict:
        return filter_fn(state_dict, model)

    return transform


def load_matching_weights(
    module: nn.Module,
    path: str | Path,
    transform: StateDictTransform | None = None,
    prefixes: Sequence[str] = DEFAULT_PREFIXES,
) -> LoadReport:
    """Load the tensors of ``path`` whose name and shape match ``module``'s state dict.

    Parameters
    ----------
    module
        The module to fill (e.g. a timm backbone). Modified in place.
    path
        A ``.safetensors`` file or a ``torch.save`` state dict (``.pth``, ``.pt``, ``.bin``,
        ``.ckpt``).
    transform
        Optional conversion applied to the (prefix-stripped) state dict before matching, e.g.
        :func:`timm_checkpoint_filter`. If it fails, the unconverted tensors are matched and a
        warning is logged.
    prefixes
        Wrapper prefixes stripped (repeatedly) from file names that do not name a module tensor.

    Returns
    -------
    LoadReport
        Names loaded, skipped for their shape, unknown, and left missing; also logged at INFO.

    Raises
    ------
    InputError
        If the file cannot be read, or not a single tensor matched (the file is for another
        architecture or uses another naming scheme; e.g. Hugging Face ``transformers`` Swin
        checkpoints are not timm checkpoints).
    """
    path = Path(path)
    target = module.state_dict()
    known = set(target)
    state_dict = {_strip_prefixes(k, known, prefixes): v for k, v in read_state_dict(path).items()}
    if transform is not None:
        try:
            state_dict = transform(state_dict)
        except Exception as error:  # a foreign checkpoint may not fit the filter's assumptions
            logger.warning(
                "checkpoint conversion failed for %s (%s); matching raw names", path, error
            )

    report = LoadReport(path=path)
    matched: StateDict = {}
    for name, tensor in state_dict.items():
        if name not in known:
            report.unexpected.append(name)
        elif tuple(tensor.shape) != tuple(target[name].shape):
            report.skipped_shape.append((name, tuple(tensor.shape), tuple(target[name].shape)))
        else:
            matched[name] = tensor
    report.loaded = sorted(matched)
    report.missing = sorted(known - set(matched))
    if not matched:
        raise InputError(
            f"no tensor of {path} matches the {type(module).__name__} it should initialise "
            f"({len(report.skipped_shape)} shape mismatches, {len(report.unexpected)} unknown "
            "names); check that the file is a timm/torch checkpoint of the same architecture"
        )
    module.load_state_dict(matched, strict=False)
    logger.info("pretrained weights %s", report.summary())
    return report
