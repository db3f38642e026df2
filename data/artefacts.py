"""Saved artefacts (aligners, model weights, caption decoders, concept bottlenecks): one writer, one reader.

Every artefact is one safetensors file: tensors plus string metadata, whose ``format`` key (when the kind
has one) names what the file is. :func:`write_artefact` writes it atomically (a uniquely named temporary
file, fsync, rename); :func:`read_artefact` reads it, and any file that cannot be read as the kind asked
for (missing tensors, truncated, corrupt, another format) raises the same :class:`DamagedArtefact`.
torch tensors are written and read when ``framework="pt"``; nothing here imports torch otherwise.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping

from t2c.data.errors import DamagedArtefact, NotFound
from t2c.data.store import SHARED_MODE, atomic_write_bytes


def cache_root() -> Path | None:
    """The on-disk cache folder named by ``$T2C_CACHE_DIR`` (None: unset or empty, no disk cache). Concept
    vectors, calibrations, converted models and kept random inits live under it."""
    root = os.environ.get("T2C_CACHE_DIR") or None
    return Path(root).expanduser() if root else None


def write_artefact(path: str | os.PathLike, tensors: Mapping, metadata: Mapping[str, str] | None = None) -> Path:
    """Write tensors (numpy arrays, or torch tensors) and string metadata as one safetensors file, atomically.

    Args:
        path: the file to write (its folder is created).
        tensors: name -> numpy array, or name -> torch tensor (all of one kind).
        metadata: string -> string; put the artefact's ``format`` here.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = dict(tensors)
    if any(type(v).__module__.split(".")[0] == "torch" for v in tensors.values()):
        from safetensors.torch import save

        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    else:
        from safetensors.numpy import save
    data = save(tensors, metadata={str(k): str(v) for k, v in (metadata or {}).items()})
    return atomic_write_bytes(path, data, mode=SHARED_MODE)


def read_artefact(path: str | os.PathLike, kind: str, *, fix: str, formats: str | Iterable[str] | None = None,
                  required: Iterable[str] = (), framework: str = "numpy", header_only: bool = False
                  ) -> tuple[dict, dict]:
    """Read an artefact written by :func:`write_artefact`.

    Args:
        path: the file. kind: what it should be, for messages ("aligner", "caption decoder", ...).
        fix: how a person gets a good file (the hint of NotFound and DamagedArtefact).
        formats: the ``format`` metadata value(s) accepted (None: any).
        required: tensor names the file must hold.
        framework: "numpy" or "pt" (torch tensors). header_only: read the metadata only (tensors: {}).

    Returns:
        (metadata, tensors).

    Raises:
        NotFound: no such file. DamagedArtefact: unreadable, another format, or tensors missing.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise NotFound(f"{kind} file {str(path)!r} does not exist", fix)
    try:
        with safe_open(str(path), framework=framework) as fh:
            md = fh.metadata() or {}
            tensors = {} if header_only else {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as e:  # noqa: BLE001 - truncated, corrupt or not safetensors at all: the file's fault
        raise DamagedArtefact(f"{kind} file {str(path)!r} is damaged or not a safetensors file "
                              f"({type(e).__name__}: {str(e)[:200]})", fix) from None
    accepted = [formats] if isinstance(formats, str) else list(formats or [])
    if accepted and md.get("format") not in accepted:
        raise DamagedArtefact(f"{str(path)!r} is not a text2concept {kind} "
                              f"(format {md.get('format')!r}, expected {' or '.join(map(repr, accepted))})", fix)
    missing = [k for k in required if k not in tensors and not header_only]
    if missing:
        raise DamagedArtefact(f"{kind} file {str(path)!r} lacks tensor(s) {', '.join(missing)}", fix)
    return md, tensors
