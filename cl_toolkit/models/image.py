"""Image backbones: inputs ``[B, *input_shape]`` -> features ``[B, feat_dim]``, with
``feat_dim`` exposed; `cl_toolkit.models.heads.Classifier` puts the heads on them.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..validation import at_least, between

DROPOUT = between(0, 1, high_open=True)


class MLP(nn.Module):
    """Flatten -> (Linear -> ReLU -> Dropout) per hidden layer. ``feat_dim`` = last hidden."""

    ranges = {"hidden": at_least(1), "dropout": DROPOUT}
    smoke = {"hidden": [16]}

    def __init__(self, input_shape: Sequence[int], hidden: Sequence[int] = (256, 256),
                 dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        self.net = nn.Sequential(*layers)
        self.feat_dim = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    """Conv(3x3)-BN-ReLU-MaxPool blocks, global average pool; works from 8x8 inputs up."""

    ranges = {"channels": at_least(1)}
    smoke = {"channels": [4, 4, 4]}

    def __init__(self, input_shape: Sequence[int], channels: Sequence[int] = (32, 64, 128)):
        super().__init__()
        in_ch, blocks = input_shape[0], []
        for i, c in enumerate(channels):
            blocks += [nn.Conv2d(in_ch, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
                       nn.ReLU()]
            if i < len(channels) - 1:
                blocks.append(nn.MaxPool2d(2))
            in_ch = c
        self.net = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.feat_dim = in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ReducedResNet18(nn.Module):
    """ResNet18 with ``nf`` base filters (nf=20 gives 160-d features), the reduced network of
    Lopez-Paz & Ranzato (GEM, https://arxiv.org/abs/1706.08840) used by KCL and most of the CL
    literature: a 3x3 stem without max-pool, four stages of two blocks (nf, 2nf, 4nf, 8nf,
    strides 1, 2, 2, 2) and global average pooling (= 4x4 average pooling on 32x32 inputs)."""

    ranges = {"nf": at_least(1)}
    smoke = {"nf": 4}

    def __init__(self, input_shape: Sequence[int], nf: int = 20, blocks=(2, 2, 2, 2)):
        super().__init__()
        self._build(input_shape[0], nf, blocks, BasicBlock)

    def _build(self, in_channels: int, nf: int, blocks, make_block) -> None:
        """Stem and stages; ``make_block(in_planes, planes, stride)`` makes one residual block."""
        self.conv1 = nn.Conv2d(in_channels, nf, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(nf)
        stages, in_planes = [], nf
        for i, n in enumerate(blocks):
            planes = nf * 2 ** i
            for j in range(n):
                stages.append(make_block(in_planes, planes, (1 if i == 0 else 2) if j == 0 else 1))
                in_planes = planes
        self.layers = nn.Sequential(*stages)
        self.feat_dim = in_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)


class KCLBlock(nn.Module):
    """The residual block of KCL's public code: conv3x3 -> ReLU -> BatchNorm -> Dropout, plus the
    shortcut (a bias-free 1x1 conv, no BatchNorm, where the shape changes), then ReLU ->
    BatchNorm -> Dropout. One conv per block: the reference defines a second one and never
    calls it."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float):
        super().__init__()
        self.conv = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1, self.bn2 = nn.BatchNorm2d(planes), nn.BatchNorm2d(planes)
        self.drop1, self.drop2 = nn.Dropout(dropout), nn.Dropout(dropout)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.drop1(self.bn1(F.relu(self.conv(x))))
        return self.drop2(self.bn2(F.relu(out + self.shortcut(x))))


class KCLReducedResNet18(ReducedResNet18):
    """The reduced ResNet18 as KCL's public code builds it (github.com/mmderakhshani/KCL,
    stable_sgd/models.py), for KCL's SplitCIFAR100 protocol (https://arxiv.org/abs/2107.05757):
    the stem and stages of `ReducedResNet18` (nf, 2nf, 4nf, 8nf; 160-d features at nf=20) with
    `KCLBlock`s, dropout in every block. Its 62.7 % SplitCIFAR100 figure is for this network."""

    ranges = {"dropout": DROPOUT}

    def __init__(self, input_shape: Sequence[int], nf: int = 20, dropout: float = 0.02,
                 blocks=(2, 2, 2, 2)):
        nn.Module.__init__(self)
        self._build(input_shape[0], nf, blocks,
                    lambda in_planes, planes, stride: KCLBlock(in_planes, planes, stride, dropout))
