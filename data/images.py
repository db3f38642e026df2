"""Safe image decoding: any supported file -> an RGB PIL image, or an ImageDecodeError with a reason tag.

Supported formats: JPEG (and camera MPO), PNG, WebP, GIF (first frame), BMP, TIFF (first page). Other
formats PIL could open (EPS, PSD, ICO, ...) are refused as ``not_an_image``, so untrusted folders never
reach the riskier plugins.

Every failure raises ``t2c.data.errors.ImageDecodeError(reason, message)``; no raw PIL/OS exception escapes.
Reason tags (``REASONS``):

=====================  ======================================================================
``not_found``          the path does not exist (e.g. deleted between the walk and the decode)
``not_a_file``         the path is a directory, FIFO, device, ...
``permission_denied``  the file cannot be opened for reading
``io_error``           any other OS error while reading the bytes
``empty``              zero bytes
``too_large``          more bytes than ``max_bytes``
``not_an_image``       not identified as one of the supported formats
``bomb``               more pixels than ``max_pixels`` (decompression bomb), checked from the header
                       before any pixel is decoded; PIL's own limit (``Image.MAX_IMAGE_PIXELS``) and
                       PNG text-chunk limits are reported with this tag too
``truncated``          the pixel data ends early
``corrupt``            identified, but the header or pixel data is invalid
``unsupported_mode``   decoded, but its pixel mode cannot be converted to RGB
``out_of_memory``      MemoryError while decoding
``preprocess_failed``  ``decode_for`` only: the preprocessing function rejected the image
=====================  ======================================================================

A PNG must end with its IEND chunk (a PNG cut after its last pixel row is still ``truncated``). Truncated
JPEG and PNG files are caught even when other code has set ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES = True``:
then JPEGs are also checked for an end-of-image marker after their last scan. (With that flag set, PIL
pads truncated GIF/BMP/TIFF files instead of failing; this module never sets it.)

Mode conversion to RGB (``to_rgb``):
    ``1``, ``L``, ``P``, ``RGBX``, ``YCbCr``, ``CMYK`` ... -> PIL's conversion (CMYK uses the embedded ICC
    profile when there is one); anything with alpha (``RGBA``, ``LA``, ``PA``, ``P``/``L``/``RGB`` with a
    ``transparency`` key, premultiplied ``RGBa``/``La``) -> composited on white; 16-bit ``I;16*`` ->
    ``round(v / 257)``; 32-bit ``I`` -> ``/257`` when all values lie in 0..65535 (16-bit data, e.g. PNG),
    otherwise min-max scaled; ``F`` -> ``x 255`` when values lie in 0..1, as-is when in 0..255, otherwise
    min-max scaled (NaN -> 0).
"""
from __future__ import annotations

import hashlib
import io
import os
import stat as stat_mod
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

from t2c.data.errors import ImageDecodeError, InvalidInput

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's default MAX_IMAGE_PIXELS (~ 0.25 GiB of RGBA at 4 B/px / 3)
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG also yields camera MPO files
REASONS = frozenset(
    {
        "not_found",
        "not_a_file",
        "permission_denied",
        "io_error",
        "empty",
        "too_large",
        "not_an_image",
        "bomb",
        "truncated",
        "corrupt",
        "unsupported_mode",
        "out_of_memory",
        "preprocess_failed",
    }
)
WHITE = (255, 255, 255)
_HASH_CHUNK = 1 << 20

# Magic numbers of the supported formats: a file that starts like one but cannot be opened is `corrupt`.
_BMP_HEADER_SIZES = (12, 16, 40, 52, 56, 64, 108, 124)
_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),
    (b"MM\x00+", "TIFF"),
)


def _fail(reason: str, path, message: str) -> ImageDecodeError:
    return ImageDecodeError(reason, f"{path}: {message}")


