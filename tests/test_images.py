"""Safe decoding: every good file becomes the right RGB image, every bad one the right ImageDecodeError."""
from __future__ import annotations

import io
import os
import random
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from t2c.data import images
from t2c.data.errors import ImageDecodeError, InvalidInput
from t2c.data.images import (
    DEFAULT_MAX_PIXELS,
    REASONS,
    bytes_hash,
    content_hash,
    decode_for,
    image_info,
    load_image,
    to_rgb,
    try_decode_for,
)
from tests import imagecases
from tests.imagecases import CHECKS, EXPECTED_REASONS, TOLERANCE, WALK_ONLY

DECODE_CASES = [n for n in EXPECTED_REASONS if n not in WALK_ONLY]
GOOD = [n for n in DECODE_CASES if EXPECTED_REASONS[n] is None]
BAD = [n for n in DECODE_CASES if EXPECTED_REASONS[n] is not None]


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return imagecases.write_cases(tmp_path_factory.mktemp("cases"))


def _close(got, want, tol=TOLERANCE) -> bool:
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(got, want))


def _probe(img: Image.Image, name: str) -> None:
    size, probes = CHECKS[name]
    assert img.size == size, f"{name}: size {img.size} != {size}"
    for xy, want in probes:
        got = img.getpixel(xy)
        assert _close(got, want), f"{name}: pixel {xy} = {got}, expected about {want}"


def chw_identity(img: Image.Image) -> np.ndarray:
    """A stand-in preprocess: RGB -> CHW float32 in [0, 1] (top-level so it pickles)."""
    return np.asarray(img, np.float32).transpose(2, 0, 1) / 255.0


def failing_preprocess(img: Image.Image) -> np.ndarray:
    raise ValueError("image too small for this encoder")


# ---------------------------------------------------------------- every case


def test_case_tables_cover_the_issue_list():
    wanted = {
        "empty_jpg", "truncated_jpeg", "truncated_png", "text_as_png", "bomb_png", "cmyk_jpeg",
        "gray16_png", "palette_alpha_png", "gif_animated", "exif_rotated_jpeg", "loop",
        "jpeg", "png", "webp", "bmp", "tiff",
    }  # fmt: skip
    assert wanted <= set(EXPECTED_REASONS)


@pytest.mark.parametrize("name", GOOD)
def test_good_case_decodes_to_rgb(cases, name):
    path, reason = cases[name]
    assert reason is None
    img = load_image(path)
    assert isinstance(img, Image.Image)
    assert img.mode == "RGB"
    _probe(img, name)


@pytest.mark.parametrize("name", BAD)
def test_bad_case_raises_its_reason(cases, name):
    path, reason = cases[name]
    with pytest.raises(ImageDecodeError) as ei:
        load_image(path)
    assert ei.value.reason == reason, ei.value.message
    assert ei.value.reason in REASONS
    assert path in ei.value.message


@pytest.mark.parametrize("name", DECODE_CASES)
def test_try_decode_for_matches_load_image(cases, name):
    path, reason = cases[name]
    arr, meta = try_decode_for(path, chw_identity)
    if reason is None:
        assert arr is not None and arr.dtype == np.float32 and arr.shape[0] == 3
        assert (meta["width"], meta["height"]) == CHECKS[name][0]
    else:
        assert arr is None and meta["error"] == reason and path in meta["message"]


@pytest.mark.parametrize("name", ["gif_animated", "jpeg", "png"])
def test_decoded_image_is_independent_of_the_file(cases, tmp_path, name):
    p = tmp_path / Path(cases[name].path).name
    p.write_bytes(Path(cases[name].path).read_bytes())
    img = load_image(p)
    p.unlink()
    _probe(img, name)  # fully loaded, not lazily tied to the (possibly multi-frame) file
    _probe(img.copy().resize((imagecases.W, imagecases.H)), name)


# ---------------------------------------------------------------- colours and modes


def test_cmyk_red_is_red(cases):
    r, g, b = load_image(cases["cmyk_jpeg"].path).getpixel((5, 5))
    assert r > 200 and g < 60 and b < 60


def test_16bit_grey_is_scaled_not_clipped(cases):
    with Image.open(cases["gray16_png"].path) as src:
        assert src.mode.startswith("I")  # really 16-bit on disk
    img = load_image(cases["gray16_png"].path)
    assert img.getpixel((5, 5)) == (128, 128, 128)  # 32768 / 257 = 127.5 -> 128
    assert img.getpixel((60, 5)) == (255, 255, 255)


