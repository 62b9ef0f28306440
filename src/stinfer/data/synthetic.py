"""Synthetic serial sections with planted structure: the built-in default data.

The generator draws one *anatomy* (tissue outline, layered domains, smooth expression gradients)
and cuts ``n_sections`` serial sections from it. Each section is a slide as every stinfer reader
returns it (built by :func:`stinfer.io.slide_data.make_slide`): an H&E-like RGB image written to
disk, spots on a Visium-like hexagonal or ST-like square grid, and negative-binomial counts whose
means are known exactly, so models can be tested where the answer is known.

What drives expression (log mean = log base + log size factor + loading x program activity):

- **domain programs** (one per domain): on in one domain, off elsewhere. Domains are layered
  bands bent by a low-frequency warp; each domain has its own nuclei density, nuclear size and
  stain colour, so the image shows them (an image-only model can learn them).
- **gradient programs**: smooth functions of the position in the tissue frame (a linear ramp,
  a radial bump, oblique waves). Nothing in the image depends on them, so only coordinates
  predict them (a coordinate-only model can learn them, an image-only one cannot).
- **texture programs**: ``texture_0`` follows the local cellularity (the nuclear area fraction
  of the rendered nuclei mask) and ``texture_1`` the local eosin (stroma) intensity, both
  measured in a ``texture_radius_um`` window around each spot from what was drawn into the
  image. Each is a domain level times a random field that is new in every section, so
  coordinates predict them only through the domain while the image shows them directly.
- **housekeeping genes**: no program; constant up to library size and noise.

Every gene belongs to one program (or is housekeeping) with a gene-specific loading, so the
genes of a program share a spatial pattern: a held-out gene's profile is predictable from its
program mates (the CoxFormer setting); :func:`planted_gene_embeddings` turns the planted
programs into a noisy gene-embedding table for such tests.

Sections differ as serial sections do: the tissue is rotated and shifted on the slide, the
stain vectors and intensities drift, the domain boundaries move a little (a section-specific
warp), and the texture fields are redrawn; the anatomy itself is shared, and
``obsm["tissue_um"]`` gives every spot's position in the shared anatomical frame.

Ground truth stored on each slide
---------------------------------
- ``obs["domain"]`` (categorical ``domain_0`` ...); texture measured in a window of
  ``texture_radius_um`` around each spot: ``obs["nuclei_density"]`` (nuclei per mm^2),
  ``obs["nuclear_fraction"]`` (fraction of the window covered by nuclei; drives ``texture_0``),
  ``obs["stroma_eosin_od"]`` (mean eosin optical density before the section's stain scale;
  drives ``texture_1``); ``obs["size_factor"]`` (library size factor, mean 1);
- ``obsm["tissue_um"]``: (u, v) position in the shared anatomical frame, microns;
- ``obsm["program_activity"]``: spots x programs DataFrame of the activities that drive the means;
- ``layers["true_mean"]``: the exact NB means (expected counts, size factor included);
- ``var["program"]``, ``var["program_kind"]``, ``var["program_loading"]`` (coefficient on the
  program activity in log-mean space), ``var["base_fraction"]``;
- ``uns["synthetic"]``: the config (seed included), the section number, its rotation, shift and
  stain vectors, program names and kinds, and the per-domain image traits.

Resolution. The default ``pixel_size_um = 2.0`` keeps a section of ~1,000 Visium-like spots at
about 2,300 x 1,900 px, so three sections generate in a few seconds on two CPU cores, while a
160 px patch (320 um) around a spot still covers a few spots and shows nuclei of about 2 px
radius (7-9 um wide). The square ST grid needs 4x the tissue area for the same spot count, so
its images have 4x the pixels; use ``pixel_size_um=4.0`` there when speed matters.

Example
-------
>>> from stinfer.data.synthetic import SyntheticConfig, make_synthetic_sections
>>> sections = make_synthetic_sections("synthetic_out", SyntheticConfig(seed=1))  # doctest: +SKIP
>>> sections[0].obs["domain"].value_counts()  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage
from scipy.spatial import cKDTree

from stinfer.errors import InputError
from stinfer.io.atomic import atomic_output, check_writable
from stinfer.io.slide_data import make_slide

logger = logging.getLogger("stinfer")

GRID_GEOMETRY_UM = {
    "hex": (55.0, 100.0),  # Visium: 55 um spots, 100 um centre-to-centre
    "square": (100.0, 200.0),  # legacy ST: 100 um spots, 200 um centre-to-centre
}
# Reference stain optical-density vectors (RGB), as used by Macenko normalisation.
H_STAIN_OD = np.array([0.5626, 0.7201, 0.4062])
E_STAIN_OD = np.array([0.2159, 0.8012, 0.5581])
TEXTURE_PROGRAMS = ("texture_0", "texture_1")  # cellularity, stroma
BACKGROUND_OD = 0.03  # glass around the tissue: near white
COARSE_STEP_UM = 16.0  # resolution at which the smooth fields are evaluated, then upsampled
TEXTURE_LENGTH_UM = 120.0  # correlation length of the per-section texture fields
NUCLEAR_STAIN = 1.6  # hematoxylin concentration inside a nucleus
TISSUE_EDGE = 0.01  # soft edge of the tissue mask, in units of the normalised radius


@dataclass
class SyntheticConfig:
    """Settings of the synthetic tissue; defaults give three ~1,000-spot Visium-like sections.

    The number of gene programs (modules) is ``n_domains + n_gradient_programs +
    n_texture_programs`` (8 by default, see :attr:`n_programs`); ``housekeeping_fraction`` of
    the genes belong to none.
    """

    n_sections: int = 3
    n_domains: int = 4  # layered bands of the anatomy; one domain program each
    n_genes: int = 200
    n_gradient_programs: int = 2  # position-only programs: ramp, radial bump, then waves
    n_texture_programs: int = 2  # 1: cellularity; 2: cellularity and stroma
    housekeeping_fraction: float = 0.1
    grid: str = "hex"  # "hex" (Visium: 55 um spots, 100 um pitch) or "square" (ST: 100/200 um)
    target_spots: int = 1000  # sets the tissue area; the exact count varies per section
    pixel_size_um: float = 2.0  # microns per image pixel (see the module docstring)
    tissue_aspect: float = 1.3  # long / short axis of the tissue outline
    mean_library_size: float = 3000.0  # expected total counts per spot, averaged over spots
    library_size_sd: float = 0.3  # sd of log size factors (log-normal, mean 1)
    nb_theta: float = 5.0  # NB inverse dispersion: variance = mu + mu^2 / theta
    domain_log_fold: float = 2.0  # scale of domain-program loadings (natural-log fold)
    gradient_log_fold: float = 1.2  # scale of gradient-program loadings
    texture_log_fold: float = 1.0  # scale of texture-program loadings
    texture_radius_um: float = 75.0  # window around a spot where texture is measured
    texture_field_sd: float = 0.5  # sd of the per-section log nuclei-density / eosin fields
    max_rotation_deg: float = 8.0  # per-section rotation drawn from +/- this
    max_shift_um: float = 150.0  # per-section shift drawn from +/- this in x and y
    boundary_jitter: float = 0.08  # per-section domain-boundary warp, in normalised depth units
    stain_jitter: float = 0.05  # sd of per-section perturbation of the H and E stain vectors
    seed: int = 0
    sample_prefix: str = "synthetic"  # sample ids are "<prefix>_section<k>", k = 1, 2, ...

    def __post_init__(self) -> None:
        """Check the values where they enter, naming the field and the fix."""
        if self.grid not in GRID_GEOMETRY_UM:
            raise InputError(
                f"SyntheticConfig.grid: {self.grid!r} is not a grid; use 'hex' or 'square'."
            )
        if self.n_sections < 1:
            raise InputError("SyntheticConfig.n_sections: must be at least 1.")
        if self.n_domains < 2:
            raise InputError("SyntheticConfig.n_domains: must be at least 2.")
        if not 0 <= self.n_texture_programs <= len(TEXTURE_PROGRAMS):
            raise InputError("SyntheticConfig.n_texture_programs: must be 0, 1 or 2.")
        if self.n_gradient_programs < 0:
            raise InputError("SyntheticConfig.n_gradient_programs: must be 0 or more.")
        if not 0 <= self.housekeeping_fraction < 1:
            raise InputError("SyntheticConfig.housekeeping_fraction: must be in [0, 1).")
        n_program_genes = self.n_genes - round(self.housekeeping_fraction * self.n_genes)
        if n_program_genes < 2 * self.n_programs:
            raise InputError(
                f"SyntheticConfig.n_genes: {self.n_genes} genes leave fewer than two per "
                f"program ({self.n_programs} programs); raise n_genes."
            )
        if self.target_spots < 10:
            raise InputError("SyntheticConfig.target_spots: must be at least 10.")
        for name in ("pixel_size_um", "mean_library_size", "nb_theta", "texture_radius_um"):
            if not getattr(self, name) > 0:
                raise InputError(f"SyntheticConfig.{name}: must be positive.")

    @property
    def n_programs(self) -> int:
        """Number of gene programs: domain + gradient + texture."""
        return self.n_domains + self.n_gradient_programs + self.n_texture_programs

    @property
    def spot_diameter_um(self) -> float:
        """Spot diameter of the grid, microns."""
        return GRID_GEOMETRY_UM[self.grid][0]

    @property
    def spot_pitch_um(self) -> float:
        """Centre-to-centre distance of neighbouring spots, microns."""
        return GRID_GEOMETRY_UM[self.grid][1]


@dataclass(frozen=True)
class Anatomy:
    """The structure every section shares, in the tissue frame (microns, centred on 0).

    Positions are normalised as ``(u / half_axes_um[0], v / half_axes_um[1])`` before the fields
    below are evaluated, so the outline is the unit circle up to ``outline_*`` harmonics.
    """

    half_axes_um: tuple[float, float]
    outline_amplitudes: np.ndarray  # (2,) harmonics 3 and 5 of the outline radius
    outline_phases: np.ndarray  # (2,)
    depth_amplitudes: np.ndarray  # (2,) warp of the layer depth along u
    depth_frequencies: np.ndarray  # (2,)
    depth_phases: np.ndarray  # (2,)
    depth_thresholds: np.ndarray  # (n_domains - 1,) equal-area cuts of the depth
    gradient_centres: np.ndarray  # (n_gradient, 2) bump centre / wave direction parameters
    gradient_phases: np.ndarray  # (n_gradient,)
    nuclei_per_mm2: np.ndarray  # (n_domains,) nuclei density of each domain
    nuclear_radius_um: np.ndarray  # (n_domains,)
    eosin_od: np.ndarray  # (n_domains,) eosin concentration of the stroma
    hematoxylin_od: np.ndarray  # (n_domains,) background hematoxylin (cytoplasm, matrix)


@dataclass(frozen=True)
class Section:
    """How one section differs from the anatomy: placement, stain, boundary warp."""

    number: int  # 1-based
    rotation_rad: float
    shift_um: np.ndarray  # (2,) tissue centre offset from the canvas centre
    jitter_frequencies: np.ndarray  # (2, 2) wave vectors of the boundary warp
    jitter_phases: np.ndarray  # (2,)
    h_stain: np.ndarray  # (3,) unit OD vector
    e_stain: np.ndarray  # (3,)
    h_scale: float
    e_scale: float


@dataclass(frozen=True)
class Canvas:
    """Image geometry shared by all sections: size in pixels and the tissue centre in microns."""

    height_px: int
    width_px: int
    centre_um: np.ndarray  # (2,) x, y
    coarse_step_px: int


# ----------------------------------------------------------------------------- anatomy


def draw_anatomy(config: SyntheticConfig, rng: np.random.Generator) -> Anatomy:
    """Draw the shared anatomy: outline size from ``target_spots``, domains, gradients, traits."""
    area_per_spot = config.spot_pitch_um**2 * (np.sqrt(3) / 2 if config.grid == "hex" else 1.0)
    area_um2 = config.target_spots * area_per_spot
    long_axis = np.sqrt(area_um2 * config.tissue_aspect / np.pi)
    half_axes = (float(long_axis), float(long_axis / config.tissue_aspect))
    n_domains, n_gradient = config.n_domains, config.n_gradient_programs
    anatomy = Anatomy(
        half_axes_um=half_axes,
        outline_amplitudes=rng.uniform(0.02, 0.06, 2),
        outline_phases=rng.uniform(0, 2 * np.pi, 2),
        depth_amplitudes=rng.uniform(0.08, 0.18, 2),
        depth_frequencies=np.array([rng.uniform(0.6, 1.0), rng.uniform(1.4, 2.0)]),
        depth_phases=rng.uniform(0, 2 * np.pi, 2),
        depth_thresholds=np.zeros(n_domains - 1),
        gradient_centres=rng.uniform(-0.4, 0.4, (n_gradient, 2)),
        gradient_phases=rng.uniform(0, 2 * np.pi, n_gradient),
        nuclei_per_mm2=np.geomspace(2500.0, 7000.0, n_domains)[rng.permutation(n_domains)],
        nuclear_radius_um=np.linspace(3.4, 4.6, n_domains)[rng.permutation(n_domains)],
        eosin_od=np.linspace(0.2, 0.5, n_domains)[rng.permutation(n_domains)],
        hematoxylin_od=np.linspace(0.04, 0.16, n_domains)[rng.permutation(n_domains)],
    )
    return dataclasses.replace(anatomy, depth_thresholds=equal_area_thresholds(anatomy, n_domains))


def outline_radius(anatomy: Anatomy, un: np.ndarray, vn: np.ndarray) -> np.ndarray:
    """Normalised radius of points ``(un, vn)``: below 1 inside the tissue."""
    angle = np.arctan2(vn, un)
    bulge = 1.0 + sum(
        amplitude * np.sin(harmonic * angle + phase)
        for amplitude, harmonic, phase in zip(
            anatomy.outline_amplitudes, (3, 5), anatomy.outline_phases, strict=True
        )
    )
    return np.hypot(un, vn) / bulge


def layer_depth(anatomy: Anatomy, un: np.ndarray, vn: np.ndarray) -> np.ndarray:
    """Depth coordinate whose level sets are the domain boundaries: ``vn`` bent along ``un``."""
    warp = sum(
        amplitude * np.sin(np.pi * frequency * un + phase)
        for amplitude, frequency, phase in zip(
            anatomy.depth_amplitudes, anatomy.depth_frequencies, anatomy.depth_phases, strict=True
        )
    )
    return vn + warp


def equal_area_thresholds(anatomy: Anatomy, n_domains: int) -> np.ndarray:
    """Depth cuts that split the tissue into ``n_domains`` bands of about equal area."""
    axis = np.linspace(-1.2, 1.2, 241)
    un, vn = np.meshgrid(axis, axis)
    inside = outline_radius(anatomy, un, vn) < 1
    depth = layer_depth(anatomy, un[inside], vn[inside])
    return np.quantile(depth, np.arange(1, n_domains) / n_domains)


def gradient_patterns(anatomy: Anatomy, un: np.ndarray, vn: np.ndarray) -> np.ndarray:
    """Activities of the gradient programs at ``(un, vn)``, each in [-1, 1]; shape (n, k).

    Program 0 is a linear ramp along the long axis (across the layers), program 1 a radial
    bump, programs 2+ oblique waves; all depend on position only, never on the image.
    """
    columns = []
    for index, (centre, phase) in enumerate(
        zip(anatomy.gradient_centres, anatomy.gradient_phases, strict=True)
    ):
        if index == 0:
            columns.append(np.clip(un, -1.0, 1.0))
        elif index == 1:
            distance2 = (un - centre[0]) ** 2 + (vn - centre[1]) ** 2
            columns.append(2.0 * np.exp(-distance2 / (2 * 0.4**2)) - 1.0)
        else:
            angle = np.pi * (centre[0] + 0.5)
            columns.append(np.sin(np.pi * (np.cos(angle) * un + np.sin(angle) * vn) + phase))
    return np.stack(columns, axis=-1) if columns else np.zeros((*np.shape(un), 0))


# ----------------------------------------------------------------------------- sections


def draw_section(config: SyntheticConfig, number: int, rng: np.random.Generator) -> Section:
    """Draw one section's placement, stain drift and boundary warp."""

    def perturbed(vector: np.ndarray) -> np.ndarray:
        vector = np.abs(vector + rng.normal(0.0, config.stain_jitter, 3))
        return vector / np.linalg.norm(vector)

    return Section(
        number=number,
        rotation_rad=float(np.deg2rad(rng.uniform(-1, 1) * config.max_rotation_deg)),
        shift_um=rng.uniform(-1, 1, 2) * config.max_shift_um,
        jitter_frequencies=rng.uniform(-1.5, 1.5, (2, 2)),
        jitter_phases=rng.uniform(0, 2 * np.pi, 2),
        h_stain=perturbed(H_STAIN_OD),
        e_stain=perturbed(E_STAIN_OD),
        h_scale=float(np.exp(rng.normal(0.0, 2 * config.stain_jitter))),
        e_scale=float(np.exp(rng.normal(0.0, 2 * config.stain_jitter))),
    )


