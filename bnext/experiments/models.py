"""The paper's two networks, built with torch layers and converted by bnext.nn.convert(model, to=norm).

VGG (PROTOCOL.md [choice]): the VGG-11/13/16/19 layouts (the paper: VGG-16, conv widths
64,64,M,128,128,M,256x3,M,512x3,M,512x3,M) times a width multiplier, each conv followed by a
normalization layer then ReLU (conv -> norm -> ReLU), and a linear classifier on the 1x1 feature map.
Layer #k is the k-th conv layer (1-based). The paper numbers VGG-16's layers; `paper_layer` says which
layer of another depth stands for one of them (same block, same relative place in it).

DLN: 25 square linear layers without bias, y = W_25 ... W_1 x, with a normalization layer after every
linear layer but the last ([choice]).

Initialization: Glorot (Xavier) uniform for every conv/linear weight, zero biases ("glorot"), or
torch's default ("torch").
"""
from collections import OrderedDict
from typing import Dict, List

import torch
from torch import nn

import bnext

NORMS = ("none", "bn", "noisy_bn", "l1", "l2", "linf")
# Not a bnext.nn.convert target: the unnormalized network with noisy BN's noise injected after each conv
# (PROTOCOL.md claim 2, second half: "the same noise prevents a plain network from training").
PLAIN_NOISE = "noise"
VGG_NORMS = NORMS + (PLAIN_NOISE,)
# convs per block (5 blocks of 64, 128, 256, 512, 512 channels, each ending in a 2x2 max-pool)
VGG_BLOCKS = {"vgg11": (1, 1, 2, 2, 2), "vgg13": (2, 2, 2, 2, 2), "vgg16": (2, 2, 3, 3, 3), "vgg19": (2, 2, 4, 4, 4)}
VGG_CHANNELS = (64, 128, 256, 512, 512)


def vgg_layout(arch: str) -> List:
    """The conv widths and max-pools ("M") of a VGG depth, e.g. vgg16 -> 64, 64, M, 128, 128, M, ..."""
    if arch not in VGG_BLOCKS:
        raise ValueError(f"arch must be one of {sorted(VGG_BLOCKS)}, got {arch!r}")
    out = []
    for n, c in zip(VGG_BLOCKS[arch], VGG_CHANNELS):
        out += [c] * n + ["M"]
    return out


def paper_layer(k: int, arch: str) -> int:
    """The conv layer of `arch` standing for the paper's VGG-16 layer #k: the same block, at the same
    relative position inside it (first -> first, last -> last, middle rounded to even). For vgg11 the
    paper's #2, #3, #5, #9, #10, #11, #13 are #1, #2, #3, #5, #6, #7, #8."""
    ref, own = VGG_BLOCKS["vgg16"], VGG_BLOCKS[arch]
    if not 1 <= k <= sum(ref):
        raise ValueError(f"the paper's VGG-16 has conv layers 1..{sum(ref)}, got {k}")
    block, i = 0, k - 1
    while i >= ref[block]:
        i -= ref[block]
        block += 1
    j = round(i * (own[block] - 1) / (ref[block] - 1))
    return sum(own[:block]) + j + 1


def init_weights(model: nn.Module, scheme: str) -> None:
    if scheme == "torch":
        return
    if scheme != "glorot":
        raise ValueError(f"init must be 'glorot' or 'torch', got {scheme!r}")
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class VGG(nn.Module):
    """A VGG layout for 32x32 inputs: features (blocks conv/norm/relu and max-pools) + linear classifier."""

    def __init__(self, width: float = 1.0, num_classes: int = 10, in_channels: int = 3, arch: str = "vgg16"):
        super().__init__()
        layers, c, k = [], in_channels, 0
        for v in vgg_layout(arch):
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            k += 1
            out = max(1, int(round(v * width)))
            layers.append(nn.Sequential(OrderedDict(
                conv=nn.Conv2d(c, out, 3, padding=1), norm=nn.BatchNorm2d(out), relu=nn.ReLU())))
            c = out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))

    def blocks(self) -> List[nn.Sequential]:
        return [m for m in self.features if isinstance(m, nn.Sequential)]