def test_palette_transparency_becomes_white(cases):
    with Image.open(cases["palette_alpha_png"].path) as src:
        assert src.mode == "P" and "transparency" in src.info
    img = load_image(cases["palette_alpha_png"].path)
    assert img.getpixel((3, 3)) == (255, 255, 255)  # index 0 is opaque green in the palette, but transparent
    assert img.getpixel((60, 3)) == (255, 0, 0)


def test_animated_gif_uses_first_frame(cases):
    info = image_info(cases["gif_animated"].path)
    assert info["frames"] == 2 and info["format"] == "GIF"
    img = load_image(cases["gif_animated"].path)
    arr = np.asarray(img)
    assert not np.all(arr == (0, 255, 0))  # the all-green second frame was not used
    _probe(img, "gif_animated")


def test_exif_rotation_swaps_size_and_rotates_clockwise(cases):
    path = cases["exif_rotated_jpeg"].path
    with Image.open(path) as src:
        assert src.size == (imagecases.W, imagecases.H)
        assert src.getexif()[0x0112] == 6
    img = load_image(path)
    assert img.size == (imagecases.H, imagecases.W)
    top, bottom = img.getpixel((10, 5)), img.getpixel((10, imagecases.W - 5))
    assert _close(top, (255, 0, 0)) and _close(bottom, (0, 0, 255))  # 90 deg CW: left edge -> top
    info = image_info(path)
    assert (info["width"], info["height"], info["orientation"]) == (imagecases.H, imagecases.W, 6)
    _, meta = decode_for(path, chw_identity)
    assert (meta["width"], meta["height"]) == (imagecases.H, imagecases.W)


@pytest.mark.parametrize(
    "mode, make, expect",
    [
        ("RGBa", lambda: Image.new("RGBA", (4, 4), (255, 0, 0, 0)).convert("RGBa"), (255, 255, 255)),
        ("La", lambda: Image.new("LA", (4, 4), (0, 255)).convert("La"), (0, 0, 0)),
        ("PA", lambda: Image.new("RGBA", (4, 4), (0, 0, 255, 0)).convert("PA"), (255, 255, 255)),
        ("YCbCr", lambda: Image.new("RGB", (4, 4), (255, 0, 0)).convert("YCbCr"), (255, 0, 0)),
        ("HSV", lambda: Image.new("RGB", (4, 4), (0, 0, 255)).convert("HSV"), (0, 0, 255)),
        ("RGBX", lambda: Image.new("RGB", (4, 4), (0, 255, 0)).convert("RGBX"), (0, 255, 0)),
        ("L+trns", lambda: _with_info(Image.new("L", (4, 4), 7), transparency=7), (255, 255, 255)),
        ("RGB+trns", lambda: _with_info(Image.new("RGB", (4, 4), (1, 2, 3)), transparency=(1, 2, 3)), (255, 255, 255)),
        ("I;16B", lambda: Image.frombytes("I;16B", (4, 4), np.full((4, 4), 32768, ">u2").tobytes()), (128, 128, 128)),
        ("I neg", lambda: Image.fromarray(np.array([[-5, 5]] * 2, np.int32)), (0, 0, 0)),
        ("I big", lambda: Image.fromarray(np.array([[0, 10**6]] * 2, np.int32)), (0, 0, 0)),
        ("F 0..255", lambda: Image.fromarray(np.full((2, 2), 200.0, np.float32)), (200, 200, 200)),
        ("F nan", lambda: Image.fromarray(np.array([[np.nan, 0.5]] * 2, np.float32)), (0, 0, 0)),
    ],
)
def test_to_rgb_modes(mode, make, expect):
    img = make()
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == img.size
    assert _close(out.getpixel((0, 0)), expect, tol=2), (mode, out.getpixel((0, 0)))


def _with_info(img, **info):
    img.info.update(info)
    return img


def test_high_range_int_and_float_are_min_max_scaled():
    out = to_rgb(Image.fromarray(np.array([[0, 10**6]], np.int32)))
    assert out.getpixel((0, 0)) == (0, 0, 0) and out.getpixel((1, 0)) == (255, 255, 255)
    out = to_rgb(Image.fromarray(np.array([[-1.0, 3.0]], np.float32)))
    assert out.getpixel((0, 0)) == (0, 0, 0) and out.getpixel((1, 0)) == (255, 255, 255)


def test_unconvertible_mode_is_unsupported_mode():
    class Weird:
        mode = "XYZ"
        info: dict = {}

        def convert(self, mode):
            raise ValueError("conversion from XYZ not supported")

    with pytest.raises(ImageDecodeError) as ei:
        to_rgb(Weird(), "weird.tif")
    assert ei.value.reason == "unsupported_mode"


# ---------------------------------------------------------------- bombs


