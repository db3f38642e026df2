"""Index building: type chosen by size and budget, recall against exact search measured and reached."""
import numpy as np
import pytest

from t2c.data.errors import InvalidInput
from t2c.indexer.index_build import build_index, choose_index_type, exact_topk, set_search_params


def _clustered(n=20000, d=32, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(64, d))
    v = centres[rng.integers(0, 64, n)] + 0.5 * rng.normal(size=(n, d))
    v = v.astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_choice_by_size_and_budget():
    assert choose_index_type(1000, 512)["type"] == "flat"
    assert choose_index_type(1_000_000, 512)["type"] == "ivf_flat"
    pq = choose_index_type(10_000_000, 512, memory_budget=640_000_000)
    assert pq["type"] == "ivf_pq" and pq["factory"].endswith(f"PQ{pq['m']}np") and 512 % pq["m"] == 0


def test_exact_topk_matches_argsort():
    v = _clustered(3000)
    q = v[:7]
    want = np.argsort(-(q @ v.T), axis=1)[:, :5]
    np.testing.assert_array_equal(exact_topk(v, q, 5, block=700), want)


@pytest.mark.parametrize("budget", [None, 20000 * 8])
def test_approximate_indices_reach_target_recall(budget):
    v = _clustered()
    ids = np.arange(100, 100 + len(v), dtype=np.int64) * 3  # ids are catalog ids, not row numbers
    kw = {"memory_budget": budget} if budget else {}
    index, info = build_index(v, ids, exact_max=1000, **kw)
    assert info["type"] == ("ivf_pq" if budget else "ivf_flat")
    assert ("score_error" in info) == bool(budget)  # only quantised codes score with an error
    assert info["recall_at_10"] >= 0.95 and info["nprobe"] >= 1
    set_search_params(index, info)
    _, got = index.search(v[:5], 1)
    assert set(got[:, 0]) <= set(ids)


def test_flat_index_is_exact_and_keyed_by_ids():
    v = _clustered(500)
    ids = np.arange(500, dtype=np.int64) + 1000
    index, info = build_index(v, ids)
    assert info["type"] == "flat" and info["recall_at_10"] == 1.0
    _, got = index.search(v[:3], 1)
    assert list(got[:, 0]) == [1000, 1001, 1002]


def test_mismatched_shapes():
    with pytest.raises(InvalidInput):
        build_index(np.zeros((3, 4), np.float32), np.arange(2))


def test_hnsw_coarse_quantizer_for_many_lists(monkeypatch):
    import faiss

    import t2c.indexer.index_build as ib

    assert "_HNSW32" in choose_index_type(50_000_000, 512, memory_budget=64 * 50_000_000)["factory"]
    monkeypatch.setattr(ib, "HNSW_COARSE_MIN", 64)  # so that a small test set gets the large-set layout
    v = _clustered()
    ids = np.arange(len(v), dtype=np.int64) + 7
    index, info = build_index(v, ids, exact_max=1000, memory_budget=20000 * 8)
    assert info["factory"].startswith("IVF") and "_HNSW32,PQ" in info["factory"]
    assert info["recall_at_10"] >= 0.95
    again = faiss.deserialize_index(faiss.serialize_index(index))
    set_search_params(again, info)
    assert isinstance(faiss.downcast_index(faiss.extract_index_ivf(again).quantizer), faiss.IndexHNSWFlat)
    _, got = again.search(v[:3], 1)
    assert list(got[:, 0]) == list(ids[:3])
    lims, _, found = again.range_search(v[:2], 0.9)
    assert ids[0] in found[lims[0]:lims[1]]


def test_unreachable_recall_keeps_the_cheapest_setting_on_the_plateau():
    import faiss

    from t2c.indexer.index_build import PLATEAU, tune_nprobe

    v = _clustered()
    ids = np.arange(len(v), dtype=np.int64)
    index = faiss.index_factory(v.shape[1], "IVF256,PQ4np", faiss.METRIC_INNER_PRODUCT)
    index.train(v)
    index.add_with_ids(v, ids)
    info = tune_nprobe(index, v, ids, target_recall=1.01)  # unreachable: tuning must stop somewhere sensible
    assert info["target_reached"] is False
    assert info["rerank"] > 100  # a plateau deepened the exact re-ranking before probing more lists
    assert info["nprobe"] < 256  # ... and the full scan was not kept for no gain
    best = tune_nprobe(index, v, ids, target_recall=1.01, rerank=1600)
    assert info["recall_at_10"] >= best["recall_at_10"] - 2 * PLATEAU


def test_pq_score_error_bounds_what_quantisation_loses_in_range_search():
    """IVF-PQ records its inner-product error; a range search widened by it misses no exact match."""
    import faiss

    rng = np.random.default_rng(4)
    v = rng.normal(size=(20000, 64)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    ids = np.arange(len(v), dtype=np.int64)
    index, info = build_index(v, ids, exact_max=1000, memory_budget=16 * len(v))
    assert info["type"] == "ivf_pq" and 0 < info["score_error"] < 0.5
    q = v[:8] + rng.normal(scale=0.05, size=(8, 64)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    params = faiss.SearchParametersIVF(nprobe=faiss.extract_index_ivf(index).nlist)  # every list: codes only
    lost = {0.0: 0, info["score_error"]: 0}
    total = 0
    for qi in q:
        exact = v @ qi
        t = float(np.quantile(exact, 0.99))
        truth = set(np.nonzero(exact >= t)[0].tolist())
        total += len(truth)
        for margin in lost:
            lims, _, found = index.range_search(qi[None], t - margin, params=params)
            lost[margin] += len(truth - set(found[: lims[1]].tolist()))
    assert lost[0.0] > 0.02 * total  # the codes alone drop true matches near the threshold
    assert lost[info["score_error"]] <= 0.01 * total
