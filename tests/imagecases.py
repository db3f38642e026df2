"""Writes one file for every good and bad image kind the indexer must handle (shared by several test files).

``write_cases(dir)`` returns ``{name: Case(path, reason)}``: ``reason`` is None for files that must decode,
otherwise the expected ``ImageDecodeError.reason`` (or, for the two symlink cases in ``WALK_ONLY``, the
reason ``t2c.data.sources.walk_folder`` reports with its default ``follow_symlinks=False``; with
``follow_symlinks=True`` they become ``FOLLOW_REASONS[name]``).

``CHECKS[name]`` gives, for decodable cases, the expected decoded ``(width, height)`` and probe pixels
``[((x, y), (r, g, b)), ...]`` to compare within ``TOLERANCE`` (JPEG is lossy).

Every valid picture shows the same pattern, ``W x H`` with the left half red and the right half blue
(unless the case says otherwise), so orientation and colour can both be checked.
"""
from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

W, H = 64, 48
RED, BLUE, GREEN, WHITE, BLACK = (255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 255), (0, 0, 0)
TOLERANCE = 40  # per channel; JPEG chroma subsampling blurs the colour edge a little

WALK_ONLY = frozenset({"loop", "broken_symlink"})
FOLLOW_REASONS = {"loop": "symlink_loop", "broken_symlink": "broken_symlink"}

