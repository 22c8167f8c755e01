"""Teacher and student architectures, and one CAM interface for all of them.

``build_model(arch, num_classes, in_channels, image_size)`` gives a plain
``nn.Module`` whose state dict is the library's own (torchvision's or timm's
keys), so published state dicts load into it. ``cam_interface(model)`` wraps it
in an adapter with

- ``forward_features(x)``: the last spatial feature map (B,K,h,w), the tensor
  the classifier head reads;
- ``forward_head(features)``: logits from those features;
- ``classifier_weight()``: the head's weight, (classes, K) after global average
  pooling, or (classes, K, h, w) for a flatten head (ConvNet),

so one forward gives the logits and the CAM's features (paper Eq. 1:
C_y = sum_k w_{y,k} f_k) with no extra pass.

Architectures:

- ``convnet3`` ... ``convnet6``: the ConvNet of MTT/RDED: depth x [3x3 conv,
  width 128, BatchNorm, ReLU, 2x2 average pool], flatten, linear. As in MTT,
  a single-channel input gets padding 3 in the first conv (28 px -> 32 px).
- ``resnet18`` / ``resnet50`` / ``resnet101``: torchvision's ResNets; for
  image_size <= 64 the small-image stem (3x3 conv stride 1, no max-pool).
- ``mobilenetv2`` / ``efficientnet_b0``: torchvision's; for image_size <= 64
  the stem conv has stride 1.
- anything else: ``timm.create_model(arch, pretrained=False)``.
"""
from __future__ import annotations

from typing import Callable, Dict, Protocol

import torch
import torch.nn as nn

from nrrdd.errors import UsageError

SMALL_IMAGE_MAX = 64
CONVNET_WIDTH = 128


