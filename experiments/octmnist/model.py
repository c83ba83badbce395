"""The course's CNN for OCTMNIST (SPEC §3, Q2), with and without max-pooling."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

N_CLASSES = 4
HIDDEN = 320  # width of the dropout layer (fc1 output)
FLAT = 576    # 16 channels x 6 x 6 after the second conv block


class CNN(nn.Module):
    """Two conv blocks + three linear layers, log-softmax output.

    ``no_maxpool=False``: conv(1->8, k3, s1, p1) -> ReLU -> maxpool 2 -> conv(8->16, k3, s1, p0) -> ReLU
    -> maxpool 2.  ``no_maxpool=True``: the convs use stride 2 instead (28->14->6) and there is no
    pooling.  Both then flatten 576 -> Linear 320 -> ReLU -> Dropout -> Linear 120 -> ReLU -> Linear 4.
    224,892 trainable parameters either way.

    ``forward(x, dropout_mask=m)`` multiplies the fc1 activations by ``m`` (already scaled by
    ``1/(1-p)``) instead of drawing a fresh mask from the global RNG; the trainer uses it so that
    single- and multi-process runs use the very same masks.
    """

    def __init__(self, dropout_prob: float = 0.7, no_maxpool: bool = False):
        super().__init__()
        self.no_maxpool = no_maxpool
        self.dropout_prob = dropout_prob
        stride, pad1 = (2, 1) if no_maxpool else (1, 1)
        self.conv1 = nn.Conv2d(1, 8, kernel_size=3, stride=stride, padding=pad1)
        self.conv2 = nn.Conv2d(8, 16, kernel_size=3, stride=stride, padding=0)
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.fc1 = nn.Linear(FLAT, HIDDEN)
        self.drop = nn.Dropout(dropout_prob)
        self.fc2 = nn.Linear(HIDDEN, 120)
        self.fc3 = nn.Linear(120, N_CLASSES)

    def forward(self, x: torch.Tensor, dropout_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x.reshape(x.shape[0], 1, 28, 28)
        x = F.relu(self.conv1(x))
        if not self.no_maxpool:
            x = self.pool(x)
        x = F.relu(self.conv2(x))
        if not self.no_maxpool:
            x = self.pool(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        if dropout_mask is not None and self.training:
            x = x * dropout_mask
        else:
            x = self.drop(x)
        x = F.relu(self.fc2(x))
        return F.log_softmax(self.fc3(x), dim=1)


def count_trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


VARIANTS = ("maxpool", "no_maxpool")


def build_model(variant: str, dropout_prob: float = 0.7) -> CNN:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
    return CNN(dropout_prob=dropout_prob, no_maxpool=(variant == "no_maxpool"))
