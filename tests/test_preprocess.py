"""Preprocessing: the table normalisation against the plain float computation."""
import numpy as np
import pytest
from PIL import Image

from t2c.indexer.preprocess import normalise, preprocess_image, resize_crop

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _reference(img, cfg):
    """The plain computation: the resized crop normalised pixel by pixel in float32."""
    arr = np.asarray(resize_crop(img, cfg), dtype=np.float32) * (1.0 / 255.0)
    arr = (arr - np.asarray(cfg["mean"], np.float32)) / np.asarray(cfg["std"], np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def _photo(rng, w, h):
    """Smooth content plus noise, so resampling differences show."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(xx / 17.0 + c) * np.cos(yy / 23.0 - c) for c in range(3)], -1) * 100 + 128
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))


def test_normalise_is_bit_for_bit_the_float_arithmetic():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    rgb[0, :3] = [[0, 0, 0], [255, 255, 255], [128, 1, 254]]
    want = ((rgb.astype(np.float32) * (1.0 / 255.0) - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32))
    got = normalise(rgb, MEAN, STD)
    assert got.dtype == np.float32 and got.shape == (3, 37, 53) and got.flags.c_contiguous
    assert np.array_equal(got, want.transpose(2, 0, 1))
    slot = np.full((2, 3, 37, 53), np.nan, np.float32)
    assert normalise(rgb, MEAN, STD, out=slot[1]) is not None
    assert np.array_equal(slot[1], got) and np.isnan(slot[0]).all()  # filled in place, nothing else touched


def test_worker_crops_normalised_later_equal_the_float_preprocessing(tmp_path):
    """Decode workers send uint8 crops; normalised where batched they are the encoder's own float32 input."""
    from t2c.data.images import load_image
    from t2c.indexer.feed import normalised
    from t2c.indexer.pipeline import decode_crop

    rng = np.random.default_rng(3)
    cfg = {"image_size": 32, "mean": MEAN, "std": STD, "resize_mode": "shorter", "crop_pct": 0.875,
           "max_pixels": 10**7}
    paths = []
    for i, (w, h) in enumerate([(90, 70), (64, 120)]):
        paths.append(tmp_path / f"{i}.jpg")
        _photo(rng, w, h).save(paths[-1], quality=92)
    crops = [decode_crop(str(p), cfg)[0] for p in paths]
    assert all(c.dtype == np.uint8 and c.shape == (32, 32, 3) for c in crops)
    batch = normalised(crops, cfg)
    for p, row in zip(paths, batch):
        assert np.array_equal(row, preprocess_image(load_image(str(p), draft=32), cfg))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    crop, result = decode_crop(str(bad), cfg)
    assert crop is None and not result.ok and result.reason


@pytest.mark.parametrize("crop_pct", [1.0, 0.875])
def test_preprocess_is_bit_for_bit_the_plain_computation(crop_pct):
    rng = np.random.default_rng(1)
    cfg = {"image_size": 224, "mean": MEAN, "std": STD, "crop_pct": crop_pct}
    for w, h in [(800, 600), (480, 799), (224, 224), (225, 300), (150, 100), (1000, 230), (331, 997)]:
        img = _photo(rng, w, h)
        got = preprocess_image(img, cfg)
        assert got.shape == (3, 224, 224) and got.dtype == np.float32
        assert np.array_equal(got, _reference(img, cfg))


def test_squash_and_exact_size_are_unchanged():
    rng = np.random.default_rng(2)
    for cfg, size in [({"image_size": 64, "mean": MEAN, "std": STD, "resize_mode": "squash"}, (90, 40)),
                      ({"image_size": 64, "mean": MEAN, "std": STD}, (64, 64)),
                      ({"image_size": 64, "mean": MEAN, "std": STD}, (64, 100))]:  # crop only, no resize
        img = _photo(rng, *size)
        assert np.array_equal(preprocess_image(img, cfg), _reference(img, cfg))


def test_other_modes_are_converted_to_rgb():
    img = Image.fromarray(np.full((50, 70), 200, np.uint8), "L")
    out = preprocess_image(img, {"image_size": 32, "mean": MEAN, "std": STD})
    assert out.shape == (3, 32, 32)
    assert np.allclose(out[:, 5, 5], (200 / 255 - np.asarray(MEAN)) / np.asarray(STD), atol=1e-5)


def test_resize_is_the_whole_image_then_the_centre_crop():
    """Pinned: the crop comes out of the whole resized image (PIL resamples a box in another pass order, and
    pixels then move by many grey levels)."""
    img = _photo(np.random.default_rng(3), 480, 799)
    got = resize_crop(img, {"image_size": 224, "mean": MEAN, "std": STD})  # 224 x 373, rows 74..297 kept
    want = img.resize((224, 373), Image.BICUBIC).crop((0, 74, 224, 298))
    assert np.array_equal(np.asarray(got), np.asarray(want))
