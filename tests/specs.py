"""Small audit specs over the bundled digits CNN, written into a test's folder."""

from __future__ import annotations

from pathlib import Path

import yaml

EXAMPLES = Path(__file__).resolve().parents[1] / "example_audits"

# results.json meta that differs between two runs of one audit: when, how long, peak memory,
# how fast bf16 ran against fp32.
RUN_DEPENDENT_META = ("started", "seconds", "timings", "peak_memory_mb", "bf16_speed")


def digits_spec(**overrides: object) -> dict[str, object]:
    """A quick spec: 120 test digits, 5 thresholds; top-level keys replaced by ``overrides``."""
    spec: dict[str, object] = {
        "version": 1,
        "name": "digits-small",
        "model": {
            "factory": f"{EXAMPLES / 'digits.py'}:DigitsCNN",
            "kwargs": {"num_classes": 10},
            "checkpoint": str(EXAMPLES / "digits_cnn.safetensors"),
        },
        "data": {
            "source": "sklearn_digits",
            "limit": 120,
            "batch_size": 120,
            "normalize": {"mean": [0.5], "std": [0.5]},
        },
        "device": "cpu",
        "filtering": {"thresholds": 5},
        "attacks": [{"fgsm": {"eps": 0.1}}],
    }
    spec.update(overrides)
    return spec


def write_spec(folder: Path, filename: str = "audit.yaml", **overrides: object) -> Path:
    path = folder / filename
    path.write_text(yaml.safe_dump(digits_spec(**overrides), sort_keys=False))
    return path