class ConvNet(nn.Module):
    """The MTT/RDED ConvNet with BatchNorm: ``depth`` conv blocks, a flatten head."""

    def __init__(self, depth: int, num_classes: int, in_channels: int, image_size: int,
                 width: int = CONVNET_WIDTH):
        super().__init__()
        layers = []
        c, size = in_channels, image_size
        for d in range(depth):
            pad = 3 if in_channels == 1 and d == 0 else 1
            layers += [nn.Conv2d(c, width, kernel_size=3, padding=pad),
                       nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                       nn.AvgPool2d(kernel_size=2, stride=2)]
            size = (size + 2 * pad - 2) // 2
            c = width
            if size < 1:
                raise UsageError(f"convnet{depth} needs larger images than {image_size} px "
                                 f"(the feature map vanishes after block {d + 1})")
        self.features = nn.Sequential(*layers)
        self.feature_shape = (width, size, size)
        self.classifier = nn.Linear(width * size * size, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(features.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def classifier_weight(self) -> torch.Tensor:
        return self.classifier.weight.view(self.classifier.out_features, *self.feature_shape)


def _resnet(name: str) -> Callable[[int, int, int], nn.Module]:
    def build(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
        import torchvision

        model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
        if image_size <= SMALL_IMAGE_MAX:
            model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
            model.maxpool = nn.Identity()
        elif in_channels != 3:
            model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        return model
    return build


def _stem_conv(conv: nn.Conv2d, in_channels: int, small: bool) -> nn.Conv2d:
    return nn.Conv2d(in_channels, conv.out_channels, kernel_size=conv.kernel_size,
                     stride=1 if small else conv.stride, padding=conv.padding, bias=conv.bias is not None)


def _torchvision_features(name: str) -> Callable[[int, int, int], nn.Module]:
    def build(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
        import torchvision

        model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
        small = image_size <= SMALL_IMAGE_MAX
        if small or in_channels != 3:
            model.features[0][0] = _stem_conv(model.features[0][0], in_channels, small)
        return model
    return build


ARCHS: Dict[str, Callable[[int, int, int], nn.Module]] = {
    **{f"convnet{d}": (lambda d: lambda nc, ic, s: ConvNet(d, nc, ic, s))(d) for d in range(3, 7)},
    "resnet18": _resnet("resnet18"),
    "resnet50": _resnet("resnet50"),
    "resnet101": _resnet("resnet101"),
    "mobilenetv2": _torchvision_features("mobilenet_v2"),
    "efficientnet_b0": _torchvision_features("efficientnet_b0"),
}


def known_arch(arch: str) -> bool:
    if arch in ARCHS:
        return True
    import timm

    return timm.is_model(arch)


def build_model(arch: str, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """A freshly initialised ``arch`` for ``num_classes`` classes, ``in_channels``
    input channels and square images of side ``image_size``. Raises
    :class:`UsageError` for an unknown name."""
    if arch in ARCHS:
        return ARCHS[arch](int(num_classes), int(in_channels), int(image_size))
    import timm

    if not timm.is_model(arch):
        raise UsageError(f"unknown arch {arch!r} (choose from {', '.join(ARCHS)} or a timm model name)")
    try:
        return timm.create_model(arch, pretrained=False, num_classes=int(num_classes),
                                 in_chans=int(in_channels))
    except Exception as e:
        raise UsageError(f"timm cannot build {arch!r} for {in_channels} channels, "
                         f"{num_classes} classes: {e}") from None


# ------------------------------------------------------------- CAM interface
class CamModel(Protocol):
    def forward_features(self, x: torch.Tensor) -> torch.Tensor: ...
    def forward_head(self, features: torch.Tensor) -> torch.Tensor: ...
    def classifier_weight(self) -> torch.Tensor: ...


class _ResNetCam:
    def __init__(self, m):
        self.m = m

    def forward_features(self, x):
        m = self.m
        x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        return m.layer4(m.layer3(m.layer2(m.layer1(x))))

    def forward_head(self, f):
        return self.m.fc(torch.flatten(self.m.avgpool(f), 1))

    def classifier_weight(self):
        return self.m.fc.weight


class _FeaturesClassifierCam:
    """torchvision MobileNetV2 / EfficientNet: ``features``, pooling, ``classifier``."""

    def __init__(self, m):
        self.m = m

    def forward_features(self, x):
        return self.m.features(x)

    def forward_head(self, f):
        return self.m.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(f, 1), 1))

    def classifier_weight(self):
        return _head_weight(self.m.classifier)


class _TimmCam:
    def __init__(self, m):
        self.m = m

    def forward_features(self, x):
        return self.m.forward_features(x)

    def forward_head(self, f):
        return self.m.forward_head(f)

    def classifier_weight(self):
        return _head_weight(self.m.get_classifier())


def _head_weight(head: nn.Module) -> torch.Tensor:
    """The weight of the last linear (or 1x1 conv) layer of a head, as (classes, K)."""
    layers = [m for m in head.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not layers:
        raise UsageError(f"the classifier head {type(head).__name__} has no linear layer for a CAM")
    w = layers[-1].weight
    return w.flatten(1) if w.dim() == 4 and tuple(w.shape[2:]) == (1, 1) else w


def cam_interface(model: nn.Module) -> CamModel:
    """The CAM adapter of ``model`` (see the module docstring).

    The weight comes back 2-D (classes, K) for pooled heads (a 1x1-conv
    classifier is viewed as such) or 4-D for a flatten head.
    """
    import torchvision

    if isinstance(model, ConvNet):
        return model
    if isinstance(model, torchvision.models.ResNet):
        return _ResNetCam(model)
    if isinstance(model, (torchvision.models.MobileNetV2, torchvision.models.EfficientNet)):
        return _FeaturesClassifierCam(model)
    if all(hasattr(model, a) for a in ("forward_features", "forward_head", "get_classifier")):
        return _TimmCam(model)
    raise UsageError(f"{type(model).__name__} offers no CAM interface (forward_features, "
                     "forward_head, get_classifier)")


def check_cam_shapes(model: nn.Module, in_channels: int, image_size: int,
                     device: torch.device | str = "cpu") -> None:
    """One eval forward of two blank images: the features must be (B,K,h,w) and
    fit the classifier weight, or :class:`UsageError`."""
    cam = cam_interface(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            f = cam.forward_features(torch.zeros(2, in_channels, image_size, image_size, device=device))
    finally:
        model.train(was_training)
    w = cam.classifier_weight()
    if f.dim() != 4:
        raise UsageError(f"{type(model).__name__}'s features have shape {tuple(f.shape)}, "
                         "not (B,K,h,w): no CAM for this architecture")
    if w.shape[1] != f.shape[1] or (w.dim() == 4 and tuple(w.shape[2:]) != tuple(f.shape[2:])):
        raise UsageError(f"classifier weight {tuple(w.shape)} does not fit features {tuple(f.shape)}")
