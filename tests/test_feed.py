"""Feeding crops to encoders: the CPU batch buffer, the GPU path (pinned uint8 buffers normalised on the device,
run here on the CPU), and mixed precision on a GPU (autocast), whose choices are checked without one."""
import numpy as np
import pytest
import t2c.indexer.encoders as E
import torch
from t2c.data.errors import EncoderError
from t2c.indexer.feed import device_normalise, encode_crops, normalised, on_device
from t2c.indexer.preprocess import channel_table, normalise


def _crops(n: int, size: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def test_cpu_path_batches_through_one_buffer_in_order():
    """A part's uint8 crops are normalised into a reused batch buffer: the features of each image's own float32
    preprocessing, bit for bit, in order."""
    cfg = {"image_size": 2, "mean": (0.4, 0.5, 0.6), "std": (0.2, 0.25, 0.3), "resize_mode": "shorter"}

    class Enc:
        dim, batch_size, calls = 4, 3, []

        def preprocess_config(self):
            return cfg

        def encode_images(self, batch):
            self.calls.append(len(batch))
            return batch.reshape(len(batch), -1)[:, :4] * 2.0  # a fresh array, as encoders return

    crops = _crops(7, 2)
    enc = Enc()
    got = encode_crops(enc, crops)
    assert enc.calls == [3, 3, 1] and not on_device(enc)
    want = np.stack([normalise(c, cfg["mean"], cfg["std"]) for c in crops])
    assert np.array_equal(got, want.reshape(7, -1)[:, :4] * 2.0)
    assert encode_crops(enc, []).shape == (0, 4)


def test_device_normalisation_is_the_cpu_table_bit_for_bit():
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    crops = _crops(3, 5, seed=1)
    crops[0][:] = np.arange(75, dtype=np.uint8).reshape(5, 5, 3) * 3  # byte values across the range
    x = torch.from_numpy(np.stack(crops))
    got = device_normalise(x, torch.from_numpy(channel_table(mean, std))).numpy()
    assert got.dtype == np.float32 and got.shape == (3, 3, 5, 5)
    assert np.array_equal(got, normalised(crops, {"image_size": 5, "mean": mean, "std": std}))


@pytest.mark.parametrize("spec, n, batch", [("world:clip", 11, 4), ("world:pairnet?features=stages", 5, 8)])
def test_the_staged_gpu_path_gives_the_cpu_paths_features(spec, n, batch):
    """The GPU path (uint8 buffers taking turns, normalised on the device) run on the CPU: the same features as
    the CPU path, to the bit, in order, over full and partial batches."""
    enc = E.make_encoder(spec, batch_size=batch, device="cpu")
    crops = _crops(n, enc.image_size, seed=2)
    plain = encode_crops(enc, crops)
    staged = encode_crops(enc, crops, staged=True)
    assert staged.shape == (n, enc.dim) and staged.dtype == np.float32 and staged.flags.c_contiguous
    assert np.array_equal(staged, plain)
    assert np.array_equal(plain, enc.encode_images(normalised(crops, enc.preprocess_config())))


def test_on_device_means_a_torch_encoder_on_an_accelerator():
    enc = E.make_encoder("world:clip", device="cpu")
    assert not on_device(enc)
    enc.device = "cuda"  # as built on a GPU (the encoder is not run here)
    assert on_device(enc)
    enc.runtime = "openvino/f32"
    assert not on_device(enc)


def test_mixed_precision_on_a_gpu_is_autocast_with_float32_weights():
    """precision=fp16|bf16 on a GPU keeps the weights in float32 and runs the forward pass under autocast; fp16
    on the CPU and int8 on a GPU are refused with what to use instead."""
    for precision, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        enc = E.make_encoder("world:clip", device="cpu")
        enc.device = "cuda"  # what _with_precision sees on a GPU machine
        E._with_precision(enc, precision)
        assert enc.autocast_dtype is dtype and enc.input_dtype is None
        assert all(p.dtype == torch.float32 for p in E.image_tower(enc).parameters())
    with pytest.raises(EncoderError, match="fp16 runs on a GPU only") as err:
        E.make_encoder("world:clip?precision=fp16", device="cpu")
    assert "bf16" in err.value.hint
    enc = E.make_encoder("world:clip", device="cpu")
    enc.device = "cuda"
    with pytest.raises(EncoderError, match="int8 runs on the CPU only"):
        E._with_precision(enc, "int8")
    assert E.parse_spec("world:clip?precision=fp16").identity == "world:clip?precision=fp16"  # changes features


def test_autocast_forward_pass_agrees_with_fp32():
    """The autocast forward pass (bfloat16 autocast exists on the CPU too): float32 features out, within bfloat16
    rounding of the fp32 ones, through the staged path as on a GPU."""
    fp32 = E.make_encoder("world:clip", device="cpu", batch_size=8)
    amp = E.make_encoder("world:clip", device="cpu", batch_size=8)
    amp.autocast_dtype = torch.bfloat16
    crops = _crops(10, fp32.image_size, seed=3)
    a, b = encode_crops(fp32, crops), encode_crops(amp, crops, staged=True)
    assert b.dtype == np.float32 and not np.array_equal(a, b)  # it did compute in bfloat16
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.99


def test_the_gpu_bench_runs_its_steps_on_the_cpu(tmp_path):
    """bench/gpu_throughput.py, kept for the day a GPU is lent, runs end to end here (``--device cpu``)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_throughput.py"
    proc = subprocess.run([sys.executable, str(script), "--device", "cpu", "--precisions", "fp16,bf16", "--n", "12",
                           "--batch-size", "4", "--encoders", "world:clip", "--workers", "1"],
                          check=False, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    (enc,) = out["encoders"]
    rows = enc["precisions"]
    assert "runs on a GPU only" in rows["fp16"]["error"]  # reported, not fatal
    for row in (rows["fp32"], rows["bf16"]):
        assert row["forward_images_per_s"] > 0 and row["loop_staged_images_per_s"] > 0
        assert row["cosine_to_fp32"]["min"] > 0.99
    assert rows["fp32"]["forward_speedup_vs_fp32"] == 1.0 and enc["decode_only_images_per_s"] > 0


@pytest.mark.parametrize("staged", [False, True])
def test_batches_are_encoded_as_their_crops_arrive(staged):
    """A generator of crops (decode results as they come): each batch is encoded once its crops are in, before
    the next ones are asked for, with the features of the whole list."""
    enc = E.make_encoder("world:clip", batch_size=4, device="cpu")
    crops = _crops(10, enc.image_size, seed=4)
    taken, seen = [], []
    real = enc._forward_images

    def forward(x):
        seen.append(len(taken))  # crops handed out when this batch's forward pass ran
        return real(x)

    enc._forward_images = forward

    def arriving():
        for c in crops:
            taken.append(1)
            yield c

    clock = []
    got = encode_crops(enc, arriving(), staged=staged, clock=clock)
    assert seen == [4, 8, 10]
    assert len(clock) == 3 + staged and all(t >= 0 for t in clock)  # per batch (+ the staged path's last collect)
    assert np.array_equal(got, encode_crops(enc, crops, staged=staged))
    assert encode_crops(enc, iter([])).shape == (0, enc.dim)


def test_steady_allocator_sets_glibcs_thresholds_and_leaves_other_libcs_alone(monkeypatch):
    import ctypes
    import platform

    import t2c.indexer.feed as feed

    calls = []

    class Libc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    monkeypatch.setattr(platform, "system", lambda: "Linux")
    monkeypatch.setattr(platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setattr(ctypes, "CDLL", lambda name: Libc())
    assert feed.steady_allocator() is True
    assert calls == [(-3, 32 << 20), (-1, 512 << 20)]  # M_MMAP_THRESHOLD (glibc's largest), M_TRIM_THRESHOLD
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))  # musl, macOS: nothing to set
    calls.clear()
    assert feed.steady_allocator() is False and calls == []


def test_the_index_command_steadies_the_allocator_of_its_process(tmp_path, monkeypatch):
    import t2c.indexer.feed as feed
    from t2c.service.cli import main
    from tests.test_pipeline import make_images

    called = []
    monkeypatch.setattr(feed, "steady_allocator", lambda: called.append(1) or True)
    make_images(tmp_path / "imgs", 6)
    with pytest.raises(SystemExit) as done:
        main(["index", str(tmp_path / "imgs"), "--store", str(tmp_path / "st"), "-e", "world:clip", "--workers", "0",
              "-q"])
    assert done.value.code in (0, None) and called == [1]
