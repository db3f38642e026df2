"""The Ray engine: the index pipeline (read → decode → encode → align → write) as Ray Data stages.

The run is planned exactly like the local pipeline (``t2c.indexer.pipeline.plan_run``: same ids, same run id,
same staging parts), so a store built here equals one built with ``index_folder``, and a run killed under
either engine resumes under either. Stages:

1. work items: one row per planned file (``idx`` = position in the plan, ``path``), in blocks;
2. decode: ``map_batches`` CPU tasks (``t2c.data.images.decode_for`` + ``t2c.indexer.preprocess.preprocess_image``);
   failures come back as rows with a reason, never as exceptions;
3. encode: ``map_batches`` with a callable class holding the encoder (an actor pool, ``concurrency`` actors,
   CPUs or GPUs per actor);
4. write: the driver consumes the stream and, as soon as every image of a part has come back, stages that
   part through :class:`t2c.indexer.staging.Staging` (the local pipeline's format, written atomically). Raw features are small (dim × 4 bytes an
   image), so the store needs no shared file system; only the images must be readable by the workers.

Finished parts are skipped by a rerun (``part = idx // part_size``), then the parts are committed through
``StoreWriter.commit`` with ``build_index`` (Flat / IVF-Flat / IVF-PQ by memory budget, nprobe tuned to a
recall target, recall written to the manifest).
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

import numpy as np

from t2c.data.errors import InvalidInput, NotFound, StoreError
from t2c.data.store import StoreWriter, store_faults
from t2c.indexer.pipeline import (DEFAULT_MAX_PIXELS, PART_SIZE, IndexReport, Plan, check_encoder, check_source_present,
                                  decode_crop, finish_run, plan_entries, plan_run, plan_walk, progress_bar, space_needed, start_run)
from t2c.indexer.staging import ItemResult, Staging

PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)


# ------------------------------------------------------------------------------------------------
# Ray set-up
# ------------------------------------------------------------------------------------------------
def default_runtime_env() -> dict:
    """Runtime env that lets workers import this project (and ``python:`` encoders next to it) on one machine."""
    paths = [PROJECT_ROOT, os.getcwd()] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    seen: list[str] = []
    for p in paths:
        if p not in seen:
            seen.append(p)
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(seen)}}


def ensure_ray(address: str | None = None, num_cpus: int | None = None, runtime_env: dict | None = None) -> bool:
    """Connect to Ray (an existing session, ``address``, or a new local one); True if this call started it."""
    import ray

    if ray.is_initialized():
        return False
    kw = {"include_dashboard": False, "runtime_env": runtime_env or default_runtime_env(),
          "log_to_driver": False, "configure_logging": False}
    if address:
        kw["address"] = address
    elif num_cpus:
        kw["num_cpus"] = int(num_cpus)
    ray.init(**kw)
    return True


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None, runtime_env: dict | None = None):
    """Ray connected for the duration (see :func:`ensure_ray`); shut down after if this call started it."""
    started = ensure_ray(address, num_cpus, runtime_env)
    try:
        yield
    finally:
        if started:
            import ray

            ray.shutdown()


# ------------------------------------------------------------------------------------------------
# stages (module-level so Ray can ship them by reference)
# ------------------------------------------------------------------------------------------------
def decode_batch(batch: dict, cfg: dict) -> dict:
    """Decode + crop a batch of paths into HWC uint8 crops (a quarter of float32's bytes in the object store;
    the encode actor normalises them); failures become rows with ``ok=False`` and a reason."""
    s = int(cfg["image_size"])
    n = len(batch["idx"])
    arr = np.zeros((n, s, s, 3), np.uint8)
    results = []
    for j, path in enumerate(batch["path"]):
        a, r = decode_crop(str(path), cfg)
        if a is not None:
            arr[j] = a
        results.append(r)
    return {"idx": np.asarray(batch["idx"], np.int64), "ok": np.array([r.ok for r in results], bool), "arr": arr,
            "width": np.array([r.width for r in results], np.int64),
            "height": np.array([r.height for r in results], np.int64),
            "content_hash": np.array([r.content_hash for r in results], object),
            "reason": np.array([r.reason for r in results], object),
            "message": np.array([r.message for r in results], object)}


class EncodeActor:
    """Callable class for ``map_batches``: holds one encoder, turns decoded uint8 crops into raw features (through
    :func:`t2c.indexer.feed.encode_crops`: on a GPU actor, pinned buffers normalised on the device)."""

    def __init__(self, spec: str, batch_size: int = 32, device: str | None = None, threads: int | None = None):
        from t2c.indexer.encoders import make_encoder
        from t2c.indexer.feed import steady_allocator

        steady_allocator()  # an actor process exists to encode
        self.encoder = make_encoder(spec, batch_size=batch_size, device=device, threads=threads)

    def __call__(self, batch: dict) -> dict:
        ok = np.asarray(batch["ok"], bool)
        feats = np.zeros((len(ok), self.encoder.dim), np.float32)
        if ok.any():
            from t2c.indexer.feed import encode_crops

            feats[ok] = encode_crops(self.encoder, list(np.asarray(batch["arr"])[ok]))
        out = {k: v for k, v in batch.items() if k != "arr"}
        out["feats"] = feats
        return out


# ------------------------------------------------------------------------------------------------
# planning for parquet path lists
# ------------------------------------------------------------------------------------------------
def plan_paths(writer: StoreWriter, walk) -> Plan:
    """Plan a run over an explicit list of files (``t2c.data.sources.stat_paths``): new and changed files only.

    A list never removes images (a file missing from one list may come from another list or folder);
    listed paths that do not exist are recorded as errors.
    """
    return plan_walk(writer, walk)


def _resolve_source(source, column: str, base, follow_symlinks: bool, writer: StoreWriter):
    """(plan, root label) for a folder or a parquet list of paths."""
    p = Path(source).expanduser()
    if p.is_file() and p.suffix.lower() in (".parquet", ".pq"):
        from t2c.data.sources import iter_path_list, iter_stat_paths

        entries = iter_stat_paths(iter_path_list(p, column), base=base if base is not None else p.resolve().parent,
                                  spill_dir=writer.root)
        return plan_entries(writer, entries), str(p.resolve())
    return plan_run(writer, p.resolve(), follow_symlinks=follow_symlinks), str(p.resolve())


def _check_source(source) -> Path:
    p = Path(source).expanduser()
    if not p.exists():
        raise NotFound(f"{str(p)!r} does not exist", "give a folder of images or a parquet list of paths")
    if p.is_file() and p.suffix.lower() not in (".parquet", ".pq"):
        raise InvalidInput(f"{str(p)!r} is neither a folder nor a .parquet list of paths",
                           "give a folder, or a parquet file with a 'path' column (--column to choose)")
    return p.resolve()


def _run_stages(staging: Staging, plan, pending, part_size, encoder_spec, cfg, dim, *, batch_size, device, threads,
                encoder_actors, cpus_per_actor, gpus_per_actor, decode_batch_size, decode_cpus, user_columns,
                bar, root: Path | None = None) -> int:
    """Run decode → encode on Ray for the pending parts and stage each part as soon as it is complete."""
    import pyarrow as pa
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the run draws its own bar
    idx = np.concatenate([np.arange(p * part_size, min((p + 1) * part_size, len(plan.todo))) for p in pending])
    n = len(idx)
    block = max(decode_batch_size, min(part_size, -(-n // 64)))
    tables = [pa.table({"idx": pa.array(idx[s : s + block], pa.int64()),
                        "path": pa.array([plan.todo[int(i)]["path"] for i in idx[s : s + block]], pa.string())})
              for s in range(0, n, block)]
    ds = ray.data.from_arrow(tables)
    # a memory request of its own (decoded batch, twice, plus slack) also keeps Ray from fusing decoding into the
    # encoder actors, so decode tasks scale out on their own CPUs while the actors only encode.
    s = int(cfg["image_size"])
    decode_mem = decode_batch_size * 3 * s * s * 4 * 2 + (64 << 20)
    ds = ds.map_batches(decode_batch, fn_kwargs={"cfg": cfg}, batch_size=decode_batch_size, batch_format="numpy",
                        num_cpus=decode_cpus, memory=decode_mem)
    act_threads = threads or max(1, int(cpus_per_actor))
    ds = ds.map_batches(EncodeActor, fn_constructor_kwargs={"spec": encoder_spec, "batch_size": batch_size,
                                                            "device": device, "threads": act_threads},
                        batch_size=batch_size, batch_format="numpy", concurrency=encoder_actors,
                        num_cpus=cpus_per_actor, num_gpus=gpus_per_actor)
    buf: dict[int, dict[int, ItemResult]] = {}
    written = _write_as_parts_complete(staging, plan, ds, buf, part_size, dim, user_columns, bar, root)
    if buf:
        raise StoreError(f"the Ray pipeline lost images of parts {sorted(buf)[:5]}",
                         "re-run the same command: finished parts are kept")
    return written


@contextlib.contextmanager
def quiet_ray():
    """Keep Ray's and Ray Data's notes and warnings off the terminal (``t2c index -q``); errors still show."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    logs = [logging.getLogger(name) for name in ("ray", "ray.data")]
    levels, start_note = [log.level for log in logs], ctx.print_on_execution_start
    for log in logs:
        log.setLevel(logging.ERROR)
    ctx.print_on_execution_start = False
    try:
        yield
    finally:
        for log, level in zip(logs, levels):
            log.setLevel(level)
        ctx.print_on_execution_start = start_note