class ChannelNoise(nn.Module):
    """Noisy BN's noise (the paper's Algorithm 1, same constants and [choice]s as bnext.noisy_batch_norm) applied
    to the raw input, without any normalization: in training mode, per call and channel j, mu_j ~ U(-n_mu, n_mu)
    and sigma_j ~ U(1, n_sigma); per value a, m ~ U(mu_j - r_mu, mu_j + r_mu), s ~ N(sigma_j, r_sigma), a -> s*a + m.
    Identity in eval mode. Draws from torch's default generator (the runner saves and restores it)."""

    def __init__(self, noise_mean: float = 0.5, noise_std: float = 1.25, noise_mean_spread: float = 0.1,
                 noise_std_spread: float = 0.1):
        super().__init__()
        self.noise_mean, self.noise_std = noise_mean, noise_std
        self.noise_mean_spread, self.noise_std_spread = noise_mean_spread, noise_std_spread

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        c = x.shape[1]
        shape = (1, c) + (1,) * (x.dim() - 2)
        mu = (torch.rand(c, device=x.device, dtype=x.dtype) * 2 - 1) * self.noise_mean
        sigma = 1 + torch.rand(c, device=x.device, dtype=x.dtype) * (self.noise_std - 1)
        m = mu.view(shape) + (torch.rand_like(x) * 2 - 1) * self.noise_mean_spread
        s = sigma.view(shape) + torch.randn_like(x) * self.noise_std_spread
        return s * x + m

    def extra_repr(self) -> str:
        return (f"noise_mean={self.noise_mean}, noise_std={self.noise_std}, "
                f"noise_mean_spread={self.noise_mean_spread}, noise_std_spread={self.noise_std_spread}")


def build_vgg(norm: str, width: float, init: str = "glorot", num_classes: int = 10, arch: str = "vgg16") -> VGG:
    model = VGG(width, num_classes, arch=arch)
    init_weights(model, init)
    if norm == PLAIN_NOISE:
        model = bnext.nn.convert(model, to="none")
        for block in model.blocks():
            block.norm = ChannelNoise()
        return model
    return bnext.nn.convert(model, to=norm)


def vgg_layer_names(model: VGG) -> Dict[str, List[str]]:
    """Module names of the conv layers (#1, #2, ...) and of the normalization outputs in the same order."""
    convs, norms = [], []
    for name, m in model.named_modules():
        if name.endswith(".conv"):
            convs.append(name)
        if name.endswith(".norm"):
            norms.append(name)
    return {"conv": convs, "norm": norms}


class DLN(nn.Module):
    """Deep linear network: `depth` bias-free dim x dim linear layers, a BatchNorm1d after each but the last."""

    def __init__(self, depth: int = 25, dim: int = 10):
        super().__init__()
        blocks = []
        for i in range(depth):
            parts = OrderedDict(linear=nn.Linear(dim, dim, bias=False))
            if i < depth - 1:
                parts["norm"] = nn.BatchNorm1d(dim)
            blocks.append(nn.Sequential(parts))
        self.layers = nn.Sequential(*blocks)

    def forward(self, x):
        return self.layers(x)


def build_dln(norm: str, depth: int, dim: int, init: str = "glorot") -> DLN:
    model = DLN(depth, dim)
    init_weights(model, init)
    return bnext.nn.convert(model, to=norm)


def named_points(model: nn.Module, suffix: str = ".norm") -> Dict[str, nn.Module]:
    """Modules whose outputs the activation monitor watches: every '<block>.norm' in forward order."""
    return OrderedDict((n, m) for n, m in model.named_modules() if n.endswith(suffix))
