"""Models, built from ``conf/model/*.yaml`` with the dataset's input shape and class count."""

from __future__ import annotations

import math

import torch
from torch import nn


class MLR(nn.Module):
    """Multinomial logistic regression: one linear layer on the flattened input (pFedMe's MLR)."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        self.fc = nn.Linear(math.prod(input_shape), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


class MLP(nn.Module):
    """Fully connected ReLU network; ``hidden`` lists the hidden widths."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...] = (200,)):
        super().__init__()
        layers: list[nn.Module] = []
        width = math.prod(input_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x.flatten(1)))


class FemnistCNN(nn.Module):
    """LEAF's FEMNIST CNN (arXiv 1812.01097): two 5x5 conv + 2x2 max-pool blocks (32, 64 channels),
    a 2048-unit dense layer and the classifier."""

    def __init__(self, input_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 62):
        super().__init__()
        channels, height, width = input_shape
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.fc = nn.Sequential(nn.Linear(64 * (height // 4) * (width // 4), 2048), nn.ReLU())
        self.head = nn.Linear(2048, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(self.features(x).flatten(1)))