def _write_as_parts_complete(staging, plan, ds, buf, part_size, dim, user_columns, bar, root) -> int:
    """Consume the encoded stream; stage each part as soon as all its images are back. The images written."""
    written = 0
    for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for j in range(len(b["idx"])):
            gi = int(b["idx"][j])
            p = gi // part_size
            buf.setdefault(p, {})[gi] = ItemResult(bool(b["ok"][j]), b["feats"][j], int(b["width"][j]),
                                                   int(b["height"][j]), str(b["content_hash"][j]),
                                                   str(b["reason"][j]), str(b["message"][j]))
            lo, hi = p * part_size, min((p + 1) * part_size, len(plan.todo))
            if len(buf[p]) == hi - lo:
                got = buf.pop(p)
                items, results = plan.todo[lo:hi], [got[k] for k in range(lo, hi)]
                check_source_present(items, results, root, staging)
                staging.write_part(p, items, results, dim, user_columns)
                written += hi - lo
                bar.update(hi - lo)
    return written


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------
def index_folder_ray(source, store, encoder_spec: str, *, address: str | None = None, num_cpus: int | None = None,
                     aligner=None, fit_aligner: int | None = None, clip: str | None = None,
                     follow_symlinks: bool = False, column: str = "path", base=None,
                     part_size: int = PART_SIZE, batch_size: int = 32, encoder_actors: int = 1,
                     cpus_per_actor: float = 1.0, gpus_per_actor: float = 0.0, decode_batch_size: int = 16,
                     decode_cpus: float = 1.0, device: str | None = None, threads: int | None = None,
                     max_pixels: int = DEFAULT_MAX_PIXELS, memory_budget: int | None = None,
                     user_columns: dict | None = None, runtime_env: dict | None = None, fit_workers: int = 0,
                     progress: bool = False) -> IndexReport:
    """Index a folder (or a parquet list of paths) into a store with Ray Data; same store as ``index_folder``.

    Args:
        source: folder of images, or a ``.parquet`` file whose ``column`` holds paths (relative paths are
            taken against ``base``, default the parquet file's folder). Lists add/update, never remove.
        store: store directory (created if missing; must be readable/writable by the driver only).
        encoder_spec: encoder spec string (importable on every Ray worker).
        address: Ray cluster address (``auto``, ``ray://host:10001``); default: the running session or a new
            local one with ``num_cpus`` CPUs.
        aligner / fit_aligner / clip: as in ``index_folder`` (fitting runs on the driver, ``fit_workers``).
        part_size: images per staged, resumable part. batch_size: encoder batch.
        encoder_actors / cpus_per_actor / gpus_per_actor: the encoder actor pool.
        decode_batch_size / decode_cpus: decode task batching and CPUs per decode task.
        memory_budget: bytes for the FAISS index (chooses Flat / IVF-Flat / IVF-PQ).
        runtime_env: Ray runtime env (default: PYTHONPATH with this project, for local clusters).

    Returns:
        An :class:`t2c.indexer.pipeline.IndexReport`.

    Raises:
        NotFound / InvalidInput: bad source; StoreError: store locked, damaged or of another encoder;
        AlignerError: no usable aligner.

    Example:
        >>> index_folder_ray("photos/", "photos.t2c", "world:pairnet", num_cpus=8, encoder_actors=2)  # doctest: +SKIP
    """
    from t2c.indexer.encoders import parse_spec

    t0 = time.perf_counter()
    src = _check_source(source)
    store = Path(store).expanduser().resolve()
    if src.is_dir() and (store == src or src in store.parents):
        raise InvalidInput("the store must not live inside the folder being indexed", "put --store elsewhere")
    if int(part_size) < 1 or int(encoder_actors) < 1:
        raise InvalidInput("part_size and encoder_actors must be at least 1")
    spec = parse_spec(encoder_spec)
    state: dict = {}
    with store_faults(store, lambda: space_needed(**state)), StoreWriter(store) as writer:
        check_encoder(writer, store, spec)
        plan, root_label = _resolve_source(src, column, base, follow_symlinks, writer)
        state["plan"] = plan
        run = start_run(writer, spec, plan, t0, aligner=aligner, fit_aligner=fit_aligner, clip=clip,
                         fit_workers=fit_workers, progress=progress, max_pixels=max_pixels, batch_size=batch_size,
                         device=device, threads=threads, part_size=int(part_size))
        if isinstance(run, IndexReport):
            return run
        state["run"] = run
        encoder, parts, done = run.encoder, run.parts, run.done
        pending = [i for i in range(len(parts)) if i not in done]
        cfg = dict(encoder.preprocess_config(), max_pixels=max_pixels)
        bar = progress_bar(len(plan.todo), "index (ray)", progress)
        bar.update(sum(len(parts[i]) for i in done if i < len(parts)))
        processed, enc_seconds = 0, 0.0
        with contextlib.closing(bar):
            if pending:
                with quiet_ray() if not progress else contextlib.nullcontext(), \
                        ray_session(address, num_cpus, runtime_env):
                    t_enc = time.perf_counter()
                    processed = _run_stages(
                        run.staging, plan, pending, int(part_size), encoder_spec, cfg, encoder.dim,
                        batch_size=batch_size, device=device, threads=threads, encoder_actors=int(encoder_actors),
                        cpus_per_actor=cpus_per_actor, gpus_per_actor=gpus_per_actor,
                        decode_batch_size=int(decode_batch_size), decode_cpus=decode_cpus,
                        user_columns=user_columns or {}, bar=bar, root=src if src.is_dir() else None)
                    enc_seconds = time.perf_counter() - t_enc
        return finish_run(writer, run, plan, root_label, memory_budget, processed, enc_seconds, t0, engine="ray")