@pytest.mark.parametrize("name", ["bomb_png", "bomb_mild_png"])
def test_bomb_rejected_before_decoding(cases, name, monkeypatch):
    def no_decoding(self, *a, **k):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    assert os.path.getsize(cases[name].path) < 100_000  # small on disk, huge in memory
    with pytest.raises(ImageDecodeError) as ei:
        load_image(cases[name].path)
    assert ei.value.reason == "bomb"


@pytest.mark.parametrize("name", ["bomb_png", "bomb_mild_png"])
def test_bomb_limit_holds_without_pils_global_limit(cases, name, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(ImageDecodeError) as ei:
        load_image(cases[name].path)
    assert ei.value.reason == "bomb"
    with pytest.raises(ImageDecodeError) as ei:
        image_info(cases[name].path)
    assert ei.value.reason == "bomb"


def test_max_pixels_boundary(cases):
    path = cases["png"].path
    n = imagecases.W * imagecases.H
    assert load_image(path, max_pixels=n).size == (imagecases.W, imagecases.H)
    with pytest.raises(ImageDecodeError) as ei:
        load_image(path, max_pixels=n - 1)
    assert ei.value.reason == "bomb"
    assert DEFAULT_MAX_PIXELS == 89_478_485
    with pytest.raises(InvalidInput):
        load_image(path, max_pixels=0)


def test_decompression_bomb_warning_not_emitted(cases, monkeypatch, recwarn):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # PIL warns (not raises) for the 3072-px image
    load_image(cases["png"].path)
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


# ---------------------------------------------------------------- truncation and other failures


@pytest.mark.parametrize("name", ["truncated_jpeg", "truncated_png"])
def test_truncated_raises_even_if_pil_allows_truncated(cases, name, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ImageDecodeError) as ei:
        load_image(cases[name].path)
    assert ei.value.reason == "truncated"


def test_png_cut_after_pixels_is_truncated(cases, tmp_path):
    data = Path(cases["png"].path).read_bytes()
    p = tmp_path / "cut.png"
    p.write_bytes(data[:-12])  # no IEND chunk
    with pytest.raises(ImageDecodeError) as ei:
        load_image(p)
    assert ei.value.reason == "truncated"


def test_jpeg_cut_inside_header_is_truncated(cases, tmp_path):
    p = tmp_path / "head.jpg"
    p.write_bytes(Path(cases["jpeg"].path).read_bytes()[:40])
    with pytest.raises(ImageDecodeError) as ei:
        load_image(p)
    assert ei.value.reason == "truncated"


def test_pil_truncation_flag_is_left_false(cases):
    for name in DECODE_CASES:
        try_decode_for(cases[name].path, chw_identity)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_fuzzed_files_never_leak_raw_exceptions(cases, tmp_path):
    rnd = random.Random(1234)
    seen = set()
    for name in ["jpeg", "png", "webp", "gif_animated", "bmp", "tiff", "cmyk_jpeg", "gray16_png"]:
        data = Path(cases[name].path).read_bytes()
        ext = Path(cases[name].path).suffix
        variants = [data[: rnd.randrange(1, len(data))] for _ in range(12)]
        for _ in range(12):
            b = bytearray(data)
            for _ in range(rnd.randint(1, 6)):
                b[rnd.randrange(len(b))] = rnd.randrange(256)
            variants.append(bytes(b))
        for i, v in enumerate(variants):
            p = tmp_path / f"{name}_{i}{ext}"
            p.write_bytes(v)
            try:
                img = load_image(p)
            except ImageDecodeError as e:
                assert e.reason in REASONS
                seen.add(e.reason)
            else:
                assert img.mode == "RGB"
    assert "truncated" in seen


def test_missing_directory_fifo_and_unreadable(tmp_path, monkeypatch):
    with pytest.raises(ImageDecodeError) as ei:
        load_image(tmp_path / "nope.jpg")
    assert ei.value.reason == "not_found"
    (tmp_path / "dir.jpg").mkdir()
    with pytest.raises(ImageDecodeError) as ei:
        load_image(tmp_path / "dir.jpg")
    assert ei.value.reason == "not_a_file"
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    with pytest.raises(ImageDecodeError) as ei:  # must not block waiting for a writer
        load_image(fifo)
    assert ei.value.reason == "not_a_file"
    with pytest.raises(ImageDecodeError) as ei:
        content_hash(fifo)
    assert ei.value.reason == "not_a_file"

    real_open = os.open

    def denied(path, *a, **k):
        if str(path).endswith("secret.jpg"):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *a, **k)

    (tmp_path / "secret.jpg").write_bytes(b"x")
    monkeypatch.setattr(images.os, "open", denied)
    for fn in (load_image, content_hash):
        with pytest.raises(ImageDecodeError) as ei:
            fn(tmp_path / "secret.jpg")
        assert ei.value.reason == "permission_denied"


