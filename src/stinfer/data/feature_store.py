"""A store of frozen per-spot image features, computed once per slide and encoder, then read.

Foundation encoders (UNI, H-optimus, Virchow, Phikon, the GigaPath tile encoder: ViTs of
300 M to 1 B parameters) take minutes per slide on a CPU; their features do not change while
the encoder stays frozen. :class:`FeatureStore` keeps them in a zarr directory so the feature
probe (``feature_ridge`` with ``feature_store``), ``stinfer features`` and any frozen-encoder
model compute them once and read them afterwards.

Layout
------
::

    STORE/                      zarr group; attrs: stinfer_feature_store (format), stinfer_version
      <slide id>/               one group per slide (``uns["stinfer"]["sample_id"]``)
        <feature key>/          one group per feature key (below); attrs: everything of the key
          features              float32 (n_spots, n_features), chunked by spots
          spatial               float64 (n_spots, 2), the spots' obsm["spatial"] (checked on read)

The feature key (:meth:`FeatureExtractor.feature_key`) is ``<encoder>-<16 hex digits>``, the
digest of: the timm encoder name and its extra ``timm.create_model`` arguments; the weights
(``sha256:<digest of the weights file>``, ``hub:<name>`` for timm's hub weights,
``random-seed<N>`` for a seeded random initialisation); the patch in microns (footprint and
output pixel size, resolved against the slide's pixel size; in pixels when that is unknown);
the input scaling: the encoder's timm data config (mean, std, resize), or the description of a
model's own input pipeline (:attr:`FeatureExtractorSpec.input_scaling`; STEvs's
normalisation and per-slide colour transform), so features of the same encoder on differently
scaled patches never share a key; the image's fingerprint (:func:`image_fingerprint`: its
size and the digest of three blocks, so a degraded copy of a section never reads the clean
section's features); a format version.
The group's attributes record each of these in the clear, with the stinfer version, the
weights file's name, the image file's name and the spots' ``obs_names``.

Reading checks that every requested spot is in the group (a slide may ask for a subset of the
spots it was computed for, e.g. the training spots of an intra-slice split) at the same
position; otherwise :class:`~stinfer.errors.InputError` names the store, slide and key. A
group is written whole or not at all: under a temporary name in the slide's group
(``.<key>.stinfer-tmp-<pid>-...``, :mod:`stinfer.io.atomic`'s pattern, so a killed run's
leftover is swept by the next writer), renamed into place when complete. Nothing is ever
overwritten: a key that exists is read. A folder that is not a stinfer feature store is
refused, never written into.

Memory is bounded: patches stream from :func:`~stinfer.data.patches.iter_spot_patches`
``chunk_size`` spots at a time, and each chunk's features are written before the next is read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import anndata as ad
import numpy as np
import pandas as pd
import torch

from stinfer.data.features import backbone_data_config, backbone_features
from stinfer.data.patches import PatchSpec, iter_spot_patches, patch_geometry
from stinfer.errors import InputError
from stinfer.io.atomic import remove_stale_temporaries, temporary_prefix
from stinfer.io.slide_data import image_pixel_size_um, slide_id, slide_meta

logger = logging.getLogger("stinfer")

__all__ = [
    "FEATURE_STORE_FORMAT",
    "FeatureExtractor",
    "FeatureExtractorSpec",
    "FeatureStore",
    "StoredFeatures",
    "module_weights_identity",
    "weights_identity",
]

FEATURE_STORE_FORMAT = 1
"""Layout version, in the store's attributes and in every feature key's digest."""

_STORE_MARKER = "stinfer_feature_store"
_HUB = "hub"
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9_.+-]")
_WEIGHTS_DIGESTS: dict[tuple[str, int, int], str] = {}


# --------------------------------------------------------------------------- what features are
@dataclasses.dataclass(frozen=True)
class FeatureExtractorSpec:
    """Which frozen encoder computes the features, on which patches, and how.

    ``encoder``, ``encoder_kwargs``, ``weights``, ``seed``, ``patch`` and ``input_scaling``
    decide the features (they enter the feature key); ``batch_size``, ``device`` and
    ``chunk_size`` only decide how fast and in how much memory they are computed.

    Attributes
    ----------
    encoder
        A timm model name, built headless by :func:`stinfer.nn.encoders.create_backbone`
        (e.g. ``"vit_large_patch16_224"`` for UNI, ``"vit_base_patch16_224"`` for Phikon).
    encoder_kwargs
        Extra ``timm.create_model`` arguments the weights need (UNI: ``{"init_values": 1e-5}``
        for its LayerScale).
    weights
        ``None`` (random initialisation seeded by ``seed``; nothing downloads), ``"hub"``
        (timm's hub weights of ``encoder``; downloads) or a local weights file.
    seed
        Seeds the random initialisation (and any tensor a weights file leaves unset).
    patch
        The spot patches (:class:`~stinfer.data.patches.PatchSpec`; default 160 px, STEvs
        D.1.2). Fixed-size encoders (ViTs) resize them to their input size.
    batch_size
        Patches per forward pass.
    device
        ``None``: CUDA, then MPS, else CPU.
    chunk_size
        Spots whose patches are held at once (rounded up to a multiple of ``batch_size``).
    input_scaling
        ``None``: patches are scaled by the encoder's timm data config
        (:func:`~stinfer.data.features.backbone_features`; the feature probe, ``stinfer
        features``). Otherwise the complete description of a model's own input pipeline, as
        plain JSON with a ``"pipeline"`` name (e.g. STEvs: ``{"pipeline": "stevs",
        "patch_normalization": "minmax", "colour_transform": None, ...}``); it enters the key
        in place of the timm config, and the :class:`FeatureExtractor` must then be given the
        ``encode`` function that implements it.
    """

    encoder: str = "resnet18"
    encoder_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    weights: str | None = None
    seed: int = 0
    patch: PatchSpec = dataclasses.field(default_factory=PatchSpec)
    batch_size: int = 64
    device: str | None = None
    chunk_size: int = 256
    input_scaling: Mapping[str, Any] | None = None


def weights_identity(weights: str | os.PathLike | None, encoder: str, seed: int = 0) -> str:
    """What the key says about the weights: ``sha256:<hex>``, ``hub:<encoder>`` or
    ``random-seed<N>``.

    A weights file is identified by the SHA-256 of its bytes (a renamed or moved copy keeps
    its features; a fine-tuned file of the same name does not), hashed once per process per
    (path, size, modification time).
    """
    if weights is None:
        return f"random-seed{int(seed)}"
    if str(weights) == _HUB:
        return f"{_HUB}:{encoder}"
    path = Path(weights).resolve()
    if not path.is_file():
        raise InputError(f"encoder weights file not found: {weights}")
    stat = path.stat()
    cache_key = (str(path), stat.st_size, stat.st_mtime_ns)
    if cache_key not in _WEIGHTS_DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
        _WEIGHTS_DIGESTS[cache_key] = f"sha256:{digest.hexdigest()}"
    return _WEIGHTS_DIGESTS[cache_key]


def module_weights_identity(module: torch.nn.Module) -> str:
    """``state-sha256:<hex>``: the SHA-256 of a module's state dict (names and tensor bytes).

    For an encoder whose weights no file or seed names any more (a model loaded from a
    folder saved before it recorded :func:`weights_identity`).
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return f"state-sha256:{digest.hexdigest()}"


def _json_value(value: Any) -> Any:
    """``value`` as plain JSON (tuples to lists, numpy scalars to Python, others by repr)."""
    if isinstance(value, Mapping):
        return {str(key): _json_value(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_value(item) for item in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)


class FeatureExtractor:
    """A :class:`FeatureExtractorSpec` with its encoder, built on first use and kept.

    Parameters
    ----------
    spec
        What to compute.
    backbone
        An encoder already built from ``spec`` (e.g. the feature probe's own), used instead of
        building one; ``weights_id`` then says what its weights are when ``spec.weights`` no
        longer does (a model loaded from its saved folder).
    weights_id
        Overrides :func:`weights_identity` of ``spec``.
    encode
        With ``spec.input_scaling`` (and only then): the model's own function from a uint8
        ``(n, 3, H, W)`` batch of at most ``spec.batch_size`` patches to their ``(n, F)``
        features (array or tensor), called batch by batch in spot order instead of the
        timm-scaled forward pass, so the stored features are exactly the model's own.

    Raises
    ------
    ValueError
        When ``encode`` and ``spec.input_scaling`` are not given together, or the input
        scaling has no ``"pipeline"`` name.
    """

    def __init__(
        self,
        spec: FeatureExtractorSpec,
        backbone: torch.nn.Module | None = None,
        weights_id: str | None = None,
        encode: Callable[[np.ndarray], np.ndarray | torch.Tensor] | None = None,
    ) -> None:
        if (spec.input_scaling is None) != (encode is None):
            raise ValueError(
                "FeatureExtractor: give encode together with spec.input_scaling (a model's "
                "own input pipeline), or neither (the encoder's timm input scaling)"
            )
        if spec.input_scaling is not None and not spec.input_scaling.get("pipeline"):
            raise ValueError(
                "FeatureExtractorSpec.input_scaling must name its pipeline "
                "({'pipeline': ..., ...}) so it never matches a timm data config"
            )
        self.spec = spec
        self._backbone = backbone
        self._weights_id = weights_id
        self._encode = encode
        self._input_scaling: dict[str, Any] | None = None

    @property
    def weights_id(self) -> str:
        """:func:`weights_identity` of the spec (hashes a weights file once)."""
        if self._weights_id is None:
            self._weights_id = weights_identity(
                self.spec.weights, self.spec.encoder, self.spec.seed
            )
        return self._weights_id

    @property
    def backbone(self) -> torch.nn.Module:
        """The frozen encoder (built, and its weights loaded, on first access)."""
        if self._backbone is None:
            from stinfer.nn.encoders import create_backbone

            logger.info("feature store: building %s (%s)", self.spec.encoder, self.weights_id)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.spec.seed)
                self._backbone = create_backbone(
                    self.spec.encoder, self.spec.weights, **dict(self.spec.encoder_kwargs)
                )
        return self._backbone

    @property
    def input_scaling(self) -> dict[str, Any]:
        """How patches are scaled for the encoder: ``spec.input_scaling`` when given, else
        the encoder's timm data config (mean, std, resize).

        The timm config is read from an architecture built on the ``meta`` device (no memory,
        no weights), so a store hit never builds the real encoder.
        """
        if self._input_scaling is None and self.spec.input_scaling is not None:
            self._input_scaling = _json_value(dict(self.spec.input_scaling))
        if self._input_scaling is None:
            if self._backbone is not None:
                config = backbone_data_config(self._backbone)
            else:
                from stinfer.nn.encoders import create_backbone

                with torch.device("meta"):
                    skeleton = create_backbone(
                        self.spec.encoder, None, **dict(self.spec.encoder_kwargs)
                    )
                config = backbone_data_config(skeleton)
            self._input_scaling = {
                "divide_by": 255.0,
                "mean": [float(value) for value in config["mean"]],
                "std": [float(value) for value in config["std"]],
                "resize_to": list(config["fixed_size"]) if config["fixed_size"] else None,
            }
        return self._input_scaling

    def patch_in_microns(self, slide: ad.AnnData) -> dict[str, Any]:
        """The patch of ``slide``: footprint and output pixel size in microns, output side.

        Resolved against the slide's pixel size (:func:`patch_geometry`), so the same tissue
        area at the same resolution gives the same key whatever the spec's units; a slide of
        unknown pixel size is described by the spec itself (pixels).
        """
        pixel_size_um = image_pixel_size_um(slide)
        spec = self.spec.patch
        if pixel_size_um is None:
            return {"pixel_size_unknown": True, **_json_value(dataclasses.asdict(spec))}
        geometry = patch_geometry(spec, pixel_size_um)
        footprint_um = geometry.footprint_px * pixel_size_um
        return {
            "footprint_um": round(footprint_um, 4),
            "output_px": geometry.output_px,
            "output_pixel_size_um": round(footprint_um / geometry.output_px, 6),
        }

    def key_parts(self, slide: ad.AnnData) -> dict[str, Any]:
        """Everything the features of ``slide`` depend on, as plain JSON."""
        return {
            "format": FEATURE_STORE_FORMAT,
            "encoder": self.spec.encoder,
            "encoder_kwargs": _json_value(dict(self.spec.encoder_kwargs)),
            "weights": self.weights_id,
            "patch": self.patch_in_microns(slide),
            "input_scaling": self.input_scaling,
            "image": image_fingerprint(slide),
        }

    def feature_key(self, slide: ad.AnnData) -> str:
        """``<encoder>-<16 hex digits of the key parts' SHA-256>``."""
        text = json.dumps(self.key_parts(slide), sort_keys=True)
        return f"{_safe_name(self.spec.encoder)}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"

    def chunk_features(self, patches: np.ndarray) -> np.ndarray:
        """``(n, n_features)`` float32 features of ``(n, 3, H, W)`` uint8 patches."""
        if self._encode is not None:
            size = self.spec.batch_size
            parts = [
                torch.as_tensor(self._encode(patches[start : start + size])).float().cpu().numpy()
                for start in range(0, len(patches), size)
            ]
            return np.concatenate(parts).astype(np.float32, copy=False)
        return backbone_features(
            patches, self.backbone, batch_size=self.spec.batch_size, device=self.spec.device
        )


FINGERPRINT_BLOCK = 1 << 20  # bytes read at the start, middle and end of an image file


def image_fingerprint(slide: ad.AnnData) -> dict[str, Any]:
    """What identifies the pixels of ``slide``'s image, cheaply: the file's size and the
    SHA-256 of its first, middle and last MiB (plus the dataset of an image stored in an
    .h5ad). A degraded copy, a re-scan or a re-export of the section gets another key (its
    bytes differ), while moving or copying the file keeps it, so a store travels with its
    slides. Reading three blocks instead of the whole file keeps a lookup instant for
    multi-GB whole-slide images; an edit that keeps the size and touches none of the three
    blocks would go unnoticed (write a new file, or a new store, for such edits).
    """
    from stinfer.io.slide_image import image_source_file, split_h5ad_image_reference

    image_path = slide_meta(slide)["image_path"]
    if image_path is None:
        raise InputError(f"slide {slide_id(slide)!r} has no image: no features to store.")
    source = image_source_file(image_path)
    try:
        size = source.stat().st_size
        digest = hashlib.sha256()
        with open(source, "rb") as handle:
            for offset in sorted(
                {0, max(0, size // 2 - FINGERPRINT_BLOCK // 2), max(0, size - FINGERPRINT_BLOCK)}
            ):
                handle.seek(offset)
                digest.update(handle.read(FINGERPRINT_BLOCK))
    except OSError as error:
        raise InputError(
            f"{source}: cannot read the image of slide {slide_id(slide)!r} ({error})."
        ) from error
    reference = split_h5ad_image_reference(image_path)
    return {
        "bytes": int(size),
        "sha256_head_middle_tail": digest.hexdigest(),
        "dataset": None if reference is None else str(reference[1]),
    }


def _safe_name(name: str) -> str:
    """``name`` usable as one zarr node and folder name (no ``/``, no leading ``.``/``_``)."""
    safe = _UNSAFE_NAME.sub("_", str(name)).lstrip("._")
    return safe or "unnamed"


# --------------------------------------------------------------------------- the store
class StoredFeatures(NamedTuple):
    """What :meth:`FeatureStore.get_or_compute` returns.

    Attributes
    ----------
    features
        ``(n_spots, n_features)`` float32, in the requested slide's spot order.
    key
        The feature key (:meth:`FeatureExtractor.feature_key`).
    path
        The group's folder (``STORE/<slide>/<key>``).
    computed
        True when this call computed and wrote the features, False when it read them.
    seconds
        Wall-clock time of the call.
    """

    features: np.ndarray
    key: str
    path: Path
    computed: bool
    seconds: float


class FeatureStore:
    """Frozen per-spot features in a zarr directory, one group per (slide, feature key).

    Parameters
    ----------
    path
        The store's folder: new, empty, or a store stinfer wrote (anything else is refused
        with :class:`~stinfer.errors.InputError`). Created on the first write.

    Examples
    --------
    >>> store = FeatureStore("features.zarr")  # doctest: +SKIP
    >>> spec = FeatureExtractorSpec("vit_large_patch16_224", {"init_values": 1e-5},
    ...                             weights="uni.safetensors")  # doctest: +SKIP
    >>> store.get_or_compute(slide, spec).features.shape  # doctest: +SKIP
    (n_spots, 1024)
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._check_store()

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r})"

    def _check_store(self) -> None:
        path = self.path
        if path.exists() and not path.is_dir():
            raise InputError(f"{path}: exists and is not a folder; give a folder for the store.")
        if not path.is_dir() or not any(path.iterdir()):
            return
        attributes = _read_attributes(path)
        if attributes is None or _STORE_MARKER not in attributes:
            raise InputError(
                f"{path}: is a non-empty folder but not a stinfer feature store (no zarr.json "
                f"with the {_STORE_MARKER!r} attribute); choose a new or empty folder."
            )
        if int(attributes[_STORE_MARKER]) > FEATURE_STORE_FORMAT:
            raise InputError(
                f"{path}: written by a newer stinfer (feature store format "
                f"{attributes[_STORE_MARKER]}, this one reads {FEATURE_STORE_FORMAT}); "
                "upgrade stinfer or choose another store."
            )

    def _root(self):
        """The store's root group, created (and marked) when missing."""
        import zarr

        from stinfer import __version__

        try:
            root = zarr.open_group(str(self.path), mode="a")
        except OSError as error:
            raise InputError(
                f"{self.path}: cannot write the feature store ({error.strerror or error}); "
                "choose another folder."
            ) from error
        if _STORE_MARKER not in root.attrs:
            root.attrs.update({_STORE_MARKER: FEATURE_STORE_FORMAT, "stinfer_version": __version__})
        return root

    def group_path(self, slide: ad.AnnData, key: str) -> Path:
        """``STORE/<slide id>/<key>``: where the features of ``slide`` under ``key`` live."""
        return self.path / _safe_name(slide_id(slide)) / key

    def get_or_compute(
        self, slide: ad.AnnData, extractor: FeatureExtractorSpec | FeatureExtractor
    ) -> StoredFeatures:
        """The features of every spot of ``slide``: read when stored, else computed and stored.

        Parameters
        ----------
        slide
            A slide AnnData with its image (``uns["stinfer"]["image_path"]``); only its spot
            names, positions and image are used. May be a subset of the spots stored.
        extractor
            What to compute; a :class:`FeatureExtractor` keeps its encoder between slides.

        Raises
        ------
        InputError
            When the stored group of this slide and key lacks some of the slide's spots, or
            holds them at other positions (another slide of the same sample id), or the image
            cannot be read.
        """
        start = time.perf_counter()
        if isinstance(extractor, FeatureExtractorSpec):
            extractor = FeatureExtractor(extractor)
        key = extractor.feature_key(slide)
        group = self.group_path(slide, key)
        computed = False
        if not (group / "zarr.json").is_file():
            computed = self._write(slide, extractor, key, group)
        features = self._read(slide, key, group)
        seconds = time.perf_counter() - start
        logger.info(
            "feature store: %s %s of slide %s (%d x %d) in %.1f s",
            "computed" if computed else "read",
            key,
            slide_id(slide),
            *features.shape,
            seconds,
        )
        return StoredFeatures(features, key, group, computed, seconds)

    def _read(self, slide: ad.AnnData, key: str, group_path: Path) -> np.ndarray:
        import zarr

        group = zarr.open_group(str(group_path), mode="r")
        stored_names = pd.Index(group.attrs["obs_names"])
        rows = stored_names.get_indexer(slide.obs_names)
        where = f"feature store {self.path}, slide {slide_id(slide)!r}, key {key}"
        missing = np.flatnonzero(rows < 0)
        if len(missing):
            examples = ", ".join(repr(str(name)) for name in slide.obs_names[missing[:3]])
            raise InputError(
                f"{where}: {len(missing)} of the slide's {slide.n_obs} spots (e.g. "
                f"{examples}) are not among the {len(stored_names)} spots whose features were "
                "stored; the store's slide of this name is another slide or another selection "
                "of spots. Compute the whole slide first (stinfer features), or use another "
                "store."
            )
        stored_xy = np.asarray(group["spatial"][...])[rows]
        if not np.allclose(stored_xy, np.asarray(slide.obsm["spatial"], dtype=np.float64)):
            raise InputError(
                f"{where}: the spots are stored at other positions (obsm['spatial']) than the "
                "slide's; the store's slide of this name is another slide. Use another store."
            )
        features = group["features"]
        if np.array_equal(rows, np.arange(len(stored_names))):
            return np.asarray(features[...], dtype=np.float32)
        return np.asarray(features.oindex[rows, :], dtype=np.float32)

    def _write(
        self, slide: ad.AnnData, extractor: FeatureExtractor, key: str, group_path: Path
    ) -> bool:
        """Compute and write the group atomically; False when another writer got there first."""
        from stinfer import __version__

        root = self._root()
        slide_name = group_path.parent.name
        root.require_group(slide_name)
        slide_folder = group_path.parent
        remove_stale_temporaries(slide_folder)
        tmp_folder = slide_folder / f"{temporary_prefix(key)}{uuid.uuid4().hex[:12]}"
        try:
            self._write_group(slide, extractor, tmp_folder)
            meta = slide_meta(slide)
            weights = extractor.spec.weights
            attributes = {
                "feature_key": key,
                **extractor.key_parts(slide),
                "weights_file": Path(weights).name if weights not in (None, _HUB) else None,
                "slide": slide_id(slide),
                "image_file": Path(meta["image_path"]).name if meta["image_path"] else None,
                "stinfer_version": __version__,
                "n_spots": int(slide.n_obs),
                "obs_names": [str(name) for name in slide.obs_names],
            }
            import zarr

            zarr.open_group(str(tmp_folder), mode="r+").attrs.update(attributes)
            if group_path.exists():
                return False  # written meanwhile by another process: keep theirs
            try:
                os.rename(tmp_folder, group_path)
            except OSError:
                # another process (a DDP rank, a Ray task) renamed its copy in between the
                # check and the rename: the same features, keep theirs
                if group_path.exists():
                    return False
                raise
            return True
        finally:
            if tmp_folder.exists():
                shutil.rmtree(tmp_folder, ignore_errors=True)

    def _write_group(self, slide: ad.AnnData, extractor: FeatureExtractor, folder: Path) -> None:
        """``features`` (streamed chunk by chunk) and ``spatial`` into a new group at ``folder``."""
        import zarr

        spec = extractor.spec
        batches = max(1, -(-spec.chunk_size // spec.batch_size))
        chunk_size = batches * spec.batch_size  # whole batches: the same batches as in memory
        group = zarr.open_group(str(folder), mode="w")
        spatial = np.asarray(slide.obsm["spatial"], dtype=np.float64)
        _create_array(group, "spatial", spatial.shape, max(1, len(spatial)), "float64")[...] = (
            spatial
        )
        features = None
        start = 0
        if slide.n_obs:
            for patches in iter_spot_patches(slide, spec.patch, chunk_size):
                values = extractor.chunk_features(patches)
                if features is None:
                    shape = (slide.n_obs, values.shape[1])
                    features = _create_array(group, "features", shape, chunk_size, "float32")
                features[start : start + len(values)] = values
                start += len(values)
        if features is None:
            n_features = int(getattr(extractor.backbone, "num_features", 0))
            _create_array(group, "features", (0, n_features), 1, "float32")


def _create_array(group, name: str, shape: tuple[int, ...], rows: int, dtype: str):
    """A ``shape`` array chunked by ``rows`` spots (whole rows), on zarr 3 or 2."""
    chunks = (max(1, min(rows, max(1, shape[0]))), *(max(1, side) for side in shape[1:]))
    create = getattr(group, "create_array", None) or group.create_dataset
    return create(name, shape=shape, chunks=chunks, dtype=dtype)


def _read_attributes(folder: Path) -> dict[str, Any] | None:
    """The attributes of the zarr group at ``folder`` (v3 ``zarr.json`` or v2 ``.zattrs``)."""
    try:
        if (folder / "zarr.json").is_file():
            content = json.loads((folder / "zarr.json").read_text())
            return (
                dict(content.get("attributes", {})) if content.get("node_type") == "group" else None
            )
        if (folder / ".zgroup").is_file():
            attrs = folder / ".zattrs"
            return json.loads(attrs.read_text()) if attrs.is_file() else {}
    except (OSError, ValueError):
        return None
    return None
