"""Arrow arrays built from buffers (data.arrow_build): equal to pyarrow's own, and the indexer's start-up path
never imports pandas (0.2 s of pyarrow's first ``pa.array``)."""
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from t2c.data.arrow_build import column, infer_type, strings, values

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("vals,typ", [
    (["a", "", "é/ü.jpg", "x" * 300], pa.string()),
    (["a", "bc"], pa.large_string()),
    ([], pa.string()),
    ([], pa.large_string()),
    ([True, False, True, True, False, False, True, False, True], pa.bool_()),
    ([], pa.bool_()),
    ([1, -2, 2**62], pa.int64()),
    ([], pa.int64()),
    ([1, 2, 255], pa.uint8()),
    ([3, -4], pa.int32()),
    ([0.5, -1.25], pa.float32()),
    ([1, 2.5], pa.float64()),
    (np.arange(5, dtype=np.int32), pa.int64()),
    (["a", None], pa.string()),
    ([1, None], pa.int64()),
])
def test_column_equals_pyarrows_array(vals, typ):
    got = column(vals, typ)
    assert got.type == typ
    assert got.equals(pa.array(vals, typ))


@pytest.mark.parametrize("vals", [["a", "b"], [1, 2], [1.5, 2.0], [True, False], [np.int64(3), 4],
                                  [1, 2.5], [None, 1], [[1], [2]], [b"x"]])
def test_inferred_column_equals_pyarrows_inference(vals):
    assert column(vals).equals(pa.array(vals))


def test_numpy_scalars_are_inferred_as_their_python_kind():
    assert column([np.float32(1.5), 2.0]).type == pa.float64() and column([np.int32(3)]).type == pa.int64()
    assert column([np.float32(1.5)]).to_pylist() == [1.5]


def test_infer_type_takes_one_kind_of_scalar_only():
    assert infer_type(["a"]) == pa.string() and infer_type([True]) == pa.bool_() and infer_type([1, 2]) == pa.int64()
    assert infer_type([1, 2.0]) is None and infer_type([]) is None and infer_type([None]) is None


def test_values_that_do_not_fit_raise():
    with pytest.raises(OverflowError):
        column([256], pa.uint8())
    with pytest.raises(OverflowError):
        column([-1], pa.uint64())
    with pytest.raises((TypeError, pa.ArrowInvalid)):
        column(["a", 1], pa.string())


def test_values_is_a_view_equal_to_to_numpy_including_slices():
    a = pa.array(np.arange(10, dtype=np.int64))
    for arr in (a, a.slice(3, 4), pa.array([0.5, 1.5, 2.5], pa.float32()).slice(1)):
        np.testing.assert_array_equal(values(arr), arr.to_numpy())
    np.testing.assert_array_equal(values(pa.array([1, None], pa.int64())), np.array([1, np.nan]))
    assert strings(["a", "b"]).to_pylist() == ["a", "b"]


def test_indexing_and_reindexing_a_folder_never_imports_pandas(tmp_path):
    """Planning, the work list, catalog lookups, the commit and a second run with a change and a removal."""
    code = (
        "import sys\nfrom pathlib import Path\n"
        "from tests.test_pipeline import make_images, run\n"
        f"imgs, st = Path({str(tmp_path / 'imgs')!r}), Path({str(tmp_path / 'st')!r})\n"
        "make_images(imgs, 6)\nrun(imgs, st)\n"
        "(imgs / 'd0' / 'img0000.png').unlink()\nmake_images(imgs, 2, seed=1, start=10)\n"
        "rep = run(imgs, st)\n"
        "print(rep.added, rep.removed, 'pandas' in sys.modules)\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": REPO})
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["2", "1", "False"]
