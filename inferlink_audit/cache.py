"""Finished sweeps kept on disk between runs, so re-running an unchanged audit is cheap.

A cache is only worth having if it can never make an audit wrong. Each entry is one JSON
file, written atomically, that stores its key and a SHA-256 of its payload; an entry that
cannot be read, does not parse, names another key or fails its checksum is deleted and
reported as a miss, so the sweep is recomputed rather than trusted. The key itself (see
``AuditSession.cache_key``) covers the checkpoint hash, the content of the test tensors as
loaded (:func:`tensors_sha256`), the source of the code that builds the model
(``LoadedModel.source_sha256``), everything in the spec that changes a sweep, and the library
and torch versions, so a stale entry is simply never looked up.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .fileio import atomic_write_text
from .results import SweepResult, sweep_from_dict

__all__ = ["CACHE_FORMAT", "DiskSweepCache", "tensors_sha256"]

CACHE_FORMAT = "inferlink-audit/sweep-cache/v1"
RECORD_FORMAT = "inferlink-audit/sweep-cache-record/v1"
_SAFE_NAME = re.compile(r"^[0-9a-f]{16,128}$")


class DiskSweepCache:
    """The ``SweepCache`` protocol on a folder: one checksummed JSON file per key.

    ``hits`` and ``misses`` count lookups (a discarded corrupt entry counts as a miss and in
    ``discarded``); ``write_errors`` counts entries that could not be stored, which only costs
    a recomputation next time and therefore never fails the audit.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.hits = 0
        self.misses = 0
        self.discarded = 0
        self.write_errors = 0

    def path_for(self, key: str) -> Path:
        """Where ``key``'s entry lives; keys that are not plain hex digests are hashed first."""
        name = key if _SAFE_NAME.match(key) else hashlib.sha256(key.encode()).hexdigest()
        return self.folder / f"{name}.json"

    def get(self, key: str) -> list[SweepResult] | None:
        path = self.path_for(key)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            self.misses += 1
            return None
        except (OSError, UnicodeDecodeError):
            self._discard(path)
            return None
        sweeps = _decode(text, key)
        if sweeps is None:
            self._discard(path)
            return None
        self.hits += 1
        return sweeps

    def put(self, key: str, sweeps: list[SweepResult]) -> None:
        # NaN is allowed on purpose: a score can be undefined, and Python reads it back exactly.
        body = json.dumps([_encoded(s) for s in sweeps], sort_keys=True, separators=(",", ":"))
        entry = {"format": CACHE_FORMAT, "key": key, "sha256": _digest(body), "payload": body}
        try:
            atomic_write_text(self.path_for(key), json.dumps(entry) + "\n")
        except OSError:
            self.write_errors += 1

    def put_record(self, key: str, record: dict[str, Any]) -> None:
        """Keep a JSON record with ``key``'s sweeps (what results.json says of how they were
        computed, e.g. ``compute``'s bf16 calibration), checksummed like the sweeps."""
        body = json.dumps(record, sort_keys=True, separators=(",", ":"))
        entry = {"format": RECORD_FORMAT, "key": key, "sha256": _digest(body), "payload": body}
        try:
            atomic_write_text(self._record_path(key), json.dumps(entry) + "\n")
        except OSError:
            self.write_errors += 1

    def get_record(self, key: str) -> dict[str, Any] | None:
        """The record ``put_record`` kept for ``key``; None when absent or not exactly that."""
        path = self._record_path(key)
        try:
            entry: Any = json.loads(path.read_text(encoding="utf-8"))
            body = entry["payload"]
            if (entry["format"], entry["key"], entry["sha256"]) == (
                RECORD_FORMAT,
                key,
                _digest(body),
            ):
                record = json.loads(body)
                if isinstance(record, dict):
                    return record
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError):
            pass
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
        return None

    def _record_path(self, key: str) -> Path:
        return self.path_for(key).with_suffix(".record.json")

    def _discard(self, path: Path) -> None:
        self.misses += 1
        self.discarded += 1
        # An entry that cannot be deleted is still never trusted: the next get discards it again.
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)


def tensors_sha256(*tensors: torch.Tensor) -> str:
    """SHA-256 of tensors' dtypes, shapes and bytes, in order.

    The sweep cache keys on this for the test data, so a regenerated ``test.pt`` (same file
    name, same spec) is a new key even though nothing in the spec changed.
    """
    digest = hashlib.sha256()
    for tensor in tensors:
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{flat.dtype}{tuple(tensor.shape)};".encode())
        # Viewed as bytes, so every dtype (bfloat16 and bool included) hashes what it stores.
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _encoded(sweep: SweepResult) -> dict[str, Any]:
    """A sweep's JSON form, its per-example outcomes as packed, base64-encoded bits."""
    item = asdict(sweep)
    item["outcomes"] = None if sweep.outcomes is None else sweep.outcomes.to_json()
    return item


def _digest(body: str) -> str:
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def _decode(text: str, key: str) -> list[SweepResult] | None:
    """The entry's sweeps, or None when anything about it is not exactly what ``put`` wrote."""
    try:
        entry: Any = json.loads(text)
        if not isinstance(entry, dict) or entry.get("format") != CACHE_FORMAT:
            return None
        body = entry.get("payload")
        if entry.get("key") != key or not isinstance(body, str):
            return None
        if entry.get("sha256") != _digest(body):
            return None
        items = json.loads(body)
        if not isinstance(items, list):
            return None
        return [sweep_from_dict(item) for item in items]
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
