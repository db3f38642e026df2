"""The batch pipeline: read → decode → encode → align → write, resumable and incremental.

A run plans its work against the store's catalog (new, changed, removed files), then processes the work list
in fixed-size parts. Each finished part is written atomically to ``STORE/staging`` (raw features + rows), so a
killed run, rerun with the same command, re-plans the same work, keeps the finished parts and continues.
When every part is done the changes are committed as a new snapshot in one atomic switch.

Decoding runs in worker processes and overlaps with encoding in the main process.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing as mp
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from t2c.data.errors import AlignerError, InvalidInput, SourceGone, StoreError, T2CError
from t2c.data.store import RESUME_NOTE, Changes, StoreWriter, new_feature_shard_name, store_faults
from t2c.indexer.feed import encode_crops
from t2c.indexer.staging import ItemResult, Staging
from t2c.indexer.worklist import WorkList, WorkListWriter

PART_SIZE = 256
DEFAULT_MAX_PIXELS = 89_478_485


@dataclass
class IndexReport:
    """What an index run did."""

    store: str
    added: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0
    errors: int = 0
    resumed_parts: int = 0
    seconds: float = 0.0
    images_per_second: float = 0.0
    aligner_r2: float | None = None
    snapshot: str | None = None
    error_reasons: dict = field(default_factory=dict)
    # plan, start (model + aligner), encode loop, commit; and "forward": the part of the encode loop spent in the
    # encoder's forward passes (the rest is what decoding and the pipeline cost it)
    stage_seconds: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


# ------------------------------------------------------------------------------------------------
# decode workers (no torch in here)
# ------------------------------------------------------------------------------------------------
_CFG: dict = {}


def _init_worker(cfg: dict, lower_priority: bool = True) -> None:
    """Set a decode worker's preprocessing; a pool worker also lowers its priority (never the caller's own)."""
    global _CFG
    _CFG = cfg
    if not lower_priority:
        return
    try:  # decoding workers must not fight the encoder for cores
        os.nice(5)
    except OSError:
        pass


def decode_crop(path: str, cfg: dict) -> tuple[np.ndarray | None, ItemResult]:
    """Decode, resize and crop one file (``cfg``: preprocessing and ``max_pixels``) into the HWC uint8 crop that
    decode workers send (a quarter of the normalised float32 array's bytes to pickle and pipe); never raises.

    Returns:
        (crop, result without features) or (None, a result with the reason it failed).
    """
    from functools import partial

    from t2c.data.errors import ImageDecodeError
    from t2c.data.images import decode_for
    from t2c.indexer.preprocess import crop_array

    try:
        arr, meta = decode_for(str(path), partial(crop_array, cfg=cfg), int(cfg["max_pixels"]),
                               draft=int(cfg["image_size"]), with_hash=True)
        return arr, ItemResult(True, width=int(meta["width"]), height=int(meta["height"]),
                               content_hash=meta["content_hash"])
    except ImageDecodeError as e:
        return None, ItemResult(False, reason=e.reason, message=e.message)
    except Exception as e:  # noqa: BLE001 - any failure is recorded for the file, the run goes on
        return None, ItemResult(False, reason="decode_failed", message=f"{type(e).__name__}: {e}")


def _decode(path: str):
    return decode_crop(path, _CFG)


def usable_cores() -> int:
    """Cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_workers() -> int:
    """Decode processes of the encode loop when not given: one per core (at low priority, they take the time the
    encoder's threads leave; measured on 2 cores, two kept a CPU forward pass at 0.96-0.99x, one at 0.91-0.95x)."""
    return usable_cores()


def startup_workers() -> int:
    """Decode processes while the model is built: all cores but the one importing torch."""
    return max(1, usable_cores() - 1)


DECODE_BUFFER_BYTES = 256 << 20  # decoded arrays a pool may hold ahead of the encoder
DECODE_BLOCK = 16  # paths handed to the pool at a time


class Decoder:
    """Ordered parallel decoding (a process pool), or in-process when workers=0, into HWC uint8 crops.

    The pool decodes ahead of the encoder by at most ``DECODE_BUFFER_BYTES`` of crops (a bounded window), so a
    fast decoder never piles up a whole run's images in memory. The crops are normalised where they are
    batched (:func:`t2c.indexer.feed.encode_crops`), so each crosses the pipe as bytes, not as a float32 array
    four times larger.
    """

    def __init__(self, cfg: dict, workers: int):
        self.cfg = cfg
        self.workers = 0
        self.pools: list = []  # blocks go to these in turn (``grow`` adds one)
        self.grow(workers)

    def grow(self, workers: int) -> None:
        """Add ``workers`` processes (a pool of their own, fed blocks in turn with the others); 0: nothing."""
        if workers <= 0:
            return
        ctx = mp.get_context("spawn")
        self.pools.append(ctx.Pool(workers, initializer=_init_worker, initargs=(self.cfg,)))
        self.workers += workers

    @property
    def window(self) -> int:
        """Images decoded ahead at most."""
        s = int(self.cfg.get("image_size", 224))
        return int(min(4096, max(4 * DECODE_BLOCK, DECODE_BUFFER_BYTES // (3 * s * s))))

    def imap(self, paths):
        """Decoded ``(crop, ItemResult)`` of each path, in order; the pool starts on the first paths at once."""
        if not self.pools:  # in this process: its priority is the caller's, left as it is
            _init_worker(self.cfg, lower_priority=False)
            return map(_decode, paths)
        return _Window(self.pools, iter(paths), max(1, self.window // DECODE_BLOCK))

    def close(self):
        for pool in self.pools:
            pool.terminate()
            pool.join()
        self.pools.clear()


class _Window:
    """Ordered results of ``_decode`` over ``paths`` with at most ``blocks`` blocks of paths in the pools.

    ``pools``: the decoder's list of pools (blocks go to each in turn; one added later is used from then on).
    """

    def __init__(self, pools: list, paths, blocks: int):
        from collections import deque

        self.pools = pools
        self.turn, self.paths, self.pending, self.out = 0, paths, deque(), iter(())
        self.drained = False  # every path handed to a pool: a pool added now would get nothing
        for _ in range(blocks):
            if not self._submit():
                break

    def _submit(self) -> bool:
        block = list(itertools.islice(self.paths, DECODE_BLOCK))
        if block:
            pool = self.pools[self.turn % len(self.pools)]
            self.turn += 1
            self.pending.append(pool.map_async(_decode, block, chunksize=4))
        else:
            self.drained = True
        return bool(block)

    def __iter__(self):
        return self

    def __next__(self):
        while True:
            item = next(self.out, _Window)
            if item is not _Window:
                return item
            if not self.pending:
                raise StopIteration
            done = self.pending.popleft().get()
            self._submit()
            self.out = iter(done)


class EarlyDecode:
    """Decoding started before the encoder is built, on the preprocessing its source says it will have.

    Built from the plan alone (every part pending, as in a fresh run), with the spec's preprocessing hint
    (:func:`t2c.indexer.encoders.preprocess_hint`): the worker processes decode the first images while the main
    process imports torch and builds the model. :meth:`take` hands the stream over only when the built
    encoder's preprocessing is the hinted one and no part was already finished (a resumed run); otherwise it
    is dropped and decoding starts again, so the store is the same either way.
    """

    def __init__(self, spec, plan: Plan, part_size: int, max_pixels: int, workers: int):
        from t2c.indexer.encoders import preprocess_hint

        self.decoder = self.results = None
        hint = preprocess_hint(spec) if workers > 0 and len(plan.todo) else None
        if hint is None:
            return
        self.cfg = dict(hint, max_pixels=max_pixels)
        # while this process imports torch, one core is left to it; the rest join when encoding starts
        self.decoder = Decoder(self.cfg, min(workers, startup_workers()))
        self.parts = plan.todo.parts(part_size)
        self.results = self.decoder.imap(t["path"] for part in self.parts for t in part)

    def take(self, run: "Run", cfg: dict):
        """(decoder, results) when this stream is the one ``run`` needs with ``cfg``; else None (and closes)."""
        from t2c.indexer.encoders import same_preprocess

        if self.decoder is None:
            return None
        if run.done or len(run.parts) != len(self.parts) or not same_preprocess(self.cfg, cfg):
            self.close()
            return None
        out, self.decoder = (self.decoder, self.results), None
        return out

    def close(self) -> None:
        if self.decoder is not None:
            self.decoder.close()
            self.decoder = None


# ------------------------------------------------------------------------------------------------
# planning
# ------------------------------------------------------------------------------------------------
@dataclass
class Plan:
    todo: WorkList  # the items (id, path, relpath, size, mtime_ns, kind "new"|"changed"), kept on disk
    removed_ids: list
    cleared_error_paths: list
    skipped: list  # (path, reason) from the walk
    unchanged: int
    next_id: int


PLAN_BATCH = 65536  # files looked up in the catalog at a time while planning


def plan_run(writer: StoreWriter, root: Path, *, follow_symlinks: bool = False) -> Plan:
    """Compare the folder with the catalog: new, changed and removed files, with stable ids."""
    from t2c.data.sources import walk_folder

    return plan_walk(writer, walk_folder(root, follow_symlinks=follow_symlinks),
                     remove_under=str(root).rstrip(os.sep) + os.sep)


def plan_walk(writer: StoreWriter, walk, *, remove_under: str | None = None) -> Plan:
    """Plan a run over a walk (folder or path list): new and changed files get work items with stable ids.

    With ``remove_under`` (a folder prefix), catalogued files under it that the walk no longer lists are
    removed and their stale error rows cleared; without it (path lists) nothing is removed.
    """
    return plan_entries(writer, itertools.chain(walk.skipped, walk.files), remove_under=remove_under)


def plan_entries(writer: StoreWriter, entries, *, remove_under: str | None = None) -> Plan:
    """:func:`plan_walk` over a stream of ``FileEntry`` / ``Skipped`` (e.g. ``iter_stat_paths``), in bounded
    memory: files are looked up in the catalog ``PLAN_BATCH`` at a time and the work list goes to disk.

    ``entries`` must name each path once, as the sources do (``walk_folder``; ``stat_paths`` and
    ``iter_stat_paths`` keep a repeated path's first entry): the catalog has no unique key on paths, so a path
    listed twice here would be catalogued twice (as new, under two ids)."""
    import pyarrow as pa

    from t2c.data.arrow_build import strings
    from t2c.data.sources import Skipped

    out = WorkListWriter(writer.root)
    next_id, unchanged, skipped, seen = writer.next_id(), 0, [], []
    try:
        for batch in _batched(entries, PLAN_BATCH):
            files = [f for f in batch if not isinstance(f, Skipped)]
            skipped += [tuple(f) for f in batch if isinstance(f, Skipped)]
            if remove_under is not None:
                seen.append(strings([f.path for f in files]))
            paths = [f.path for f in files]
            known, known_err = writer.lookup(paths)
            if not known and not known_err:  # all new (e.g. a first run): ids in list order, no per-file checks
                out.add_new(next_id, paths, [f.relpath for f in files], [f.size for f in files],
                            [f.mtime_ns for f in files])
                next_id += len(files)
                continue
            for f in files:
                k, e = known.get(f.path), known_err.get(f.path)
                if (k is not None and k["size"] == f.size and k["mtime_ns"] == f.mtime_ns) or \
                        (e is not None and e["size"] == f.size and e["mtime_ns"] == f.mtime_ns):
                    unchanged += 1  # unchanged, or the same bad file as before (keep its error row, don't retry)
                    continue
                if k is None:
                    next_id += 1
                out.add(k["id"] if k is not None else next_id - 1, f.path, f.relpath, f.size, f.mtime_ns,
                        k is not None)
        removed, cleared = [], []
        if remove_under is not None:
            seen_arr = pa.chunked_array(seen, pa.string()) if seen else strings([])
            removed, cleared = writer.gone_under(remove_under, seen_arr, [p for p, _ in skipped])
    except BaseException:
        out.abort()
        raise
    return Plan(out.finish(), removed, cleared, sorted(skipped), unchanged, next_id)


def _batched(it, n: int):
    it = iter(it)
    while batch := list(itertools.islice(it, n)):
        yield batch


def _run_id(settings: dict, plan: Plan) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    plan.todo.digest_into(h)
    h.update(json.dumps(sorted(plan.removed_ids)).encode())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------
# aligner resolution
# ------------------------------------------------------------------------------------------------
def default_clip_for(encoder_spec: str) -> str:
    """The CLIP target used when none is given: world:clip for world encoders, else OpenAI ViT-B/32."""
    return "world:clip" if encoder_spec.startswith("world:") else "open_clip:ViT-B-32/openai"


def fit_aligner_on_folder(encoder, clip_spec: str, paths: list[str], *, max_pixels: int = DEFAULT_MAX_PIXELS,
                          workers: int = 1, progress: bool = False, **overrides):
    """Fit an aligner from images alone: encode each image with the encoder and with CLIP, ridge-fit.

    The train / held-out split is keyed by each path relative to the images' common folder, so the same images
    give the same aligner wherever the folder lies.
    """
    from t2c.indexer.aligner import RidgeAccumulator
    from t2c.indexer.encoders import make_encoder

    clip = make_encoder(clip_spec, **overrides)
    if not clip.is_target:
        raise AlignerError(f"alignment target {clip_spec!r} has no text tower and no named classifier head",
                           "use a CLIP model as --clip, or a classifier whose class names are concepts (effnet:lite2)")
    if not paths:
        raise InvalidInput("no readable images to fit the aligner on", "point at a folder with images")
    acc = RidgeAccumulator(encoder.dim, clip.dim)
    root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
    bar = progress_bar(len(paths), "fit aligner", progress)
    cfg_e, cfg_c = (dict(e.preprocess_config(), max_pixels=max_pixels) for e in (encoder, clip))
    dec_e, dec_c = Decoder(cfg_e, workers), Decoder(cfg_c, workers)
    try:
        for chunk_start in range(0, len(paths), PART_SIZE):
            chunk = paths[chunk_start : chunk_start + PART_SIZE]
            xe, xc, keys = [], [], []
            for p, (ae, _), (ac, _) in zip(chunk, dec_e.imap(chunk), dec_c.imap(chunk)):
                if ae is not None and ac is not None:
                    xe.append(ae)
                    xc.append(ac)
                    keys.append(os.path.relpath(os.path.abspath(p), root))
            if keys:
                fe, fc = encode_crops(encoder, xe), encode_crops(clip, xc)
                fc /= np.maximum(np.linalg.norm(fc, axis=1, keepdims=True), 1e-12)
                acc.add(fe, fc, keys=keys)
            bar.update(len(chunk))
    finally:
        bar.close()
        dec_e.close()
        dec_c.close()
    return acc.fit(encoder=encoder.spec, clip=clip.spec, n_images=acc.all.n)


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar over images (a silent one when not ``enabled``)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True, smoothing=0.1)


def _store_aligner(writer: StoreWriter, aligner) -> str:
    """Copy an aligner into the store (content-addressed) and return its path relative to the root."""
    rel = f"aligners/{aligner.digest}.safetensors"
    p = writer.root / rel
    if not p.exists():
        p.parent.mkdir(exist_ok=True)
        aligner.save(p)
    return rel


def resolve_aligner(writer: StoreWriter, encoder, *, aligner_path=None, fit_n=None, clip=None, sample_paths=None,
                    workers=1, progress=False, max_pixels=DEFAULT_MAX_PIXELS, **overrides):
    """Decide the aligner of a run: given file, fitted now, the store's own, or identity for CLIP encoders."""
    from t2c.indexer.aligner import Aligner

    cur = writer.current
    if aligner_path:
        al = Aligner.load(aligner_path)
        al.check_pair(encoder.spec, clip)
        return al
    if cur is not None:
        # the store keeps its aligner: reruns of the same command (incl. --fit-aligner) update incrementally;
        # a different aligner goes through `t2c realign`
        return load_store_aligner(cur)
    if fit_n:
        clip = clip or default_clip_for(encoder.spec)
        if encoder.is_target and clip == encoder.spec:
            return Aligner.identity(encoder.dim, encoder.spec)
        paths = _spread(sample_paths or [], int(fit_n))
        return fit_aligner_on_folder(encoder, clip, paths, workers=workers, progress=progress,
                                     max_pixels=max_pixels, **overrides)
    if encoder.is_target and (clip is None or clip == encoder.spec):
        return Aligner.identity(encoder.dim, encoder.spec)
    raise AlignerError(
        f"encoder {encoder.spec} has no text tower, so it needs an aligner into CLIP space",
        "pass --aligner FILE (from `t2c align`) or --fit-aligner N to fit one on N images of this folder",
    )


def load_store_aligner(snap):
    """The aligner a snapshot's vectors were projected with."""
    from t2c.indexer.aligner import Aligner

    info = snap.manifest.get("aligner", {})
    if info.get("identity"):
        return Aligner.identity(int(snap.manifest["feature_dim"]), snap.manifest["encoder"])
    return Aligner.load(snap.root / info["file"])


def _spread(paths: list[str], n: int) -> list[str]:
    """n paths spread evenly over a sorted list (deterministic sample)."""
    if n >= len(paths):
        return list(paths)
    idx = np.linspace(0, len(paths) - 1, n).round().astype(int)
    return [paths[i] for i in idx]


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------
def index_folder(root, store, encoder_spec: str, *, aligner=None, fit_aligner: int | None = None,
                 clip: str | None = None, follow_symlinks: bool = False, workers: int | None = None,
                 batch_size: int = 32, device: str | None = None, threads: int | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS, memory_budget: int | None = None,
                 progress: bool = False, user_columns: dict | None = None,
                 part_size: int = PART_SIZE) -> IndexReport:
    """Index a folder of images into a store (create, resume, or update incrementally).

    Args:
        root: folder to index (walked recursively, symlinks not followed unless ``follow_symlinks``).
        store: store directory (created if missing).
        encoder_spec: encoder spec string, e.g. ``timm:resnet50.a1_in1k`` or ``world:pairnet``.
        aligner: path to an aligner file; ``fit_aligner``: fit one on N images of the folder instead.
        clip: CLIP spec to align into (default: the encoder itself when it is CLIP-like, else a default CLIP).
        workers: decode processes (default: one per core; one core fewer while the model is built).
            batch_size/device/threads: encoder run-time.
        max_pixels: decompression-bomb limit. memory_budget: bytes for the FAISS index (chooses its type).
        user_columns: optional {relpath: {column: value}} added to the catalog.
        part_size: images per staged (resumable) part.

    Returns:
        An :class:`IndexReport` (counts, errors, throughput).

    Raises:
        NotFound / InvalidInput: bad folder; StoreError: store locked, damaged, or built with another encoder;
        AlignerError: no usable aligner.

    Example:
        >>> index_folder("photos/", "photos.t2c", "world:pairnet", fit_aligner=500)  # doctest: +SKIP
    """
    from t2c.indexer.encoders import parse_spec

    t0 = time.perf_counter()
    root = Path(root).expanduser()
    if not root.exists():
        from t2c.data.errors import NotFound

        raise NotFound(f"folder {str(root)!r} does not exist", "check the path")
    if not root.is_dir():
        raise InvalidInput(f"{str(root)!r} is not a folder", "give a folder of images")
    root = root.resolve()
    store = Path(store).expanduser().resolve()
    if store == root or root in store.parents:
        raise InvalidInput("the store must not live inside the folder being indexed", "put --store elsewhere")
    spec = parse_spec(encoder_spec)
    workers = default_workers() if workers is None else int(workers)
    state: dict = {}
    with store_faults(store, lambda: space_needed(**state)), StoreWriter(store) as writer:
        check_encoder(writer, store, spec)
        state["plan"] = plan = plan_run(writer, root, follow_symlinks=follow_symlinks)
        t_plan = time.perf_counter()
        # the first images decode in the worker processes while this process imports torch and builds the model
        early = EarlyDecode(spec, plan, part_size, max_pixels, workers) if _has_work(writer, plan) else None
        try:
            run = start_run(writer, spec, plan, t0, aligner=aligner, fit_aligner=fit_aligner, clip=clip,
                            fit_workers=workers, progress=progress, max_pixels=max_pixels, batch_size=batch_size,
                            device=device, threads=threads, part_size=part_size)
            if isinstance(run, IndexReport):
                return run
            state["run"] = run
            t_enc = time.perf_counter()
            cfg = dict(run.encoder.preprocess_config(), max_pixels=max_pixels)
            clock: list = []
            processed = _encode_pending(run, plan, root, cfg, workers, progress, user_columns or {},
                                        early=early.take(run, cfg) if early is not None else None, clock=clock)
        finally:
            if early is not None:
                early.close()
        enc_seconds = time.perf_counter() - t_enc
        rep = finish_run(writer, run, plan, str(root), memory_budget, processed, enc_seconds, t0)
        rep.stage_seconds = {"plan": round(t_plan - t0, 3), "start": round(t_enc - t_plan, 3),
                             "encode_loop": round(enc_seconds, 3), "forward": round(sum(clock), 3),
                             "commit": round(rep.seconds - (t_enc - t0) - enc_seconds, 3)}
        return rep


def _encode_pending(run: "Run", plan: Plan, root: Path, cfg: dict, workers: int, progress: bool,
                    user_columns: dict, early: tuple | None = None, clock: list | None = None) -> int:
    """Decode (in worker processes) and encode the parts a run has not finished; the images processed.

    ``early``: (decoder, results) already decoding every part with ``cfg`` (:class:`EarlyDecode`). ``clock``:
    gets each batch's seconds in the encoder (:func:`t2c.indexer.feed.encode_crops`).
    """
    parts, done = run.parts, run.done
    bar = progress_bar(len(plan.todo), "index", progress)
    bar.update(sum(len(parts[i]) for i in done if i < len(parts)))
    pending = [i for i in range(len(parts)) if i not in done]
    decoder, results = early if early is not None else (Decoder(cfg, workers), None)
    processed = 0
    try:
        if results is None:
            results = decoder.imap(t["path"] for i in pending for t in parts[i])
        if not getattr(results, "drained", False):  # an early decoder started with fewer (start-up's share); when
            decoder.grow(workers - decoder.workers)  # it already holds every path, more processes would idle
        for i in pending:
            _process_part(run.staging, i, parts[i], results, run.encoder, user_columns, root, clock)
            processed += len(parts[i])
            bar.update(len(parts[i]))
    finally:
        bar.close()
        decoder.close()
    return processed


def space_needed(plan: Plan | None = None, run: "Run | None" = None) -> int | None:
    """About how many bytes a run still needs: the unfinished parts' raw features plus the new snapshot."""
    if plan is None or run is None:
        return None
    finished = run.staging.done_parts()
    remaining = sum(len(p) for i, p in enumerate(run.parts) if i not in finished)
    total = len(plan.todo) + (run.report.unchanged or 0)
    row = int(run.aligner.W.shape[1]) * 4 * 2 + 8 + 300  # vectors.npy + index + ids + catalog row
    return remaining * (int(run.encoder.dim) * 4 + 300) + total * row


def check_source_present(items: list, results: list, root: Path | None, staging: Staging) -> None:
    """Before a part is staged: a file that vanished with the folder it was read from means the source went away
    (an unmounted disk, a moved folder), not that one file was deleted (that is recorded as its error).

    Args:
        root: the folder being indexed; None for a list of paths (then each missing file's own folder counts).

    Raises:
        SourceGone: that folder no longer exists; nothing of this part is written, so a rerun once it is
            back reads those files again.
    """
    for item, r in zip(items, results):
        if r.ok or r.reason != "not_found":
            continue
        folder = root if root is not None else Path(item["path"]).parent
        gone = None if folder.is_dir() else folder
        if gone is not None:
            raise SourceGone(
                f"the image folder {str(gone)!r} disappeared during the run ({item['path']!r} is gone with it)",
                f"{len(staging.done_parts())} finished part(s) are kept in {str(staging.folder)!r}; when the "
                f"folder is back, {RESUME_NOTE}")


@dataclass
class Run:
    """A run that has work to do: its report so far, encoder, aligner, settings, parts and staging."""

    report: IndexReport
    encoder: object
    aligner: object
    settings: dict
    run_id: str
    parts: list
    done: set
    staging: Staging


def check_encoder(writer: StoreWriter, store, spec) -> None:
    """A store holds one encoder's features: refuse another."""
    cur = writer.current
    if cur is not None and cur.manifest["encoder"] != spec.identity:
        raise StoreError(f"store {str(store)!r} was built with encoder {cur.manifest['encoder']!r}, "
                         f"not {spec.identity!r}", "use a new --store for another encoder")


def start_run(writer: StoreWriter, spec, plan: Plan, t0: float, *, aligner, fit_aligner, clip, fit_workers,
              progress, max_pixels, batch_size, device, threads, part_size):
    """Common start of a run (local or Ray): nothing to do → the final IndexReport; else a :class:`Run`."""
    from t2c.indexer.encoders import make_encoder

    cur = writer.current
    staging = Staging(writer.staging)
    report = IndexReport(store=str(writer.root), unchanged=plan.unchanged)
    if not _has_work(writer, plan):
        staging.clear()
        report.seconds = time.perf_counter() - t0
        report.snapshot = cur.name
        return report
    # the fastest runtime that keeps the features (OpenVINO when installed: fp32 to float rounding), unless the
    # spec names one
    encoder = make_encoder(spec, batch_size=batch_size, device=device, threads=threads,
                           runtime=None if "runtime" in spec.options else "auto")
    fitted = _fitted_aligner_file(staging, encoder, plan, fit_aligner, clip, max_pixels) \
        if fit_aligner and not aligner and cur is None else None
    al = _load_fitted(fitted, encoder)
    if al is None:
        al = resolve_aligner(writer, encoder, aligner_path=aligner, fit_n=fit_aligner, clip=clip,
                             sample_paths=[t["path"] for t in _spread(plan.todo, int(fit_aligner or 0))], workers=fit_workers, progress=progress,
                             max_pixels=max_pixels, device=device, threads=threads)
    if al.W.shape[0] != encoder.dim:
        raise AlignerError(f"aligner expects {al.W.shape[0]}-d features, encoder gives {encoder.dim}")
    if cur is not None and cur.manifest.get("aligner", {}).get("digest") not in (None, al.digest):
        raise StoreError("this store was projected with another aligner",
                         "use `t2c realign STORE --aligner FILE` to change it, then index")
    settings = {"encoder": encoder.spec, "aligner": al.digest, "max_pixels": max_pixels, "part": int(part_size)}
    run_id = _run_id(settings, plan)
    done = staging.prepare(run_id, settings)
    if fitted is not None and not al.is_identity and not fitted.is_file():
        al.save(fitted)  # a killed run's rerun reuses it instead of fitting again
    report.resumed_parts = len(done)
    parts = plan.todo.parts(part_size)
    return Run(report, encoder, al, settings, run_id, parts, done, staging)


def _weights_digests(encoder_spec: str, clip_spec: str) -> dict:
    """The shipped weights' digests of the encoder and the CLIP, for the manifest (``shipped_weights_digest``)."""
    from t2c.indexer.encoders import shipped_weights_digest

    return {"encoder": shipped_weights_digest(encoder_spec), "clip": shipped_weights_digest(clip_spec)}


def finish_run(writer: StoreWriter, run: "Run", plan: Plan, root_label: str, memory_budget, processed: int,
                enc_seconds: float, t0: float, engine: str | None = None) -> IndexReport:
    """Common end of a run: collect the staged parts, commit a snapshot, fill in the report."""
    from t2c.indexer.index_build import DEFAULT_BUDGET, build_index

    cur, al, encoder, report = writer.current, run.aligner, run.encoder, run.report
    changes = _collect(writer, run, plan)
    if engine:
        changes.run["settings"] = dict(run.settings, engine=engine)
    fields = {
        "encoder": encoder.spec, "clip": al.meta.get("clip", encoder.spec), "dim": int(al.W.shape[1]),
        "feature_dim": encoder.dim,
        "aligner": {"digest": al.digest, "r2_heldout": al.r2_heldout, "identity": al.is_identity,
                    "file": None if al.is_identity else _store_aligner(writer, al),
                    "n_images": al.meta.get("n_images")},
        "roots": sorted(set((cur.manifest.get("roots", []) if cur else []) + [root_label])),
    }
    fields["weights"] = _weights_digests(fields["encoder"], fields["clip"])
    budget = memory_budget or DEFAULT_BUDGET
    snap = writer.commit(changes, manifest_fields=fields, vectors_for=lambda ids, feats: al.apply(feats),
                         build_index=lambda v, i: build_index(v, i, memory_budget=budget),
                         next_id=plan.next_id,
                         extra_files=[fields["aligner"]["file"]] if not al.is_identity else [])
    run.staging.clear()
    report.added = changes.run["added"]
    report.updated = changes.run["updated"]
    report.removed = len(plan.removed_ids)
    report.errors = len(changes.errors)
    for e in changes.errors:
        report.error_reasons[e["reason"]] = report.error_reasons.get(e["reason"], 0) + 1
    report.aligner_r2 = None if al.is_identity else al.r2_heldout
    report.snapshot = snap.name
    report.seconds = time.perf_counter() - t0
    report.images_per_second = processed / enc_seconds if enc_seconds > 0 and processed else 0.0
    return report


def _fitted_aligner_file(staging: Staging, encoder, plan: Plan, fit_n: int, clip, max_pixels) -> Path:
    """Where a run keeps the aligner it fitted (in staging, named by what the fit depends on)."""
    sample = _spread(plan.todo, int(fit_n))  # the same items resolve_aligner fits on
    what = [encoder.spec, clip, int(fit_n), max_pixels, [(t["path"], t["size"], t["mtime_ns"]) for t in sample]]
    key = hashlib.blake2b(json.dumps(what, default=str).encode(), digest_size=12).hexdigest()
    return staging.fitted_aligner(key)


def _load_fitted(path: Path | None, encoder):
    """The aligner a killed run fitted for the same work, or None."""
    from t2c.indexer.aligner import Aligner

    if path is None or not path.is_file():
        return None
    try:
        al = Aligner.load(path)
        al.check_pair(encoder.spec)
    except T2CError:
        return None
    return al


def _has_work(writer: StoreWriter, plan: Plan) -> bool:
    """Whether a run changes anything: files to encode or drop, errors to clear or record, or no snapshot yet."""
    return bool(plan.todo or plan.removed_ids or plan.cleared_error_paths or writer.current is None
                or _new_skips(writer, plan))


def _new_skips(writer: StoreWriter, plan: Plan) -> bool:
    known = writer.lookup([p for p, _ in plan.skipped])[1]
    return any(p not in known for p, _ in plan.skipped)


def _process_part(staging: Staging, i: int, items: list, results, encoder, user_columns: dict,
                  root: Path | None = None, clock: list | None = None) -> None:
    """Encode one part's images (HWC uint8 crops) batch by batch as they are decoded; write the part to staging."""
    decoded = []  # (decoded?, result) per item; the crops themselves go to the encoder and are let go

    def crops():
        for _ in items:
            arr, r = next(results)
            decoded.append((arr is not None, r))
            if arr is not None:
                yield arr

    feats = encode_crops(encoder, crops(), clock=clock)
    check_source_present(items, [r for _, r in decoded], root, staging)
    rows = iter(feats)
    out = [ItemResult(True, next(rows), r.width, r.height, r.content_hash) if ok else r for ok, r in decoded]
    staging.write_part(i, items, out, encoder.dim, user_columns)


def _collect(writer: StoreWriter, run: Run, plan: Plan) -> Changes:
    """The run's changes, streamed: ``row_batches`` reads the staged parts one at a time while the catalog is
    written, hard-linking each part's features into features/ and filling in errors, shards and counts as it
    goes (the commit reads them after the batches), so no per-file object outlives its part."""
    known_err = writer.lookup([p for p, _ in plan.skipped])[1]
    errors = [{"path": p, "reason": r, "message": _SKIP_MESSAGES.get(r, r), "size": None, "mtime_ns": None}
              for p, r in plan.skipped if p not in known_err or known_err[p]["reason"] != r]
    ch = Changes(rows=[], feature_shards=[], removed_ids=list(plan.removed_ids), errors=errors,
                 cleared_error_paths=list(plan.cleared_error_paths),
                 run={"run_id": run.run_id, "command": "index", "settings": run.settings,
                      "added": 0, "updated": 0, "removed": len(plan.removed_ids)})

    def batches():
        for i in range(len(run.parts)):
            meta, z = run.staging.read_part(i)
            for e in meta["errors"]:
                if e.pop("_kind") == "changed":
                    ch.removed_ids.append(e["id"])  # a file that changed into garbage leaves the index
                ch.errors.append(e)
            if meta["rows"]:
                rel = new_feature_shard_name(run.run_id, i)
                dst = writer.root / rel
                if dst.exists():
                    dst.unlink()
                os.link(z, dst)
                ch.feature_shards.append(rel)
            for r in meta["rows"]:
                ch.run["added" if r.pop("_kind") == "new" else "updated"] += 1
            yield meta["rows"]

    ch.row_batches = batches
    return ch


_SKIP_MESSAGES = {
    "symlink": "symbolic link not followed (use --follow-symlinks)",
    "symlink_loop": "symbolic link loop",
    "broken_symlink": "symbolic link points nowhere",
    "permission_denied": "permission denied",
}


def realign_store(store, aligner_path, *, memory_budget: int | None = None):
    """Re-project a store's raw features with a new aligner (no re-encoding); returns the new snapshot.

    Raises:
        StoreError: store missing/locked; AlignerError: the aligner is for another encoder.
    """
    from t2c.indexer.aligner import Aligner
    from t2c.indexer.encoders import shipped_weights_digest
    from t2c.indexer.index_build import DEFAULT_BUDGET, build_index

    al = Aligner.load(aligner_path)
    with store_faults(store), StoreWriter(store, create=False) as writer:
        cur = writer.current
        if cur is None:
            raise StoreError(f"store {str(store)!r} has no committed snapshot to realign")
        al.check_pair(cur.manifest["encoder"])
        if al.W.shape[0] != int(cur.manifest["feature_dim"]):
            raise AlignerError(f"aligner expects {al.W.shape[0]}-d features, the store holds "
                               f"{cur.manifest['feature_dim']}-d features")
        fields = {k: cur.manifest[k] for k in ("encoder", "feature_dim", "roots") if k in cur.manifest}
        fields.update({
            "clip": al.meta.get("clip", cur.manifest["clip"]), "dim": int(al.W.shape[1]),
            "aligner": {"digest": al.digest, "r2_heldout": al.r2_heldout, "identity": al.is_identity,
                        "file": None if al.is_identity else _store_aligner(writer, al),
                        "n_images": al.meta.get("n_images")},
        })
        # the stored features keep the encoder weights they were made with; the vectors now follow the CLIP's
        fields["weights"] = {"encoder": (cur.manifest.get("weights") or {}).get("encoder"),
                             "clip": shipped_weights_digest(fields["clip"])}
        budget = memory_budget or DEFAULT_BUDGET
        run = {"run_id": f"realign-{al.digest[:12]}-{int(time.time())}", "command": "realign",
               "settings": {"aligner": al.digest}}
        return writer.commit(Changes([], [], [], [], [], run), manifest_fields=fields,
                             vectors_for=lambda ids, feats: al.apply(feats),
                             build_index=lambda v, i: build_index(v, i, memory_budget=budget),
                             reproject=True,
                             extra_files=[fields["aligner"]["file"]] if not al.is_identity else [])
