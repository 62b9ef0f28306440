"""Pure torch building blocks (no AnnData here): encoders, fusion, decoders, likelihoods, STEvs.

The STEvs module (:class:`STEvsModule`, :class:`STEvsConfig`) is assembled from

- :mod:`stinfer.nn.encoders`: timm image encoder (:func:`create_backbone`, the one backbone
  factory), coordinate encoders, coordinate normaliser;
- :mod:`stinfer.nn.backbones`: stinfer's own timm backbones (``stinfer_histology_cnn``),
  registered with timm when this package is imported, so every backbone is built by name;
- :mod:`stinfer.nn.fusion`: Product of Experts and the ablation fusions;
- :mod:`stinfer.nn.decoders`: image decoder and negative binomial gene decoder;
- :mod:`stinfer.nn.likelihoods`: :class:`NegativeBinomial` and the Gaussian KL;
- :mod:`stinfer.nn.pretrained`: loading local weight files by name and shape.
"""

from stinfer.nn.backbones import HistologyCNN
from stinfer.nn.decoders import GeneDecoder, ImageDecoder
from stinfer.nn.encoders import (
    CoordinateEncoder,
    CoordinateNormaliser,
    CoordinateNormalizer,
    FourierFeatures,
    GaussianHeads,
    ImageEncoder,
    ModalityPosterior,
    build_coordinate_encoder,
    create_backbone,
)
from stinfer.nn.fusion import (
    ConcatFusion,
    CrossAttentionFusion,
    MeanFusion,
    PoEFusion,
    build_fusion,
    fuse_mean,
    fuse_poe,
    product_of_experts,
    reparameterize,
)
from stinfer.nn.likelihoods import NegativeBinomial, kl_standard_normal
from stinfer.nn.pretrained import LoadReport, load_matching_weights, read_state_dict
from stinfer.nn.stevs import STEvsConfig, STEvsModule, kl_weight

__all__ = [
    "ConcatFusion",
    "CoordinateEncoder",
    "CoordinateNormaliser",
    "CoordinateNormalizer",
    "CrossAttentionFusion",
    "FourierFeatures",
    "GaussianHeads",
    "GeneDecoder",
    "HistologyCNN",
    "ImageDecoder",
    "ImageEncoder",
    "LoadReport",
    "MeanFusion",
    "ModalityPosterior",
    "NegativeBinomial",
    "PoEFusion",
    "STEvsConfig",
    "STEvsModule",
    "build_coordinate_encoder",
    "build_fusion",
    "create_backbone",
    "fuse_mean",
    "fuse_poe",
    "kl_standard_normal",
    "kl_weight",
    "load_matching_weights",
    "product_of_experts",
    "read_state_dict",
    "reparameterize",
]
