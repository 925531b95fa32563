"""A model whose own initialisation leaves NaN in its weights (audited without a checkpoint)."""

import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.fc = nn.Linear(64, num_classes)
        with torch.no_grad():
            self.fc.weight[0, 0] = float("nan")

    def forward(self, x):
        return self.fc(x.flatten(1))
