"""A factory whose constructor fails, as a half-written model class would."""

from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        raise ValueError(f"cannot build a net with {num_classes} classes")
