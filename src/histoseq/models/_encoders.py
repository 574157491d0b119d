"""Patch encoders in plain torch: ``(B, 3, H, W)`` float tensors in [0, 1] → ``(B, D)`` features.

Every encoder normalises its input inside (so callers always pass [0, 1] RGB), is random-initialised with
a fixed seed scheme chosen by the caller, and reports its output size as ``out_dim``. Normalisation
constants are non-persistent buffers: they are not part of the state dict, so state dicts of the same
architecture from elsewhere (e.g. torchvision's ``resnet18``) load unchanged.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

#: ImageNet channel statistics (RGB, for inputs in [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _Normalize(nn.Module):
    """``(x - mean) / std`` per channel, with non-persistent buffers."""

    def __init__(self, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class NormalizedEncoder(nn.Module):
    """Wraps a network that expects normalised inputs so that it takes [0, 1] RGB like histoseq's encoders.

    Parameters
    ----------
    model
        The network (e.g. a timm model created with ``num_classes=0``).
    mean, std
        Per-channel statistics the network was trained with.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from histoseq.models._encoders import NormalizedEncoder
    >>> enc = NormalizedEncoder(nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    >>> enc(torch.rand(2, 3, 16, 16)).shape
    torch.Size([2, 4])

    """

    def __init__(
        self, model: nn.Module, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD
    ):
        super().__init__()
        self.normalize = _Normalize(mean, std)
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [0, 1] → the wrapped network's output."""
        return self.model(self.normalize(x))


def _conv_bn_relu(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """A small convolutional encoder (about 0.3 M parameters, 0.15 GMAC at 224 px) for quick experiments.

    Four stride-2 stages with batch norm and ReLU: a single 3×3 convolution at the full resolution
    (``3 * width // 4`` channels), then two 3×3 convolutions per stage (``width``, ``2 * width``,
    ``4 * width`` channels), global average pooling and a linear projection to ``out_dim``. Inputs in [0, 1]
    are normalised with the ImageNet mean and standard deviation inside.

    Parameters
    ----------
    out_dim
        Size of the embedding.
    width
        Channels of the second stage.

    Examples
    --------
    >>> import torch
    >>> from histoseq.models import SmallCNN
    >>> SmallCNN().eval()(torch.rand(2, 3, 32, 32)).shape
    torch.Size([2, 128])

    """

    def __init__(self, out_dim: int = 128, width: int = 32):
        super().__init__()
        self.normalize = _Normalize()
        stem = max(8, 3 * width // 4)
        layers: list[nn.Module] = [_conv_bn_relu(3, stem, 2)]
        c_in = stem
        for c in (width, 2 * width, 4 * width):
            layers += [_conv_bn_relu(c_in, c, 2), _conv_bn_relu(c, c, 1)]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.proj = nn.Linear(c_in, out_dim)
        self.out_dim = out_dim
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [0, 1] → ``(B, out_dim)``."""
        h = self.features(self.normalize(x))
        return self.proj(h.mean(dim=(2, 3)))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3×3 convolutions with a residual connection."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                nn.BatchNorm2d(c_out),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)), inplace=True)
        h = self.bn2(self.conv2(h))
        skip = x if self.downsample is None else self.downsample(x)
        return F.relu(h + skip, inplace=True)


class ResNet18(nn.Module):
    """ResNet-18 (He et al. 2016) trunk: ``(B, 3, H, W)`` in [0, 1] → ``(B, 512)`` pooled features.

    Parameter names follow torchvision's ``resnet18`` (``conv1``, ``bn1``, ``layer1.0.conv1``, ...), so its
    state dicts, and those of histopathology models trained with that layout, load directly; their
    classifier ``fc.*`` is not part of this trunk and is ignored by :func:`histoseq.tl._embed.load_weights`.
    Inputs are normalised with the ImageNet mean and standard deviation inside.

    Examples
    --------
    >>> import torch
    >>> from histoseq.models import ResNet18
    >>> ResNet18().eval()(torch.rand(2, 3, 64, 64)).shape
    torch.Size([2, 512])

    """

    #: State-dict prefixes of classifier heads that loading ignores.
    ignored_prefixes = ("fc.",)

    def __init__(self):
        super().__init__()
        self.normalize = _Normalize()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        c_in = 64
        for i, c in enumerate((64, 128, 256, 512), start=1):
            stride = 1 if i == 1 else 2
            setattr(self, f"layer{i}", nn.Sequential(BasicBlock(c_in, c, stride), BasicBlock(c, c)))
            c_in = c
        self.out_dim = 512
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [0, 1] → ``(B, 512)``."""
        x = self.maxpool(F.relu(self.bn1(self.conv1(self.normalize(x))), inplace=True))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.mean(dim=(2, 3))
