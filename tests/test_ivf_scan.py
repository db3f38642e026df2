"""Range searches restricted to chosen IVF lists (``t2c.data.ivf_scan``), plain and fast-scan codes."""
from __future__ import annotations

import threading

import faiss
import numpy as np
import pytest

from t2c.data.ivf_scan import ListScanner

FACTORIES = ["IVF32,PQ16x4fsr", "IVF32,PQ16x4fs", "IVF32,PQ8np", "IVF32,Flat"]


def _data(n=6000, d=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32) + 2 * rng.normal(size=(20, d)).astype(np.float32)[rng.integers(0, 20, n)]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[:4] + 0.2 * rng.normal(size=(4, d)).astype(np.float32)
    return x, q / np.linalg.norm(q, axis=1, keepdims=True)


@pytest.fixture(scope="module", params=FACTORIES)
def index(request):
    x, q = _data()
    idx = faiss.index_factory(x.shape[1], request.param, faiss.METRIC_INNER_PRODUCT)
    idx.train(x)
    idx.add(x)
    return idx, x, q, request.param


def _members(ivf, lists):
    return np.sort(np.concatenate([faiss.rev_swig_ptr(ivf.invlists.get_ids(int(l)), ivf.invlists.list_size(int(l))).copy()
                                   for l in lists]))


def _sorted(ids, d):
    o = np.argsort(ids)
    return ids[o], d[o]


def test_every_list_gives_faiss_own_range_search(index):
    idx, _, q, factory = index
    ls = ListScanner(idx)
    assert ls.fast == ("x4fs" in factory)
    nlist = ls.ivf.nlist
    for qi in q:
        for radius in (0.5, 0.2, 0.0):
            got = _sorted(*ls.range_in_lists(qi, radius, np.arange(nlist)))
            _, D, I = idx.range_search(qi[None], radius, params=faiss.SearchParametersIVF(nprobe=nlist))
            want = _sorted(I.astype(np.int64), D)
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_allclose(got[1], want[1], atol=1e-5)
            assert (got[1] > radius).all()


def test_only_the_chosen_lists_are_scanned(index):
    idx, _, q, _ = index
    ls = ListScanner(idx)
    lists = np.array([3, 7, 30])
    ids, d = ls.range_in_lists(q[0], -1.5, lists)  # every member passes
    np.testing.assert_array_equal(np.sort(ids), _members(ls.ivf, lists))
    ids2, _ = ls.range_in_lists(q[0], 0.1, lists)
    assert set(ids2.tolist()) <= set(ids.tolist()) and set(ids2.tolist()) == set(ids[d > 0.1].tolist())
    assert len(ls.range_in_lists(q[0], 0.1, np.zeros(0, np.int64))[0]) == 0


def test_radius_outside_the_codes_score_range_is_not_wrapped():
    """FAISS's fast-scan range search holds the radius as a 16-bit integer: below the lowest code score it wraps
    and returns nothing (instead of every vector). The scanner returns every vector there, and none above the
    highest possible code score."""
    x, q = _data()
    idx = faiss.index_factory(x.shape[1], "IVF32,PQ16x4fsr", faiss.METRIC_INNER_PRODUCT)
    idx.train(x)
    idx.add(x)
    ls = ListScanner(idx)
    lists = np.arange(32)
    lo, hi = ls.score_bounds(q[:1], ls.centroids[lists] @ q[0])
    wrapped = idx.range_search(q[:1], lo - 1.0, params=faiss.SearchParametersIVF(nprobe=32))[2]
    ids, d = ls.range_in_lists(q[0], lo - 1.0, lists)
    assert len(ids) == len(x) > len(wrapped)  # (FAISS itself returned {len(wrapped)})
    np.testing.assert_array_equal(np.sort(ids), np.arange(len(x)))
    assert np.abs(d - x[ids] @ q[0]).max() < 0.5  # code scores, not placeholders
    assert len(ls.range_in_lists(q[0], hi + 0.01, lists)[0]) == 0


def test_threads_each_scan_with_their_own_shell():
    x, q = _data()
    idx = faiss.index_factory(x.shape[1], "IVF32,PQ16x4fsr", faiss.METRIC_INNER_PRODUCT)
    idx.train(x)
    idx.add(x)
    ls = ListScanner(idx)
    rng = np.random.default_rng(1)
    jobs = [(q[i % 4], float(r), np.sort(rng.choice(32, 8, replace=False))) for i, r in
            enumerate(rng.uniform(0.0, 0.4, 40))]
    want = [_sorted(*ls.range_in_lists(*j)) for j in jobs]
    got = [None] * len(jobs)

    def work(k):
        for i in range(k, len(jobs), 4):
            got[i] = _sorted(*ls.range_in_lists(*jobs[i]))

    ts = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
