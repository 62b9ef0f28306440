"""Small image backbones of stinfer's own, registered with timm so they load by name.

``stinfer_histology_cnn`` is the image encoder of the ``fast`` STEvs preset. The paper's
Swin-T relies on ImageNet weights (STEvs C.2.1), which machines without internet do not have;
trained from scratch on one section (~200 spots) a Swin-T learns little, and a frozen random one
is worse than six colour statistics (cross-slice on HER2ST; figures in ``docs/results.md``
"Colour-statistics probe").
This backbone is small enough to train from scratch on a CPU in minutes and always carries the
per-channel colour mean and standard deviation of the patch beside its learned texture features,
so it starts from what a colour-statistics ridge knows and learns the rest.

Registered through ``timm.models.register_model`` so that ``timm.create_model`` (and therefore
:func:`stinfer.nn.encoders.create_backbone`) is the one way to build every backbone. The
registration runs when :mod:`stinfer.nn` is imported (its ``__init__`` imports this module), so
any code that can reach ``create_backbone`` can build ``stinfer_histology_cnn`` by name.
"""

from __future__ import annotations

import torch
from timm.models import register_model
from torch import nn


def colour_statistics(patches: torch.Tensor) -> torch.Tensor:
    """Per-channel mean and standard deviation of ``(N, C, H, W)`` patches: ``(N, 2C)``."""
    variance, mean = torch.var_mean(patches.flatten(2), dim=-1, correction=0)  # one pass
    return torch.cat([mean, variance.sqrt()], dim=1)


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 convolution with stride 2, batch norm and ReLU: halves the feature map."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class HistologyCNN(nn.Module):
    """A four-stage CNN on the 2x-downsampled patch plus the patch's colour statistics.

    ``(N, C, H, W)`` patches -> average-pool 2x -> 4 stride-2 conv stages (``widths``) ->
    global average pooling, concatenated with :func:`colour_statistics` of the full patch:
    ``num_features = widths[-1] + 2 * in_chans``.

    Parameters
    ----------
    in_chans
        Input channels (3 for RGB).
    widths
        Channels of the four conv stages.
    """

    def __init__(self, in_chans: int = 3, widths: tuple[int, ...] = (16, 32, 64, 128)) -> None:
        super().__init__()
        stages, previous = [], in_chans
        for width in widths:
            stages.append(conv_bn_relu(previous, width))
            previous = width
        self.stages = nn.Sequential(nn.AvgPool2d(2), *stages)
        self.num_features = widths[-1] + 2 * in_chans

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` patches in ``[-1, 1]`` -> ``(N, num_features)``."""
        texture = self.stages(patches).mean(dim=(2, 3))
        return torch.cat([texture, colour_statistics(patches)], dim=1)


@register_model
def stinfer_histology_cnn(
    pretrained: bool = False, in_chans: int = 3, num_classes: int = 0, **kwargs
) -> HistologyCNN:
    """timm entry point of :class:`HistologyCNN` (no pretrained weights; no classifier)."""
    if pretrained:
        raise ValueError("stinfer_histology_cnn has no pretrained weights; train it from scratch")
    if num_classes:
        raise ValueError("stinfer_histology_cnn is a feature extractor: use num_classes=0")
    widths = kwargs.get("widths", (16, 32, 64, 128))  # timm also passes img_size, pretrained_cfg
    return HistologyCNN(in_chans=in_chans, widths=tuple(widths))
