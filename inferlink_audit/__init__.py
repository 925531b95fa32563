"""inferlink-audit: gate the release of PyTorch classifiers on robustness.

The library stresses a network internally (synaptic filtering: zeroing weights by value
thresholds) and externally (adversarial and noise attacks), labels each layer fragile,
robust or antifragile (Pravin et al., 2024), asserts a spec's thresholds and reports.
It never imports pytest; the pytest plugin is a thin layer over it.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