def _sniff(data: bytes) -> str | None:
    """Format name from the magic bytes, or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:2] == b"BM" and len(data) >= 18 and int.from_bytes(data[14:18], "little") in _BMP_HEADER_SIZES:
        return "BMP"
    for sig, name in _SIGNATURES:
        if data.startswith(sig):
            return name
    return None


def _open_fd(path) -> int:
    """Open for reading without blocking on FIFOs; map OS failures to reason tags."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(os.fspath(path), flags)
    except FileNotFoundError:
        raise _fail("not_found", path, "no such file") from None
    except PermissionError:
        raise _fail("permission_denied", path, "permission denied") from None
    except IsADirectoryError:
        raise _fail("not_a_file", path, "is a directory") from None
    except OSError as e:
        raise _fail("io_error", path, f"cannot open: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
    except OSError as e:
        os.close(fd)
        raise _fail("io_error", path, f"cannot stat: {e.strerror or e}") from None
    if not stat_mod.S_ISREG(st.st_mode):
        os.close(fd)
        kind = "is a directory" if stat_mod.S_ISDIR(st.st_mode) else "not a regular file"
        raise _fail("not_a_file", path, kind)
    return fd


def _read_bytes(path, max_bytes: int | None) -> bytes:
    """Read a whole regular file, mapping every OS failure to a reason tag."""
    fd = _open_fd(path)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            raise _fail("empty", path, "file is empty (0 bytes)")
        if max_bytes is not None and size > max_bytes:
            raise _fail("too_large", path, f"file has {size} bytes, more than the limit of {max_bytes}")
        with os.fdopen(fd, "rb", closefd=True) as f:
            fd = -1
            data = f.read() if max_bytes is None else f.read(max_bytes + 1)
    except ImageDecodeError:
        raise
    except MemoryError:
        raise _fail("out_of_memory", path, "out of memory reading the file") from None
    except OSError as e:
        raise _fail("io_error", path, f"read failed: {e.strerror or e}") from None
    finally:
        if fd >= 0:
            os.close(fd)
    if not data:
        raise _fail("empty", path, "file is empty (0 bytes)")
    if max_bytes is not None and len(data) > max_bytes:
        raise _fail("too_large", path, f"file has more than the limit of {max_bytes} bytes")
    return data


def content_hash(path: str | Path) -> str:
    """blake2b-128 hex digest of the file's bytes (streamed in 1 MiB chunks, ~1 GB/s per core).

    Used by the pipeline to detect changed files; equal bytes give equal hashes. Raises ImageDecodeError
    (``not_found``, ``permission_denied``, ``not_a_file``, ``io_error``) when the file cannot be read.
    """
    h = hashlib.blake2b(digest_size=16)
    fd = _open_fd(path)
    try:
        with os.fdopen(fd, "rb", closefd=True) as f:
            while chunk := f.read(_HASH_CHUNK):
                h.update(chunk)
    except OSError as e:
        raise _fail("io_error", path, f"read failed: {e.strerror or e}") from None
    return h.hexdigest()


def bytes_hash(data: bytes) -> str:
    """The same digest as ``content_hash`` for bytes already in memory."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _silence_pil_warnings() -> None:
    """We enforce our own pixel limit and report bad files ourselves: ignore PIL's warnings about them.

    Checked on every call (cheap) because ``warnings.catch_warnings`` blocks elsewhere may reset filters;
    filters are added rather than using ``catch_warnings`` here, which is not thread-safe.
    """
    from PIL import Image

    if not any(f[0] == "ignore" and f[2] is Image.DecompressionBombWarning for f in warnings.filters):
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    if not any(f[0] == "ignore" and f[3] is not None and f[3].pattern == _PLUGIN_MODULES for f in warnings.filters):
        # plugins warn about malformed tags in files that we then accept or reject ourselves
        warnings.filterwarnings("ignore", category=UserWarning, module=_PLUGIN_MODULES)


_PLUGIN_MODULES = r"PIL\.\w+ImagePlugin"


def _open(data: bytes, path, max_pixels: int):
    """Parse the header only (no pixel decoding) and enforce the pixel limit."""
    from PIL import Image, UnidentifiedImageError

    _silence_pil_warnings()
    if not isinstance(max_pixels, int) or isinstance(max_pixels, bool) or max_pixels <= 0:
        raise InvalidInput(f"max_pixels must be a positive integer, got {max_pixels!r}")
    try:
        img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as e:
        raise _fail("bomb", path, f"decompression bomb refused by PIL: {e}") from None
    except UnidentifiedImageError:
        fmt = _sniff(data)
        if fmt and _lacks_end_marker(data, fmt):
            raise _fail("truncated", path, f"starts like {fmt} but ends inside its header") from None
        if fmt:
            raise _fail("corrupt", path, f"starts like {fmt} but its header cannot be parsed") from None
        raise _fail(
            "not_an_image", path, f"not a supported image (supported: {', '.join(ALLOWED_FORMATS)})"
        ) from None
    except MemoryError:
        raise _fail("out_of_memory", path, "out of memory reading the header") from None
    except ValueError as e:
        if "Decompressed Data Too Large" in str(e) or "too large" in str(e).lower():
            raise _fail("bomb", path, f"oversized metadata chunk: {e}") from None
        raise _fail("corrupt", path, f"invalid header: {e}") from None
    except EOFError:
        raise _fail("truncated", path, "file ends inside its header") from None
    except Exception as e:  # noqa: BLE001 - any plugin failure means a bad file, never a crash
        if "truncat" in str(e).lower():
            raise _fail("truncated", path, f"file ends inside its header ({e})") from None
        raise _fail("corrupt", path, f"invalid header ({type(e).__name__}: {e})") from None
    w, h = img.size
    if w <= 0 or h <= 0:
        img.close()
        raise _fail("corrupt", path, f"invalid dimensions {w}x{h}")
    if w * h > max_pixels:
        img.close()
        raise _fail("bomb", path, f"{w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")
    return img


def _lacks_end_marker(data: bytes, fmt: str) -> bool:
    """True when a JPEG has no EOI after its last scan, or a PNG has no IEND chunk."""
    if fmt in ("JPEG", "MPO"):
        return data.rfind(b"\xff\xd9") < max(data.rfind(b"\xff\xda"), 2)
    if fmt == "PNG":
        return data.rfind(b"IEND") < 0
    return False


def _check_end_marker(data: bytes, fmt: str, path) -> None:
    """Structural truncation check: always for PNG, for JPEG when PIL is told to load truncated images."""
    if _lacks_end_marker(data, fmt):
        what = "its end-of-image marker" if fmt in ("JPEG", "MPO") else "its IEND chunk"
        raise _fail("truncated", path, f"{fmt} data ends before {what}")


def _load(img, data: bytes, path) -> None:
    """Decode all pixels of the current (first) frame, mapping failures to reason tags."""
    from PIL import Image, ImageFile

    try:
        img.load()
    except Image.DecompressionBombError as e:
        raise _fail("bomb", path, f"decompression bomb refused by PIL: {e}") from None
    except MemoryError:
        raise _fail("out_of_memory", path, "out of memory decoding the pixels") from None
    except (EOFError, OSError, SyntaxError, ValueError, IndexError, TypeError, KeyError, SystemError) as e:
        msg = str(e)
        low = msg.lower()
        if isinstance(e, EOFError) or "truncated" in low or "premature end" in low:
            raise _fail("truncated", path, f"truncated: {msg or type(e).__name__}") from None
        if "decompressed data too large" in low:
            raise _fail("bomb", path, f"oversized chunk: {msg}") from None
        raise _fail("corrupt", path, f"cannot decode pixels ({type(e).__name__}: {msg})") from None
    except Exception as e:  # noqa: BLE001
        raise _fail("corrupt", path, f"cannot decode pixels ({type(e).__name__}: {e})") from None
    fmt = img.format or ""
    if fmt == "PNG" or ImageFile.LOAD_TRUNCATED_IMAGES:
        _check_end_marker(data, fmt, path)


def _to_uint8_gray(arr: np.ndarray, mode: str) -> np.ndarray:
    """Scale a single-channel high-bit-depth array to uint8 (see module docstring for the rules)."""
    if mode.startswith("I;16"):
        return np.rint(arr.astype(np.float32) * (1.0 / 257.0)).astype(np.uint8)
    a = arr.astype(np.float64)
    if mode == "F":
        a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if lo >= 0.0 and hi <= 1.0:
            a = a * 255.0
        elif lo >= 0.0 and hi <= 255.0:
            pass
        else:
            a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    else:  # "I": 32-bit signed
        lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
        if lo >= 0 and hi <= 65535:
            a = a * (1.0 / 257.0)
        else:
            a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _composite_on_white(rgba):
    from PIL import Image

    alpha = rgba.getchannel("A")
    lo, _ = alpha.getextrema()
    rgb = rgba.convert("RGB")
    if lo == 255:
        return rgb
    out = Image.new("RGB", rgba.size, WHITE)
    out.paste(rgb, (0, 0), alpha)
    return out


def _cmyk_to_rgb(img):
    icc = img.info.get("icc_profile")
    if icc:
        try:
            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            dst = ImageCms.createProfile("sRGB")
            out = ImageCms.profileToProfile(img, src, dst, outputMode="RGB")
            if out is not None:
                return out
        except Exception:  # noqa: BLE001 - a bad or odd profile falls back to the plain conversion
            pass
    return img.convert("RGB")


def to_rgb(img, path: Any = "<image>"):
    """Convert a loaded PIL image of any mode to RGB (alpha composited on white); raise unsupported_mode."""
    from PIL import Image

    mode = img.mode
    try:
        if mode == "RGB" and "transparency" not in img.info:
            return img
        if mode == "CMYK":
            return _cmyk_to_rgb(img)
        if mode.startswith("I;16") or mode in ("I", "F"):
            arr = np.asarray(img)
            if arr.ndim != 2:
                raise ValueError(f"unexpected array shape {arr.shape}")
            return Image.fromarray(_to_uint8_gray(arr, mode)).convert("RGB")
        if mode == "La":  # premultiplied: PIL only converts it to LA
            img = img.convert("LA")
        if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
            return _composite_on_white(img.convert("RGBA"))
        if mode in ("P", "L", "RGB", "1") and "transparency" in img.info:
            return _composite_on_white(img.convert("RGBA"))
        return img.convert("RGB")
    except MemoryError:
        raise _fail("out_of_memory", path, f"out of memory converting mode {mode} to RGB") from None
    except Exception as e:  # noqa: BLE001
        raise _fail("unsupported_mode", path, f"cannot convert mode {mode!r} to RGB ({e})") from None


def _exif_transpose(img):
    """Apply EXIF orientation; malformed EXIF is ignored (the image is kept as stored)."""
    from PIL import ImageOps

    try:
        out = ImageOps.exif_transpose(img)
    except MemoryError:
        raise
    except Exception:  # noqa: BLE001
        return img
    return img if out is None else out


def _orientation(img) -> int:
    try:
        o = int(img.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001
        return 1
    return o if 1 <= o <= 8 else 1


def _decode(path, max_pixels: int, max_bytes: int | None, draft: int | None, data: bytes | None = None):
    """Shared decode: returns (rgb image, meta, bytes); meta width/height are the full-size oriented size.

    ``data``: the file's bytes when they are already in memory (an upload); ``path`` then only names it.
    """
    if data is None:
        data = _read_bytes(path, max_bytes)
    elif not data:
        raise _fail("empty", path, "file is empty (0 bytes)")
    elif max_bytes is not None and len(data) > max_bytes:
        raise _fail("too_large", path, f"file has {len(data)} bytes, more than the limit of {max_bytes}")
    src = _open(data, path, max_pixels)
    rgb = None
    try:
        fmt = src.format
        src_mode = src.mode
        w, h = src.size
        if draft and fmt in ("JPEG", "MPO"):
            try:
                src.draft(None, (int(draft), int(draft)))
            except Exception:  # noqa: BLE001 - draft is only an optimisation
                pass
        _load(src, data, path)
        orientation = _orientation(src)
        if orientation in (5, 6, 7, 8):
            w, h = h, w
        img = src
        if orientation != 1:
            try:
                img = _exif_transpose(src)
            except MemoryError:
                raise _fail("out_of_memory", path, "out of memory applying EXIF orientation") from None
        rgb = to_rgb(img, path)
    finally:
        # An RGB image needing no rotation is returned as is (no copy); it is fully loaded and reads from
        # an in-memory buffer, so it holds no file handle. Otherwise the source is done with.
        if rgb is not src:
            src.close()
    meta = {"width": w, "height": h, "format": fmt, "mode": src_mode, "file_size": len(data)}
    return rgb, meta, data


def load_image(
    path: str | Path,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int | None = None,
    draft: int | None = None,
):
    """Decode an image file safely into an RGB PIL image with EXIF orientation applied.

    Args:
        path: the file to read (JPEG, PNG, WebP, GIF first frame, BMP, TIFF first page).
        max_pixels: refuse images whose header declares more pixels (``bomb``), before any pixel is
            decoded; enforced whatever ``PIL.Image.MAX_IMAGE_PIXELS`` is (even None). PIL's own check
            still runs first, so images above ``2 * PIL.Image.MAX_IMAGE_PIXELS`` (default ~179 M) are
            refused as ``bomb`` too: to allow more, raise PIL's limit as well.
        max_bytes: refuse files bigger than this many bytes (``too_large``); None means no limit.
        draft: for JPEG, let libjpeg decode at a reduced scale (1/2, 1/4, 1/8) while both sides stay
            >= ``draft``; a large speed-up when the consumer resizes to about that size anyway.

    Returns:
        A fully loaded ``PIL.Image.Image`` in mode ``RGB``.

    Raises:
        ImageDecodeError: with ``reason`` one of ``REASONS`` (see the module docstring).

    Example:
        >>> img = load_image("photo.jpg")  # doctest: +SKIP
        >>> img.mode
        'RGB'
    """
    rgb, _, _ = _decode(path, max_pixels, max_bytes, draft)
    return rgb


def image_info(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int | None = None) -> dict:
    """Header-only facts: width/height (after EXIF orientation), format, mode, frames, orientation, file_size.

    No pixels are decoded, so this is cheap; it raises the same ImageDecodeError reasons as ``load_image``
    for problems visible in the header (``empty``, ``not_an_image``, ``bomb``, ``corrupt``, ...).
    """
    data = _read_bytes(path, max_bytes)
    img = _open(data, path, max_pixels)
    try:
        w, h = img.size
        # PNG may keep EXIF after the pixel data; reading it would decode everything, so only use it here
        # when it was found in the header.
        orientation = 1 if img.format == "PNG" and "exif" not in img.info else _orientation(img)
        if orientation in (5, 6, 7, 8):
            w, h = h, w
        frames = int(getattr(img, "n_frames", 1) or 1)
        return {
            "width": w,
            "height": h,
            "format": img.format,
            "mode": img.mode,
            "frames": frames,
            "orientation": orientation,
            "file_size": len(data),
        }
    except ImageDecodeError:
        raise
    except Exception as e:  # noqa: BLE001
        raise _fail("corrupt", path, f"invalid header ({type(e).__name__}: {e})") from None
    finally:
        img.close()


def decode_for(
    path: str | Path,
    preprocess_fn: Callable,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    max_bytes: int | None = None,
    draft: int | None = None,
    with_hash: bool = False,
    data: bytes | None = None,
) -> tuple[np.ndarray, dict]:
    """Decode and preprocess one file for an encoder; top-level so worker processes can run it.

    Args:
        path: image file.
        preprocess_fn: RGB PIL image -> CHW float32 array (e.g. ``Encoder.preprocess``), or an HWC uint8
            crop to normalise later (``t2c.indexer.preprocess.crop_array``); pass a picklable callable when
            running in a process pool.
        max_pixels, max_bytes, draft: as in ``load_image``.
        with_hash: also return ``content_hash`` of the very bytes that were decoded (no second read).
        data: the file's bytes, already in memory (an upload): decoded with the same checks and reasons
            (``empty``, ``too_large``, ``not_an_image``, ``bomb``, ...); ``path`` then only names it in messages.

    Returns:
        ``(array, meta)``: the array (float32, or uint8 as ``preprocess_fn`` gave it) and
        ``{"width", "height"}`` of the original image after EXIF rotation (before preprocessing), plus
        ``format``, ``mode`` (the source mode), ``file_size`` and, when asked, ``content_hash``.

    Raises:
        ImageDecodeError: any ``REASONS`` tag; ``preprocess_failed`` when ``preprocess_fn`` raises an
        OSError/ValueError/MemoryError on this image (other exceptions are bugs and propagate).
    """
    rgb, meta, data = _decode(path, max_pixels, max_bytes, draft, data)
    if with_hash:
        meta["content_hash"] = bytes_hash(data)
    del data
    try:
        arr = preprocess_fn(rgb)
    except (OSError, ValueError, MemoryError) as e:
        raise _fail("preprocess_failed", path, f"preprocessing failed ({type(e).__name__}: {e})") from None
    arr = np.asarray(arr)
    return np.ascontiguousarray(arr, dtype=np.uint8 if arr.dtype == np.uint8 else np.float32), meta


def try_decode_for(
    path: str | Path,
    preprocess_fn: Callable,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    max_bytes: int | None = None,
    draft: int | None = None,
    with_hash: bool = False,
) -> tuple[np.ndarray | None, dict]:
    """``decode_for`` that returns failures as values: ``(None, {"error": reason, "message": text})``.

    Convenient in process pools: nothing but plain data crosses the process boundary.
    """
    try:
        return decode_for(path, preprocess_fn, max_pixels, max_bytes=max_bytes, draft=draft, with_hash=with_hash)
    except ImageDecodeError as e:
        return None, {"error": e.reason, "message": e.message}