def test_max_bytes(cases):
    path = cases["jpeg"].path
    size = os.path.getsize(path)
    assert load_image(path, max_bytes=size).mode == "RGB"
    with pytest.raises(ImageDecodeError) as ei:
        load_image(path, max_bytes=size - 1)
    assert ei.value.reason == "too_large"


def test_other_formats_are_refused_without_being_parsed(tmp_path):
    p = tmp_path / "actually.png"
    p.write_bytes(_pcx_bytes())
    with pytest.raises(ImageDecodeError) as ei:
        load_image(p)
    assert ei.value.reason == "not_an_image"
    eps = tmp_path / "script.png"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    with pytest.raises(ImageDecodeError) as ei:
        load_image(eps)
    assert ei.value.reason == "not_an_image"


def _pcx_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, "PCX")
    return buf.getvalue()


def test_malformed_exif_is_ignored(tmp_path):
    buf = io.BytesIO()
    imagecases.pattern().save(buf, "JPEG", exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff garbage")
    p = tmp_path / "badexif.jpg"
    p.write_bytes(buf.getvalue())
    img = load_image(p)
    assert img.size == (imagecases.W, imagecases.H)


# ---------------------------------------------------------------- info, hash, draft, workers


def test_image_info_reads_header_only(cases, monkeypatch):
    def no_decoding(self, *a, **k):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    info = image_info(cases["jpeg"].path)
    assert info["width"] == imagecases.W and info["height"] == imagecases.H
    assert info["format"] == "JPEG" and info["mode"] == "RGB" and info["frames"] == 1
    assert info["file_size"] == os.path.getsize(cases["jpeg"].path)
    with pytest.raises(ImageDecodeError) as ei:
        image_info(cases["text_as_png"].path)
    assert ei.value.reason == "not_an_image"


def test_content_hash(cases, tmp_path):
    a = tmp_path / "a.jpg"
    b = tmp_path / "b.jpg"
    data = Path(cases["jpeg"].path).read_bytes()
    a.write_bytes(data)
    b.write_bytes(data)
    h = content_hash(a)
    assert h == content_hash(b) == bytes_hash(data) and len(h) == 32
    b.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert content_hash(b) != h
    _, meta = decode_for(a, chw_identity, with_hash=True)
    assert meta["content_hash"] == h and meta["file_size"] == len(data)
    with pytest.raises(ImageDecodeError) as ei:
        content_hash(tmp_path / "gone.jpg")
    assert ei.value.reason == "not_found"


def test_decode_for_returns_chw_and_original_size(cases):
    arr, meta = decode_for(cases["png"].path, chw_identity)
    assert arr.shape == (3, imagecases.H, imagecases.W) and arr.dtype == np.float32 and arr.flags.c_contiguous
    assert arr[0, 5, 5] == pytest.approx(1.0) and arr[2, 5, 5] == pytest.approx(0.0)
    assert meta["width"] == imagecases.W and meta["height"] == imagecases.H and meta["format"] == "PNG"
    with pytest.raises(ImageDecodeError) as ei:
        decode_for(cases["png"].path, failing_preprocess)
    assert ei.value.reason == "preprocess_failed"


def test_draft_decodes_large_jpeg_smaller_but_reports_full_size(tmp_path):
    rng = np.random.default_rng(0)
    p = tmp_path / "big.jpg"
    Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(p, quality=90)
    full = load_image(p)
    small = load_image(p, draft=224)
    assert full.size == (640, 480)
    assert small.size == (320, 240)  # libjpeg scaled by 1/2, both sides still >= 224
    arr, meta = decode_for(p, chw_identity, draft=224)
    assert arr.shape == (3, 240, 320) and (meta["width"], meta["height"]) == (640, 480)
    assert load_image(p, draft=1000).size == (640, 480)  # never below the requested size


def test_decode_for_runs_in_worker_processes(cases):
    paths = [cases[n].path for n in ("jpeg", "png", "truncated_jpeg", "exif_rotated_jpeg", "empty_jpg")]
    with ProcessPoolExecutor(max_workers=1) as pool:
        results = list(pool.map(try_decode_for, paths, [chw_identity] * len(paths)))
    assert [r[0] is None for r in results] == [False, False, True, False, True]
    assert results[2][1]["error"] == "truncated" and results[4][1]["error"] == "empty"
    assert results[3][0].shape == (3, imagecases.W, imagecases.H)
    np.testing.assert_array_equal(results[1][0], decode_for(paths[1], chw_identity)[0])
