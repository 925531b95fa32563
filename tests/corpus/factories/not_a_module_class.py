"""A class that is not an nn.Module, and whose constructor would create a file."""

from pathlib import Path


class Net:
    def __init__(self, num_classes: int = 10) -> None:
        Path("PWNED").write_text("the constructor of a non-module class ran\n")