_LEFT, _RIGHT = (W // 4, H // 2), (3 * W // 4, H // 2)
_HALVES = [(_LEFT, RED), (_RIGHT, BLUE)]

CHECKS: dict[str, tuple[tuple[int, int], list]] = {
    "jpeg": ((W, H), _HALVES),
    "jpeg_upper_ext": ((W, H), _HALVES),
    "png": ((W, H), _HALVES),
    "png_named_jpg": ((W, H), _HALVES),
    "webp": ((W, H), _HALVES),
    "gif_animated": ((W, H), _HALVES),  # second frame is all green: must not be used
    "webp_animated": ((W, H), _HALVES),
    "bmp": ((W, H), _HALVES),
    "tiff": ((W, H), _HALVES),
    "tiff_multipage": ((W, H), _HALVES),
    "cmyk_jpeg": ((W, H), [(_LEFT, RED), (_RIGHT, RED)]),
    "gray16_png": ((W, H), [(_LEFT, (128, 128, 128)), (_RIGHT, WHITE)]),
    "palette_alpha_png": ((W, H), [(_LEFT, WHITE), (_RIGHT, RED)]),
    "rgba_png": ((W, H), [(_LEFT, WHITE), (_RIGHT, BLUE)]),
    "la_png": ((W, H), [(_LEFT, WHITE), (_RIGHT, BLACK)]),
    "bitonal_png": ((W, H), [(_LEFT, BLACK), (_RIGHT, WHITE)]),
    "float_tiff": ((W, H), [(_LEFT, BLACK), (_RIGHT, WHITE)]),
    "int32_tiff": ((W, H), [(_LEFT, BLACK), (_RIGHT, WHITE)]),
    # stored W x H with red on the left, EXIF orientation 6 (rotate 90 deg clockwise to display):
    # shown H x W with red on top.
    "exif_rotated_jpeg": ((H, W), [((H // 2, W // 4), RED), ((H // 2, 3 * W // 4), BLUE)]),
}


# name -> expected reason (None: decodes); the same names and reasons that write_cases produces, so tests
# can be parametrised at collection time.
EXPECTED_REASONS: dict[str, str | None] = {
    **{name: None for name in CHECKS},
    "empty_jpg": "empty",
    "truncated_jpeg": "truncated",
    "truncated_png": "truncated",
    "text_as_png": "not_an_image",
    "bomb_png": "bomb",
    "bomb_mild_png": "bomb",
    "loop": "symlink",
    "broken_symlink": "symlink",
}


class Case(NamedTuple):
    path: str
    reason: str | None


def pattern(w: int = W, h: int = H) -> Image.Image:
    """Left half red, right half blue, RGB."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = RED
    a[:, w // 2 :] = BLUE
    return Image.fromarray(a)


def _halves(left, right, dtype, w: int = W, h: int = H) -> np.ndarray:
    a = np.empty((h, w), dtype)
    a[:, : w // 2] = left
    a[:, w // 2 :] = right
    return a


def _noise(size: int = 256, seed: int = 0) -> Image.Image:
    """Incompressible content, so a cut file is cut inside the pixel data."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def bomb_png(width: int, height: int) -> bytes:
    """A valid 1-bit grayscale PNG of width x height, all black: tiny on disk, huge once decoded."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    parts = [comp.compress(row) for _ in range(height)]
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", b"".join(parts))
        + _png_chunk(b"IEND", b"")
    )


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def write_cases(directory: str | os.PathLike) -> dict[str, Case]:
    """Write every case into ``directory`` (created if needed) and return ``{name: Case(path, reason)}``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cases: dict[str, Case] = {}

    def put(name: str, filename: str, data: bytes, reason: str | None = None) -> None:
        p = d / filename
        p.write_bytes(data)
        cases[name] = Case(str(p), reason)

    pat = pattern()
    jpeg_kw = {"quality": 95, "subsampling": 0}
    # ---- valid files ----
    put("jpeg", "photo.jpg", _save(pat, "JPEG", **jpeg_kw))
    put("jpeg_upper_ext", "UPPER.JPG", _save(pat, "JPEG", **jpeg_kw))
    put("png", "plain.png", _save(pat, "PNG"))
    put("png_named_jpg", "really_png.jpg", _save(pat, "PNG"))
    put("webp", "image.webp", _save(pat, "WEBP", lossless=True))
    green = Image.new("RGB", (W, H), GREEN)
    put(
        "gif_animated",
        "anim.gif",
        _save(pat, "GIF", save_all=True, append_images=[green], duration=100, loop=0),
    )
    put(
        "webp_animated",
        "anim.webp",
        _save(pat, "WEBP", save_all=True, append_images=[green], duration=100, lossless=True),
    )
    put("bmp", "image.bmp", _save(pat, "BMP"))
    put("tiff", "image.tif", _save(pat, "TIFF", compression="tiff_deflate"))
    put("tiff_multipage", "pages.TIFF", _save(pat, "TIFF", save_all=True, append_images=[green]))
    # ---- modes that need care ----
    put("cmyk_jpeg", "cmyk.jpg", _save(Image.new("CMYK", (W, H), (0, 255, 255, 0)), "JPEG", quality=95))
    gray16 = Image.fromarray(_halves(32768, 65535, np.uint16))
    put("gray16_png", "gray16.png", _save(gray16, "PNG"))
    pal = Image.frombytes("P", (W, H), _halves(0, 1, np.uint8).tobytes())
    pal.putpalette([0, 255, 0, 255, 0, 0] + [0, 0, 0] * 254)
    put("palette_alpha_png", "palette_alpha.png", _save(pal, "PNG", transparency=0))
    rgba = np.zeros((H, W, 4), np.uint8)
    rgba[:, : W // 2] = (0, 255, 0, 0)  # fully transparent green: must become white
    rgba[:, W // 2 :] = (0, 0, 255, 255)
    put("rgba_png", "rgba.png", _save(Image.fromarray(rgba), "PNG"))
    la = np.zeros((H, W, 2), np.uint8)
    la[:, W // 2 :, 1] = 255  # left transparent black (-> white), right opaque black
    put("la_png", "la.png", _save(Image.fromarray(la), "PNG"))
    put("bitonal_png", "bitonal.png", _save(Image.fromarray(_halves(0, 255, np.uint8)).convert("1"), "PNG"))
    put("float_tiff", "float.tiff", _save(Image.fromarray(_halves(0.0, 1.0, np.float32)), "TIFF"))
    put("int32_tiff", "int32.tiff", _save(Image.fromarray(_halves(0, 65535, np.int32)), "TIFF"))
    exif = Image.Exif()
    exif[0x0112] = 6
    put("exif_rotated_jpeg", "rotated.jpg", _save(pat, "JPEG", exif=exif.tobytes(), **jpeg_kw))
    # ---- bad files ----
    put("empty_jpg", "empty.jpg", b"", "empty")
    jpg = _save(_noise(), "JPEG", quality=90)
    put("truncated_jpeg", "truncated.jpg", jpg[: int(len(jpg) * 0.6)], "truncated")
    png = _save(_noise(), "PNG")
    put("truncated_png", "truncated.png", png[: int(len(png) * 0.6)], "truncated")
    put("text_as_png", "notes.png", b"this is a text file, not a picture\n" * 20, "not_an_image")
    put("bomb_png", "bomb.png", bomb_png(20000, 20000), "bomb")  # 4e8 px, ~60 KB on disk
    put("bomb_mild_png", "bomb_mild.png", bomb_png(10000, 9000), "bomb")  # 9e7 px: PIL alone only warns
    # ---- symlinks (found by the walker, never decoded) ----
    loop = d / "loop"
    os.symlink(".", loop)
    cases["loop"] = Case(str(loop), "symlink")
    broken = d / "broken.jpg"
    os.symlink("does_not_exist.jpg", broken)
    cases["broken_symlink"] = Case(str(broken), "symlink")
    assert {k: v.reason for k, v in cases.items()} == EXPECTED_REASONS, "imagecases tables out of sync"
    return cases
