"""The writing side of the public API: index a folder into a store, list encoders, fit an aligner."""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from t2c._results import EncoderList
from t2c.data.errors import InvalidInput, UnknownChoice

if TYPE_CHECKING:  # pragma: no cover - type hints only
    from t2c.indexer.aligner import Aligner
    from t2c.indexer.pipeline import IndexReport

DEFAULT_MAX_PIXELS = 89_478_485


def index(source: str | os.PathLike[str], store: str | os.PathLike[str], *, encoder: str,
          aligner: str | os.PathLike[str] | None = None, fit_aligner: int | None = None, clip: str | None = None,
          progress: bool = False, engine: str = "local", follow_symlinks: bool = False, workers: int | None = None,
          batch_size: int = 32, device: str | None = None, threads: int | None = None,
          max_pixels: int = DEFAULT_MAX_PIXELS, memory_budget_mb: int | None = None, part_size: int = 256,
          address: str | None = None, column: str = "path", actors: int = 1, gpus_per_actor: float = 0.0,
          columns: dict[str, dict[str, Any]] | None = None) -> "IndexReport":
    """Index a folder of images into a store: create it, resume a killed run, or update it incrementally.

    Args:
        source: a folder of images (walked recursively), or with ``engine="ray"`` a ``.parquet`` list of paths.
        store: the store folder (created if missing).
        encoder: an encoder spec, e.g. ``"world:pairnet"`` or ``"timm:resnet50.a1_in1k"`` (see :func:`encoders`).
        aligner: an aligner file from :func:`align`; or ``fit_aligner=N`` to fit one on N images of the source.
            A CLIP encoder needs neither.
        clip: the CLIP spec to align into (default: ``world:clip`` for world encoders, else OpenAI ViT-B/32).
        progress: draw a progress bar on stderr.
        engine: ``"local"`` (decode processes + one encoder) or ``"ray"`` (Ray Data stages; ``address``,
            ``column``, ``actors``, ``gpus_per_actor``).
        follow_symlinks / workers / batch_size / device / threads / max_pixels / memory_budget_mb / part_size:
            as the ``t2c index`` options of the same names.
        columns: extra catalog columns, ``{path relative to the folder: {column: value}}``; queries can filter
            on them (``split="val"``) and :meth:`Store.table` returns them.

    Returns:
        An ``IndexReport``: added, updated, removed, unchanged, errors, seconds, images_per_second, aligner_r2,
        snapshot, error_reasons.

    Raises:
        NotFound / InvalidInput: a bad source; StoreError: the store is locked, damaged or built with another
        encoder; AlignerError: no usable aligner; EncoderError / UnknownChoice: a bad encoder spec.

    Example:
        >>> import t2c
        >>> t2c.index("photos/", "photos.t2c", encoder="world:pairnet", fit_aligner=500)  # doctest: +SKIP
        IndexReport(store='photos.t2c', added=1500, ...)
    """
    common = dict(aligner=str(aligner) if aligner else None, fit_aligner=fit_aligner, clip=clip,
                  follow_symlinks=follow_symlinks, batch_size=batch_size, device=device, threads=threads,
                  max_pixels=max_pixels, memory_budget=memory_budget_mb << 20 if memory_budget_mb else None,
                  progress=progress, part_size=part_size, user_columns=columns)
    if engine == "local":
        from t2c.indexer.pipeline import index_folder

        return index_folder(source, store, encoder, workers=workers, **common)
    if engine == "ray":
        from t2c.indexer.ray_engine import index_folder_ray

        return index_folder_ray(source, store, encoder, address=address, column=column, encoder_actors=actors,
                                gpus_per_actor=gpus_per_actor, **common)
    raise UnknownChoice("engine", engine, ["local", "ray"])


def encoders() -> EncoderList:
    """The encoders ``t2c`` can use: the bundled world models and one row per source (``timm:NAME``, ...).

    Returns:
        An ``EncoderList`` of ``EncoderInfo`` rows (spec, source, dim, has_text, description); ``.options``
        describes the ``features=`` spec option.

    Example:
        >>> import t2c
        >>> [e.spec for e in t2c.encoders() if e.has_text]
        ['world:clip', 'open_clip:NAME']
    """
    from t2c.indexer.encoders import FEATURE_MODES, list_encoders

    return EncoderList(list_encoders(), FEATURE_MODES)


def align(images: str | os.PathLike[str], *, encoder: str, clip: str | None = None, max_images: int = 5000,
          out: str | os.PathLike[str] | None = None, batch_size: int = 32, device: str | None = None,
          progress: bool = False) -> "Aligner":
    """Fit a linear map from an encoder's features into CLIP image space, from images alone (no labels).

    Closed-form ridge regression with an unpenalised bias; the ridge strength is chosen on held-out images and
    the held-out R² is reported.

    Args:
        images: a folder of images (walked recursively); ``max_images`` of them, spread over the folder, are used.
        encoder: the encoder spec to align. clip: the CLIP spec to align into (default as in :func:`index`).
        out: also save the aligner there (a ``.safetensors`` file), for ``t2c.index(..., aligner=out)``.
        batch_size / device / progress: encoder batch, ``cpu`` or ``cuda``, progress bar.

    Returns:
        The fitted ``Aligner``: ``.r2_heldout``, ``.r2_per_dim``, ``.meta`` (encoder, clip, n_train, n_heldout,
        alpha) and ``.save(path)``.

    Raises:
        InvalidInput: ``out`` is not a ``.safetensors`` path, or no readable images. EncoderError /
        UnknownChoice: a bad spec. AlignerError: the target has no text tower.

    Example:
        >>> import t2c
        >>> al = t2c.align("photos/", encoder="world:pairnet", out="pairnet.safetensors")  # doctest: +SKIP
        >>> round(al.r2_heldout, 2)  # doctest: +SKIP
        0.7
    """
    from t2c.data.sources import walk_folder
    from t2c.indexer.encoders import make_encoder
    from t2c.indexer.pipeline import _spread, default_clip_for, fit_aligner_on_folder

    if out is not None and Path(out).suffix != ".safetensors":
        raise InvalidInput(f"out={str(out)!r} must end in .safetensors", "e.g. out='resnet50_to_vitb32.safetensors'")
    if int(max_images) < 2:
        raise InvalidInput(f"max_images={max_images} is too small", "fit on at least a few hundred images")
    enc = make_encoder(encoder, batch_size=batch_size, device=device)
    paths = _spread([f.path for f in walk_folder(images).files], int(max_images))
    al = fit_aligner_on_folder(enc, clip or default_clip_for(enc.spec), paths, progress=progress,
                               batch_size=batch_size, device=device)
    if out is not None:
        al.save(out)
    return al
