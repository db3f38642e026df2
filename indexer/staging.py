"""The staging area of a store (``STORE/staging``): one index run's finished parts, so a killed run resumes.

This module is the only place that knows the format; the local pipeline and the Ray engine both write and
read through :class:`Staging`, so a run killed under one engine resumes under the other. Files::

    run.json                       {"run_id", "settings", "started_at"}: a rerun that plans the same work
                                   (same run id) keeps the finished parts; any other run starts clean
    part-NNNNNN.npz                ids (int64) and raw features (float32, n × feature dim) of the part's
                                   readable images, in plan order
    part-NNNNNN.json               {"rows": catalog rows, "errors": unreadable files}; written last, so its
                                   presence marks the part finished
    fitted-aligner-KEY.safetensors an aligner fitted by ``--fit-aligner``, named by what the fit read

Every file is written atomically (temporary file, fsync, rename).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from t2c.data.store import atomic_save_npz, atomic_write_bytes, utcnow

RUN_FILE = "run.json"


@dataclass
class ItemResult:
    """What became of one planned file: its raw features and image facts, or why it could not be read."""

    ok: bool
    feats: np.ndarray | None = None
    width: int = 0
    height: int = 0
    content_hash: str = ""
    reason: str = ""
    message: str = ""


class Staging:
    """The staging folder of one store (``StoreWriter.staging``)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def part_file(self, i: int, suffix: str) -> Path:
        """``part-NNNNNN.npz`` (features) or ``part-NNNNNN.json`` (rows): the one spelling of a part's name."""
        return self.folder / f"part-{int(i):06d}{suffix}"

    def done_parts(self) -> set[int]:
        """Indices of the parts whose rows file exists (written last, so the part is complete)."""
        return {int(p.stem.split("-")[1]) for p in self.folder.glob("part-*.json")}

    def prepare(self, run_id: str, settings: dict) -> set[int]:
        """Keep a killed run's finished parts when this run plans the same work; else start clean.

        Returns:
            The indices of the parts already finished.
        """
        meta = self.folder / RUN_FILE
        if meta.is_file():
            try:
                old = json.loads(meta.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                old = {}
            if isinstance(old, dict) and old.get("run_id") == run_id:
                return self.done_parts()
        self.clear()
        atomic_write_bytes(meta, json.dumps({"run_id": run_id, "settings": settings,
                                             "started_at": utcnow().isoformat()}).encode())
        return set()

    def clear(self) -> None:
        """Remove every staged file (a finished or abandoned run)."""
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(exist_ok=True)

    def write_part(self, i: int, items: Sequence[dict], results: Iterable[ItemResult], dim: int,
                   user_columns: dict) -> None:
        """Write one finished part atomically: features first, then the rows file that marks it done.

        Args:
            i: part index. items: the planned files (id, path, relpath, size, mtime_ns, kind), in order.
            results: one :class:`ItemResult` per item, in the same order. dim: raw feature dimension.
            user_columns: {relpath: {column: value}} added to the catalog rows.
        """
        feats, rows, errors = [], [], []
        for item, r in zip(items, results, strict=True):
            if r.ok:
                row = {"id": item["id"], "path": item["path"], "relpath": item["relpath"],
                       "content_hash": r.content_hash, "size": item["size"], "width": int(r.width),
                       "height": int(r.height), "mtime_ns": item["mtime_ns"], "_kind": item["kind"]}
                row.update(user_columns.get(item["relpath"], {}))
                rows.append(row)
                feats.append(r.feats)
            else:
                errors.append({"path": item["path"], "reason": r.reason, "message": r.message,
                               "size": item["size"], "mtime_ns": item["mtime_ns"], "id": item["id"],
                               "_kind": item["kind"]})
        f = np.stack(feats).astype(np.float32) if feats else np.zeros((0, dim), np.float32)
        ids = np.array([r["id"] for r in rows], np.int64)
        atomic_save_npz(self.part_file(i, ".npz"), ids=ids, feats=f)
        atomic_write_bytes(self.part_file(i, ".json"),
                           json.dumps({"rows": rows, "errors": errors}, default=str).encode())

    def read_part(self, i: int) -> tuple[dict, Path]:
        """A finished part: its ``{"rows", "errors"}`` and the path of its features file."""
        return json.loads(self.part_file(i, ".json").read_text()), self.part_file(i, ".npz")

    def fitted_aligner(self, key: str) -> Path:
        """Where a run keeps the aligner it fitted (``key``: a hash of what the fit read)."""
        return self.folder / f"fitted-aligner-{key}.safetensors"
