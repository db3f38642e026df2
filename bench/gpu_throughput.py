"""Benchmark: the indexing pipeline on a GPU against the model's own eager fp32 forward pass (prints JSON).

For each encoder (``--encoders``), on ``--device`` (default cuda):

1. the eager fp32 forward pass alone, over float32 batches already decoded, resized and normalised in host
   memory (``encode_images``: the copy to the device included), and the same at each of ``--precisions``
   (autocast fp16 / bf16; float32 weights);
2. the pipeline's encode loop at each precision: decode processes (``--workers``, default one per core) send
   uint8 crops, :func:`t2c.indexer.feed.encode_crops` stacks them into pinned buffers, copies them without
   blocking, normalises them on the device and stacks the next batch while the GPU computes (the GPU path);
   beside it the same loop through the CPU path (float32 batches normalised on the host, pageable memory), to
   show what pinned uint8 staging buys;
3. the decode processes alone (no model): the most images per second decoding can feed;
4. the cosine of each precision's features to fp32's (accuracy kept).

Targets (issue 19): autocast fp16/bf16 faster than fp32, features at cosine >= 0.99, the loop near the forward
pass at each precision unless decoding (step 3) is slower, which the JSON then says.

Run it on the device machine as one command (``bench/gpu_check.sh``). Without a GPU, ``--device cpu
--precisions bf16`` runs the same steps on the CPU (a smoke run of the script: its figures mean nothing
for a GPU).

    python bench/gpu_throughput.py [--n 2000] [--batch-size 128] [--encoders 'timm:resnet50?weights=random,...']
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

DEFAULT_ENCODERS = "timm:resnet50?weights=random,open_clip:ViT-B-32?weights=random"


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str, reps: int = 1) -> float:
    """Best of ``reps`` wall times of ``fn()`` (the device synchronised before and after)."""
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def _decode_all(paths: list, cfg: dict, workers: int) -> tuple[list, float]:
    """Every path's uint8 crop through the pipeline's Decoder, and the images per second it managed."""
    from t2c.indexer.pipeline import Decoder

    dec = Decoder(cfg, workers)
    try:
        list(dec.imap(paths[: 2 * max(1, workers)]))  # the processes started: process start is not decoding
        t0 = time.perf_counter()
        crops = [a for a, _ in dec.imap(paths)]
        return crops, len(paths) / (time.perf_counter() - t0)
    finally:
        dec.close()


def _loop(enc, paths: list, cfg: dict, workers: int, staged: bool) -> float:
    """The pipeline's decode + encode loop over ``paths``: images per second (decoding overlapped)."""
    from t2c.indexer.feed import encode_crops
    from t2c.indexer.pipeline import Decoder

    dec = Decoder(cfg, workers)
    try:
        list(dec.imap(paths[: 2 * max(1, workers)]))
        _sync(enc.device)
        t0 = time.perf_counter()
        results = dec.imap(paths)
        part = 1024
        for i in range(0, len(paths), part):
            encode_crops(enc, (a for a, _ in (next(results) for _ in paths[i : i + part])), staged=staged)
        _sync(enc.device)
        return len(paths) / (time.perf_counter() - t0)
    finally:
        dec.close()


def bench_encoder(spec: str, args, paths: list) -> dict:
    from t2c.data.images import DEFAULT_MAX_PIXELS
    from t2c.indexer.encoders import make_encoder
    from t2c.indexer.feed import encode_crops, normalised

    def build(precision: str):
        full = spec if precision == "fp32" else spec + ("&" if "?" in spec else "?") + f"precision={precision}"
        return make_encoder(full, device=args.device, batch_size=args.batch_size, runtime="torch")

    ref = build("fp32")
    cfg = dict(ref.preprocess_config(), max_pixels=DEFAULT_MAX_PIXELS)
    crops, decode_ips = _decode_all(paths, cfg, args.workers)
    arrays = normalised(crops, cfg)
    out = {"spec": spec, "dim": ref.dim, "decode_only_images_per_s": round(decode_ips, 1), "precisions": {}}
    fp32_feats = None
    for precision in ["fp32", *args.precisions]:
        try:
            enc = ref if precision == "fp32" else build(precision)
        except Exception as e:  # noqa: BLE001 - a precision this machine cannot run is reported, not fatal
            out["precisions"][precision] = {"error": f"{type(e).__name__}: {e}"}
            continue
        enc.encode_images(arrays[: args.batch_size])  # warm-up: kernel choice, allocator
        fwd_s = _timed(lambda e=enc: e.encode_images(arrays), args.device, reps=2)
        feats = encode_crops(enc, crops)
        if fp32_feats is None:
            fp32_feats = feats
        cos = (feats * fp32_feats).sum(1) / np.linalg.norm(feats, axis=1) / np.linalg.norm(fp32_feats, axis=1)
        row = {"forward_images_per_s": round(len(arrays) / fwd_s, 1),
               "loop_staged_images_per_s": round(_loop(enc, paths, cfg, args.workers, staged=True), 1),
               "loop_host_float_images_per_s": round(_loop(enc, paths, cfg, args.workers, staged=False), 1),
               "cosine_to_fp32": {"min": round(float(cos.min()), 5), "mean": round(float(cos.mean()), 5)}}
        out["precisions"][precision] = row
    base = out["precisions"]["fp32"]["forward_images_per_s"]
    for row in out["precisions"].values():
        if "error" in row:
            continue
        row["forward_speedup_vs_fp32"] = round(row["forward_images_per_s"] / base, 3)
        row["loop_staged_vs_fp32_forward"] = round(row["loop_staged_images_per_s"] / base, 3)
        row["loop_staged_vs_own_forward"] = round(row["loop_staged_images_per_s"] / row["forward_images_per_s"], 3)
        row["decode_bound"] = bool(decode_ips < row["forward_images_per_s"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--max-side", type=int, default=800)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--encoders", default=DEFAULT_ENCODERS, help="comma-separated encoder specs")
    ap.add_argument("--precisions", default="fp16,bf16", help="beside fp32, comma-separated")
    ap.add_argument("--workers", type=int, default=None, help="decode processes (default: one per core)")
    args = ap.parse_args()
    args.precisions = [p for p in args.precisions.split(",") if p and p != "fp32"]

    import torch
    from _jpegs import make_jpegs  # this script's folder
    from t2c.indexer.pipeline import default_workers

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run on a GPU machine, or pass --device cpu for a smoke run")
    args.workers = default_workers() if args.workers is None else args.workers
    with tempfile.TemporaryDirectory(prefix="t2c-gpu-") as tmp:
        make_jpegs(Path(tmp), args.n, max_side=args.max_side)
        paths = sorted(str(p) for p in Path(tmp).iterdir())
        results = []
        for spec in args.encoders.split(","):
            try:
                results.append(bench_encoder(spec, args, paths))
            except Exception as e:  # noqa: BLE001 - e.g. open_clip not installed on the device: the others still run
                results.append({"spec": spec, "error": f"{type(e).__name__}: {e}"})
    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None
    print(json.dumps({"bench": "gpu_throughput", "device": args.device, "gpu": gpu, "torch": torch.__version__,
                      "cpu_count": os.cpu_count(), "decode_workers": args.workers, "n_images": args.n,
                      "max_side": args.max_side, "batch_size": args.batch_size, "encoders": results,
                      "note": "forward: float32 batches already normalised in host memory, copy to the device "
                              "included; loop_staged: the pipeline's GPU path (pinned uint8, normalised on the "
                              "device); loop_host_float: the CPU path's float32 batches on the same device"}))


if __name__ == "__main__":
    main()