def section_depth(
    anatomy: Anatomy, section: Section, jitter: float, un: np.ndarray, vn: np.ndarray
) -> np.ndarray:
    """Layer depth of one section: the shared depth plus a section-specific low-frequency warp."""
    warp = sum(
        np.sin(np.pi * (frequency[0] * un + frequency[1] * vn) + phase)
        for frequency, phase in zip(section.jitter_frequencies, section.jitter_phases, strict=True)
    )
    return layer_depth(anatomy, un, vn) + jitter / np.sqrt(2) * warp


def make_canvas(config: SyntheticConfig, anatomy: Anatomy) -> Canvas:
    """Image size that holds every rotated, shifted section plus a margin for 160 px patches."""
    long_um, short_um = anatomy.half_axes_um
    reach = 1.0 + float(np.sum(anatomy.outline_amplitudes))
    sin_max = np.sin(np.deg2rad(config.max_rotation_deg))
    margin_um = config.max_shift_um + max(200.0, 80 * config.pixel_size_um)
    half_width = reach * long_um + margin_um
    half_height = reach * np.hypot(long_um * sin_max, short_um) + margin_um
    step = max(1, round(COARSE_STEP_UM / config.pixel_size_um))
    width = int(np.ceil(2 * half_width / config.pixel_size_um / step)) * step
    height = int(np.ceil(2 * half_height / config.pixel_size_um / step)) * step
    centre = np.array([width, height]) * config.pixel_size_um / 2
    return Canvas(height_px=height, width_px=width, centre_um=centre, coarse_step_px=step)


def image_to_tissue(
    section: Section, canvas: Canvas, pixel_size_um: float, x_px: np.ndarray, y_px: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Map image pixels of a section to the tissue frame (microns): undo shift, then rotation."""
    dx = x_px * pixel_size_um - canvas.centre_um[0] - section.shift_um[0]
    dy = y_px * pixel_size_um - canvas.centre_um[1] - section.shift_um[1]
    cos, sin = np.cos(section.rotation_rad), np.sin(section.rotation_rad)
    return cos * dx + sin * dy, -sin * dx + cos * dy


def smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise rescaled to unit standard deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="reflect")
    return field / field.std()


def upsample(coarse: np.ndarray, step: int, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of a coarse field (one value per ``step x step`` block) to ``shape``."""
    fine = ndimage.zoom(coarse.astype(np.float32), step, order=1, mode="nearest", grid_mode=True)
    return fine[: shape[0], : shape[1]]


@dataclass(frozen=True)
class SectionFields:
    """Per-section fields on the coarse grid (one value per ``coarse_step_px`` square block)."""

    radius: np.ndarray  # normalised outline radius (< 1 inside)
    domain: np.ndarray  # domain index from the section's layer depth
    cellularity: np.ndarray  # unit-sd field: log nuclei density = log domain density + sd x this
    stroma: np.ndarray  # unit-sd field: log eosin = log domain eosin + sd x this

    @property
    def tissue(self) -> np.ndarray:
        """Tissue opacity in [0, 1]: 1 inside, a soft edge of ``TISSUE_EDGE`` at the outline."""
        return np.clip((1.0 - self.radius) / TISSUE_EDGE, 0.0, 1.0)


def coarse_fields(
    config: SyntheticConfig,
    anatomy: Anatomy,
    section: Section,
    canvas: Canvas,
    rng: np.random.Generator,
) -> SectionFields:
    """Evaluate the section's geometry and draw its texture fields on the coarse grid."""
    step = canvas.coarse_step_px
    shape = (canvas.height_px // step, canvas.width_px // step)
    y_px, x_px = (np.indices(shape) * step + (step - 1) / 2).astype(np.float64)
    un, vn = normalised_position(anatomy, section, canvas, config.pixel_size_um, x_px, y_px)
    sigma = TEXTURE_LENGTH_UM / (step * config.pixel_size_um)
    return SectionFields(
        radius=outline_radius(anatomy, un, vn),
        domain=domain_of(anatomy, section_depth(anatomy, section, config.boundary_jitter, un, vn)),
        cellularity=smooth_field(rng, shape, sigma),
        stroma=smooth_field(rng, shape, sigma),
    )


def normalised_position(
    anatomy: Anatomy,
    section: Section,
    canvas: Canvas,
    pixel_size_um: float,
    x_px: np.ndarray,
    y_px: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Image pixels of a section -> normalised tissue position ``(u / a, v / b)``."""
    u_um, v_um = image_to_tissue(section, canvas, pixel_size_um, x_px, y_px)
    return u_um / anatomy.half_axes_um[0], v_um / anatomy.half_axes_um[1]


def domain_of(anatomy: Anatomy, depth: np.ndarray) -> np.ndarray:
    """Domain index (0 .. n_domains - 1) of each depth value."""
    return np.digitize(depth, anatomy.depth_thresholds)


def eosin_level(config: SyntheticConfig, anatomy: Anatomy, fields: SectionFields) -> np.ndarray:
    """Eosin optical density of the stroma on the coarse grid, before the section's stain scale.

    The domain's eosin level times ``exp(texture_field_sd * stroma)``, times tissue opacity.
    """
    stroma = np.exp(config.texture_field_sd * fields.stroma)
    return anatomy.eosin_od[fields.domain] * stroma * fields.tissue


# ----------------------------------------------------------------------------- image


def draw_nuclei(
    config: SyntheticConfig,
    anatomy: Anatomy,
    section: Section,
    canvas: Canvas,
    fields: SectionFields,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Nuclei of a section as an inhomogeneous Poisson process, one coarse block at a time.

    The intensity of a block is its domain's ``nuclei_per_mm2`` times
    ``exp(texture_field_sd * cellularity)``; counts per block are Poisson, positions uniform in
    the block, and nuclei outside the exact tissue outline are dropped. Returns centres
    ``(n, 2)`` (x, y) and radii ``(n,)``, both in pixels.
    """
    step = canvas.coarse_step_px
    block_area_mm2 = (step * config.pixel_size_um / 1000) ** 2
    density = anatomy.nuclei_per_mm2[fields.domain] * np.exp(
        config.texture_field_sd * fields.cellularity
    )
    counts = rng.poisson(density * block_area_mm2 * (fields.radius < 1.05))
    block = np.repeat(np.arange(counts.size), counts.ravel())
    block_row, block_col = np.divmod(block, counts.shape[1])
    x_px = (block_col + rng.uniform(0, 1, block.size)) * step - 0.5
    y_px = (block_row + rng.uniform(0, 1, block.size)) * step - 0.5
    radius_um = anatomy.nuclear_radius_um[fields.domain.ravel()[block]]
    radius_px = radius_um * rng.uniform(0.8, 1.2, block.size) / config.pixel_size_um
    un, vn = normalised_position(anatomy, section, canvas, config.pixel_size_um, x_px, y_px)
    inside = outline_radius(anatomy, un, vn) < 1
    return np.stack([x_px[inside], y_px[inside]], axis=1), radius_px[inside]


def nuclear_mask(
    centres_px: np.ndarray, radii_px: np.ndarray, shape: tuple[int, int]
) -> np.ndarray:
    """Soft nuclear occupancy in [0, 1], float32 ``shape``, rendered without a per-nucleus loop.

    Each nucleus is a point whose weight makes its Gaussian blob (one shared sigma) cross 1 at
    its own radius; after one Gaussian filter, thresholding near 1 gives discs of the right
    sizes, and touching nuclei merge into clumps as in tissue.
    """
    sigma = max(0.8, 0.45 * float(np.median(radii_px))) if radii_px.size else 1.0
    weights = 2 * np.pi * sigma**2 * np.exp(radii_px**2 / (2 * sigma**2))
    rows = np.clip(np.round(centres_px[:, 1]).astype(np.int64), 0, shape[0] - 1)
    cols = np.clip(np.round(centres_px[:, 0]).astype(np.int64), 0, shape[1] - 1)
    points = np.bincount(rows * shape[1] + cols, weights, minlength=shape[0] * shape[1])
    blobs = ndimage.gaussian_filter(points.reshape(shape).astype(np.float32), sigma, truncate=4.0)
    blobs -= 0.6
    blobs *= 1 / 0.8
    return np.clip(blobs, 0.0, 1.0, out=blobs)


def render_image(
    config: SyntheticConfig,
    anatomy: Anatomy,
    section: Section,
    canvas: Canvas,
    fields: SectionFields,
    occupancy: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """H&E-like RGB uint8 image ``(height, width, 3)`` by Beer-Lambert stain mixing.

    Hematoxylin = the domain's background level + nuclei (with chromatin noise); eosin = the
    domain's level x the section's stroma field x fibre noise (see :func:`eosin_level`). The
    optical densities of the two stains add, scaled by the section's stain vectors, and become
    intensities ``255 * exp(-OD)``; outside the tissue only the near-white glass remains.
    """
    shape = (canvas.height_px, canvas.width_px)
    step = canvas.coarse_step_px
    background = upsample(anatomy.hematoxylin_od[fields.domain] * fields.tissue, step, shape)
    eosin = upsample(eosin_level(config, anatomy, fields), step, shape)
    noise = ndimage.gaussian_filter(
        rng.standard_normal(shape, dtype=np.float32), sigma=(0.8, 2.0), truncate=3.0
    )
    noise *= 1 / noise.std()
    hematoxylin = background + NUCLEAR_STAIN * occupancy * (1.0 + 0.15 * noise)
    hematoxylin *= section.h_scale
    eosin *= section.e_scale * (1.0 + 0.25 * noise)
    rgb = np.empty((*shape, 3), dtype=np.uint8)
    for channel in range(3):
        optical_density = hematoxylin * float(section.h_stain[channel])
        optical_density += eosin * float(section.e_stain[channel])
        optical_density += BACKGROUND_OD
        rgb[..., channel] = np.clip(255.0 * np.exp(-optical_density), 0, 255)
    return rgb


def write_png(rgb: np.ndarray, path: Path, overwrite: bool) -> None:
    """Write an RGB image as PNG atomically (fast zlib level: the images are noisy anyway)."""
    with atomic_output(path, overwrite) as tmp:
        Image.fromarray(rgb, mode="RGB").save(tmp, format="PNG", compress_level=1)


# ----------------------------------------------------------------------------- spots


def spot_grid(config: SyntheticConfig, canvas: Canvas) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All grid spots over the canvas: centres ``(n, 2)`` px, ``array_row``, ``array_col``.

    Hex grids follow Visium: rows ``pitch * sqrt(3) / 2`` apart, columns of a row two apart
    with odd rows offset by one, so neighbours in a row differ by 2 in ``array_col``.
    """
    pitch_px = config.spot_pitch_um / config.pixel_size_um
    margin_px = max(100.0 / config.pixel_size_um, 80.0)
    if config.grid == "hex":
        row_step, col_step = pitch_px * np.sqrt(3) / 2, pitch_px / 2
    else:
        row_step, col_step = pitch_px, pitch_px
    n_rows = int((canvas.height_px - 2 * margin_px) // row_step) + 1
    n_cols = int((canvas.width_px - 2 * margin_px) // col_step) + 1
    rows, cols = np.indices((n_rows, n_cols)).reshape(2, -1)
    if config.grid == "hex":
        on_lattice = (rows % 2) == (cols % 2)
        rows, cols = rows[on_lattice], cols[on_lattice]
    xy = np.stack([margin_px + cols * col_step, margin_px + rows * row_step], axis=1)
    return xy, rows, cols


def count_within(points_px: np.ndarray, centres_px: np.ndarray, radius_px: float) -> np.ndarray:
    """Number of ``points_px`` within ``radius_px`` of each centre."""
    if len(points_px) == 0:
        return np.zeros(len(centres_px))
    return cKDTree(points_px).query_ball_point(centres_px, radius_px, return_length=True)


def window_means(
    image: np.ndarray, centres_px: np.ndarray, side_px: float, chunk: int = 512
) -> np.ndarray:
    """Mean of a 2-D ``image`` over a ``side_px`` square window around each centre (x, y).

    Windows are gathered ``chunk`` spots at a time; pixels beyond the border repeat the edge.
    """
    offsets = np.arange(-round(side_px / 2), round(side_px / 2) + 1)
    means = []
    for start in range(0, len(centres_px), chunk):
        centres = np.round(centres_px[start : start + chunk]).astype(np.int64)
        rows = np.clip(centres[:, 1, None] + offsets, 0, image.shape[0] - 1)
        cols = np.clip(centres[:, 0, None] + offsets, 0, image.shape[1] - 1)
        means.append(image[rows[:, :, None], cols[:, None, :]].mean(axis=(1, 2)))
    return np.concatenate(means) if means else np.zeros(0)


# ----------------------------------------------------------------------------- genes


def program_names(config: SyntheticConfig) -> list[str]:
    """Program names in activity-column order: domains, gradients, textures."""
    return (
        [f"domain_{k}" for k in range(config.n_domains)]
        + [f"gradient_{k}" for k in range(config.n_gradient_programs)]
        + list(TEXTURE_PROGRAMS[: config.n_texture_programs])
    )


def planted_gene_programs(config: SyntheticConfig) -> pd.DataFrame:
    """The planted gene table (the ``var`` of every section), a pure function of the config.

    Genes are named ``G000`` ...; programs are assigned in a seeded random order, so a gene's
    index says nothing about its program. Columns: ``program`` (categorical, ``housekeeping``
    for genes in none), ``program_kind`` (domain / gradient / texture / housekeeping),
    ``program_loading`` (coefficient on the program activity in natural-log mean space: the
    kind's ``*_log_fold`` times a gene-specific weight in [0.5, 1.5]; 0 for housekeeping) and
    ``base_fraction`` (relative baseline expression, sums to 1).
    """
    rng = np.random.default_rng(np.random.SeedSequence(config.seed).spawn(2)[1])
    names = program_names(config)
    n_housekeeping = round(config.housekeeping_fraction * config.n_genes)
    n_program_genes = config.n_genes - n_housekeeping
    labels = np.array(
        [names[k % len(names)] for k in range(n_program_genes)] + ["housekeeping"] * n_housekeeping
    )
    labels = labels[rng.permutation(config.n_genes)]
    kinds = np.array([label.rsplit("_", 1)[0] for label in labels])
    fold = {
        "domain": config.domain_log_fold,
        "gradient": config.gradient_log_fold,
        "texture": config.texture_log_fold,
        "housekeeping": 0.0,
    }
    weights = rng.uniform(0.5, 1.5, config.n_genes)
    base = rng.lognormal(0.0, 1.0, config.n_genes)
    return pd.DataFrame(
        {
            "program": pd.Categorical(labels, categories=[*names, "housekeeping"]),
            "program_kind": kinds,
            "program_loading": np.array([fold[kind] for kind in kinds]) * weights,
            "base_fraction": base / base.sum(),
        },
        index=pd.Index([f"G{g:03d}" for g in range(config.n_genes)]),
    )


def program_activity(
    config: SyntheticConfig,
    anatomy: Anatomy,
    domain: np.ndarray,
    tissue_normalised: np.ndarray,
    nuclear_fraction: np.ndarray,
    stroma_od: np.ndarray,
) -> np.ndarray:
    """Spots x programs activity matrix (columns as :func:`program_names`).

    Domain programs are 0/1 indicators; gradient programs are in [-1, 1]; texture programs are
    log2 ratios of the measured cellularity (nuclear area fraction) and eosin to the anatomy's
    typical values, clipped to [-3, 3], so one unit is a doubling.
    """
    indicators = np.eye(config.n_domains)[domain]
    gradients = gradient_patterns(anatomy, tissue_normalised[:, 0], tissue_normalised[:, 1])
    textures = np.stack(
        [
            np.log2((nuclear_fraction + 0.01) / typical_nuclear_fraction(anatomy)),
            np.log2((stroma_od + 0.01) / np.exp(np.mean(np.log(anatomy.eosin_od)))),
        ],
        axis=1,
    )[:, : config.n_texture_programs]
    return np.concatenate([indicators, gradients, np.clip(textures, -3.0, 3.0)], axis=1)


def typical_nuclear_fraction(anatomy: Anatomy) -> float:
    """Geometric mean over domains of the nuclear area fraction (overlaps ignored)."""
    fractions = anatomy.nuclei_per_mm2 * np.pi * (anatomy.nuclear_radius_um / 1000) ** 2
    return float(np.exp(np.mean(np.log(fractions))))


def expected_counts(
    config: SyntheticConfig, genes: pd.DataFrame, activity: np.ndarray, size_factor: np.ndarray
) -> np.ndarray:
    """NB means ``(n_spots, n_genes)``: base x exp(loading x activity), scaled to the library size.

    The scale makes the mean over spots of the expected total equal ``mean_library_size``
    before the per-spot ``size_factor`` (mean 1) is applied. Computed in place in the one
    ``(n_spots, n_genes)`` float64 array it returns.
    """
    program_index = genes["program"].cat.codes.to_numpy()
    n_programs = activity.shape[1]
    padded = np.concatenate([activity, np.zeros((len(activity), 1))], axis=1)
    columns = np.where(program_index < n_programs, program_index, n_programs)
    mean = padded[:, columns]  # log mean = log(base) + activity x loading
    mean *= genes["program_loading"].to_numpy()
    mean += np.log(genes["base_fraction"].to_numpy())
    np.exp(mean, out=mean)
    mean *= config.mean_library_size / mean.sum(axis=1).mean()
    mean *= size_factor[:, None]
    return mean


def negative_binomial(
    rng: np.random.Generator, mean: np.ndarray, theta: float, chunk_rows: int = 256
) -> np.ndarray:
    """Negative-binomial draws as a gamma-Poisson mixture (variance ``mean + mean^2 / theta``).

    Float32 counts. The gamma rates are ``standard_gamma(theta) * (mean / theta)`` (what
    ``Generator.gamma`` computes, from the same random stream) scaled ``chunk_rows`` rows at
    a time, and the Poisson draws go ``chunk_rows`` rows at a time into the output (the same
    stream as one call over the whole array): beside ``mean`` and the output, one float64
    matrix (the rates) is held, not three.
    """
    rates = rng.standard_gamma(theta, size=mean.shape)
    counts = np.empty(mean.shape, dtype=np.float32)
    for start in range(0, mean.shape[0], chunk_rows):
        rates[start : start + chunk_rows] *= mean[start : start + chunk_rows] / theta
    for start in range(0, mean.shape[0], chunk_rows):
        counts[start : start + chunk_rows] = rng.poisson(rates[start : start + chunk_rows])
    return counts


# ----------------------------------------------------------------------------- public API


def make_synthetic_sections(
    out_dir: str | os.PathLike,
    config: SyntheticConfig | None = None,
    *,
    overwrite: bool = False,
) -> list[ad.AnnData]:
    """Generate ``config.n_sections`` serial sections; write their images into ``out_dir``.

    Parameters
    ----------
    out_dir
        Folder for the images (``<sample_id>.png``, created when missing); each slide's
        ``uns["stinfer"]["image_path"]`` is the absolute path of its image.
    config
        Generator settings; :class:`SyntheticConfig` defaults when omitted.
    overwrite
        Replace images that already exist; otherwise an existing image raises
        :class:`~stinfer.errors.InputError` before anything is generated.

    Returns
    -------
    list of AnnData
        One slide per section, built by :func:`~stinfer.io.slide_data.make_slide`
        (``source_format="synthetic"``), with the ground truth listed in the module docstring.
        The same config (seed included) gives identical counts and images.
    """
    config = config or SyntheticConfig()
    out_dir = Path(out_dir).resolve()
    sample_ids = [f"{config.sample_prefix}_section{k + 1}" for k in range(config.n_sections)]
    image_paths = [out_dir / f"{sample_id}.png" for sample_id in sample_ids]
    for path in image_paths:
        check_writable(path, overwrite)

    seeds = np.random.SeedSequence(config.seed).spawn(2 + config.n_sections)
    anatomy = draw_anatomy(config, np.random.default_rng(seeds[0]))
    genes = planted_gene_programs(config)
    canvas = make_canvas(config, anatomy)
    return [
        make_section(config, anatomy, canvas, genes, number, seed, path, overwrite)
        for number, (seed, path) in enumerate(zip(seeds[2:], image_paths, strict=True), start=1)
    ]


def make_section(
    config: SyntheticConfig,
    anatomy: Anatomy,
    canvas: Canvas,
    genes: pd.DataFrame,
    number: int,
    seed: np.random.SeedSequence,
    image_path: Path,
    overwrite: bool,
) -> ad.AnnData:
    """Generate one section: placement, image (written to ``image_path``), spots and counts."""
    rng = np.random.default_rng(seed)
    section = draw_section(config, number, rng)
    fields = coarse_fields(config, anatomy, section, canvas, rng)
    centres_px, radii_px = draw_nuclei(config, anatomy, section, canvas, fields, rng)
    occupancy = nuclear_mask(centres_px, radii_px, (canvas.height_px, canvas.width_px))
    write_png(
        render_image(config, anatomy, section, canvas, fields, occupancy, rng),
        image_path,
        overwrite,
    )

    grid_xy, rows, cols = spot_grid(config, canvas)
    un, vn = normalised_position(
        anatomy, section, canvas, config.pixel_size_um, grid_xy[:, 0], grid_xy[:, 1]
    )
    inside = outline_radius(anatomy, un, vn) < 1
    spots_xy, rows, cols, un, vn = (
        grid_xy[inside],
        rows[inside],
        cols[inside],
        un[inside],
        vn[inside],
    )
    domain = domain_of(anatomy, section_depth(anatomy, section, config.boundary_jitter, un, vn))
    texture = measure_texture(config, anatomy, canvas, fields, centres_px, occupancy, spots_xy)
    activity = program_activity(
        config,
        anatomy,
        domain,
        np.stack([un, vn], axis=1),
        texture["nuclear_fraction"].to_numpy(),
        texture["stroma_eosin_od"].to_numpy(),
    )
    texture["size_factor"] = np.exp(
        rng.normal(-(config.library_size_sd**2) / 2, config.library_size_sd, len(spots_xy))
    )
    true_mean = expected_counts(config, genes, activity, texture["size_factor"].to_numpy())

    slide = make_slide(
        negative_binomial(rng, true_mean, config.nb_theta),
        [f"{col}x{row}" for row, col in zip(rows, cols, strict=True)],
        genes.index,
        spots_xy,
        sample_id=image_path.stem,
        source_format="synthetic",
        source=f"synthetic section {number} (seed {config.seed})",
        array_row=rows,
        array_col=cols,
        image_path=str(image_path),
        image_scale=1.0,
        pixel_size_um=config.pixel_size_um,
        spot_diameter_px=config.spot_diameter_um / config.pixel_size_um,
        notes=[f"synthetic section {number} of {config.n_sections}, seed {config.seed}"],
        obs_columns=texture,
    )
    domain_names = [f"domain_{k}" for k in range(config.n_domains)]
    slide.obs["domain"] = pd.Categorical(np.array(domain_names)[domain], categories=domain_names)
    for column in genes.columns:
        slide.var[column] = genes[column].array
    slide.obsm["tissue_um"] = np.stack([un, vn], axis=1) * np.asarray(anatomy.half_axes_um)
    slide.obsm["program_activity"] = pd.DataFrame(
        activity, index=slide.obs_names, columns=program_names(config)
    )
    slide.layers["true_mean"] = true_mean.astype(np.float32)
    slide.uns["synthetic"] = synthetic_metadata(config, anatomy, section)
    logger.info(
        "synthetic section %d: %d spots, %d nuclei, image %d x %d px",
        number,
        slide.n_obs,
        len(centres_px),
        canvas.width_px,
        canvas.height_px,
    )
    return slide


def measure_texture(
    config: SyntheticConfig,
    anatomy: Anatomy,
    canvas: Canvas,
    fields: SectionFields,
    centres_px: np.ndarray,
    occupancy: np.ndarray,
    spots_xy: np.ndarray,
) -> pd.DataFrame:
    """What the image shows around each spot, in a window of ``texture_radius_um``.

    Columns: ``nuclei_density`` (nuclei centres per mm^2 within the radius),
    ``nuclear_fraction`` (mean nuclear occupancy over a square of the disc's area) and
    ``stroma_eosin_od`` (mean eosin optical density over that square, before stain scaling).
    """
    window_px = config.texture_radius_um / config.pixel_size_um
    window_area_mm2 = np.pi * (config.texture_radius_um / 1000) ** 2
    window_side_px = np.sqrt(np.pi) * window_px
    step = canvas.coarse_step_px  # eosin is smooth: average it on the coarse grid
    return pd.DataFrame(
        {
            "nuclei_density": count_within(centres_px, spots_xy, window_px) / window_area_mm2,
            "nuclear_fraction": window_means(occupancy, spots_xy, window_side_px).astype(
                np.float64
            ),
            "stroma_eosin_od": window_means(
                eosin_level(config, anatomy, fields),
                (spots_xy - (step - 1) / 2) / step,
                window_side_px / step,
            ),
        }
    )


def synthetic_metadata(config: SyntheticConfig, anatomy: Anatomy, section: Section) -> dict:
    """The ``uns["synthetic"]`` record: config, section placement and stain, planted traits."""
    names = program_names(config)
    return {
        "config": dataclasses.asdict(config),
        "seed": config.seed,
        "section": section.number,
        "rotation_deg": float(np.rad2deg(section.rotation_rad)),
        "shift_um": section.shift_um.copy(),
        "h_stain_od": section.h_stain.copy(),
        "e_stain_od": section.e_stain.copy(),
        "program_names": names,
        "program_kinds": [name.rsplit("_", 1)[0] for name in names],
        "domain_nuclei_per_mm2": anatomy.nuclei_per_mm2.copy(),
        "domain_nuclear_radius_um": anatomy.nuclear_radius_um.copy(),
        "domain_eosin_od": anatomy.eosin_od.copy(),
        "domain_hematoxylin_od": anatomy.hematoxylin_od.copy(),
    }


def config_of(slide: ad.AnnData) -> SyntheticConfig:
    """The :class:`SyntheticConfig` that generated a synthetic slide (from ``uns["synthetic"]``)."""
    record = slide.uns.get("synthetic")
    if record is None or "config" not in record:
        raise InputError(
            "this AnnData has no uns['synthetic']['config']; pass a slide made by "
            "make_synthetic_sections or its SyntheticConfig."
        )
    fields = {field.name: field.type for field in dataclasses.fields(SyntheticConfig)}
    values = {key: value for key, value in dict(record["config"]).items() if key in fields}
    return SyntheticConfig(
        **{
            key: value.item() if isinstance(value, np.generic) else value
            for key, value in values.items()
        }
    )


def planted_gene_embeddings(
    source: ad.AnnData | SyntheticConfig,
    dim: int = 32,
    noise: float = 0.5,
    seed: int | None = None,
) -> pd.DataFrame:
    """A genes x ``dim`` embedding table that encodes the planted programs, plus noise.

    Each program (and the housekeeping group) gets a random direction (orthonormal when
    ``n_programs + 1 <= dim``); a gene's embedding is its program's direction scaled by its
    loading relative to the program's mean loading, plus isotropic Gaussian noise of expected
    norm ``noise``. With the default ``noise=0.5`` genes of one program have cosine similarity
    of about 0.8 and genes of different programs about 0: a stand-in for learned CoxFormer gene
    embeddings when testing imputation of held-out genes from their program mates.

    Parameters
    ----------
    source
        The :class:`SyntheticConfig` (all planted genes) or a synthetic slide (its config is
        read from ``uns["synthetic"]``; the rows follow its ``var_names``, so a slide with
        held-out genes removed gets the same embeddings for the genes it keeps).
    dim
        Embedding dimension.
    noise
        Expected Euclidean norm of each gene's noise vector (the signal has norm about 1).
    seed
        Seed of the directions and noise; defaults to the synthetic seed.

    Returns
    -------
    pandas.DataFrame
        Index: gene names; columns ``dim_0`` ... ``dim_{dim-1}``; float64.

    Examples
    --------
    >>> table = planted_gene_embeddings(SyntheticConfig(), dim=16)
    >>> table.shape
    (200, 16)
    """
    config = source if isinstance(source, SyntheticConfig) else config_of(source)
    if dim < 1:
        raise InputError(f"planted_gene_embeddings: dim must be at least 1, got {dim}.")
    genes = planted_gene_programs(config)
    rng = np.random.default_rng([config.seed if seed is None else seed, 1])
    program = pd.Categorical(genes["program"])
    n_groups = len(program.categories)
    directions = rng.standard_normal((dim, n_groups))
    if n_groups <= dim:
        directions = np.linalg.qr(directions)[0]
    directions = (directions / np.linalg.norm(directions, axis=0)).T
    loading = np.abs(genes["program_loading"].to_numpy(dtype=np.float64))
    group_mean = pd.Series(loading).groupby(program.codes).transform("mean").to_numpy()
    scale = np.divide(loading, group_mean, out=np.ones_like(loading), where=group_mean > 0)
    embedding = directions[program.codes] * scale[:, None]
    embedding += rng.standard_normal(embedding.shape) * noise / np.sqrt(dim)
    table = pd.DataFrame(embedding, index=genes.index, columns=[f"dim_{k}" for k in range(dim)])
    if isinstance(source, SyntheticConfig):
        return table
    missing = source.var_names.difference(table.index)
    if len(missing):
        raise InputError(
            f"planted_gene_embeddings: {len(missing)} genes of the slide were not planted by its "
            f"config (e.g. {missing[0]}); gene names must be the generator's G000, G001, ..."
        )
    return table.loc[source.var_names]
