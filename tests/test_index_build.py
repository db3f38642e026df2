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
    assert pq["type"] == "ivf_pq" and pq["factory"].endswith(f"PQ{2 * pq['m']}x4fsr") and 512 % (2 * pq["m"]) == 0


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


def _f16_map(tmp_path, v):
    path = tmp_path / "v16.npy"
    np.save(path, v.astype(np.float16))
    return np.load(path, mmap_mode="r")


@pytest.mark.parametrize("id_offset", [0, 1000])
def test_refine_from_float16_map_is_the_exact_topk_of_the_candidates(tmp_path, id_offset):
    """Refinement from a memory-mapped float16 file returns the exact top-k (of the stored float16 values)
    among the candidates, in order, whatever order and duplicates the candidates come in."""
    from t2c.indexer.index_build import advise_random, refine_topk

    v = _clustered(5000, d=64, seed=3)
    v16 = _f16_map(tmp_path, v)
    assert advise_random(v16) and not advise_random(v)
    ids = np.arange(len(v), dtype=np.int64) * (3 if id_offset else 1) + id_offset
    rng = np.random.default_rng(1)
    q = v[:6] + rng.normal(scale=0.05, size=(6, 64)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    rows = np.stack([rng.permutation(len(v))[:1500] for _ in q])
    cand = ids[rows]
    cand[:, -100:] = cand[:, :100]  # duplicates
    cand[0, :50] = -1  # FAISS pads short lists with -1
    got, sc = refine_topk(v16, ids, q, cand, 10)
    exact = np.asarray(v16, np.float32)
    for j in range(len(q)):
        r = np.unique(rows[j][rows[j] >= 0] if j else rows[j][50:])
        s = exact[r] @ q[j]
        want = r[np.argsort(-s, kind="stable")[:10]]
        np.testing.assert_array_equal(got[j], ids[want])
        np.testing.assert_allclose(sc[j], np.sort(s)[::-1][:10], rtol=1e-5, atol=1e-6)
    # float32 rows in RAM give the same answer
    np.testing.assert_array_equal(refine_topk(exact, ids, q, cand, 10)[0], got)
    # fewer candidates than k: padded with -1
    short, ssc = refine_topk(v16, ids, q[:1], cand[:1, 60:63], 5)
    assert (short[0, 3:] == -1).all() and np.isneginf(ssc[0, 3:]).all() and set(short[0, :3]) == set(cand[0, 60:63])


def test_deep_refinement_from_float16_reaches_the_exact_answer(tmp_path):
    """A PQ index whose codes alone lose neighbours: re-ranking every probed candidate from the float16 map
    gives the exact top-10 (those candidates include the true neighbours: every list is probed)."""
    import faiss

    from t2c.indexer.index_build import MAX_RERANK, search_reranked

    assert MAX_RERANK >= 8192
    v = _clustered(6000, d=64, seed=2)
    ids = np.arange(len(v), dtype=np.int64)
    index = faiss.index_factory(64, "IVF16,PQ8np", faiss.METRIC_INNER_PRODUCT)
    index.train(v)
    index.add_with_ids(v, ids)
    v16 = _f16_map(tmp_path, v)
    q = v[:20]
    truth = exact_topk(np.asarray(v16, np.float32), q, 10)
    params = faiss.SearchParametersIVF(nprobe=16)
    codes_only = index.search(q, 10, params=params)[1]
    assert np.mean([len(set(a) & set(b)) for a, b in zip(codes_only, truth)]) < 9  # the codes lose some
    got = search_reranked(index, v16, ids, q, 10, len(v), params=params)
    np.testing.assert_array_equal(got, ids[truth])


def test_build_index_from_float16_memory_map_with_explicit_factory(tmp_path):
    """build_index reads float16 memory maps block by block (never whole) and accepts a factory string."""
    v = _clustered(20000, d=32)
    v16 = _f16_map(tmp_path, v)
    ids = np.arange(len(v), dtype=np.int64)
    index, info = build_index(v16, ids, exact_max=0, factory="IVF64,PQ8np", refine_vectors=v16)
    assert info["type"] == "ivf_pq" and info["nlist"] == 64 and info["m"] == 8
    assert info["recall_at_10"] >= 0.95 and info["tried"][-1][2] == pytest.approx(info["recall_at_10"], abs=0.01)
    with pytest.raises(InvalidInput):
        build_index(v16, ids, factory="HNSW32")


def test_hnsw_coarse_quantizer_searches_as_deep_as_nprobe():
    """An HNSW coarse quantizer left at its build-time efSearch (16) finds neither the right lists nor all
    of them when asked for many more; ivf_params / set_search_params make it search deep enough, so probing
    every list really probes every list (search and range search)."""
    import faiss

    from t2c.indexer.index_build import ivf_params, quantizer_params

    rng = np.random.default_rng(0)
    v = rng.normal(size=(20000, 32)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    ids = np.arange(len(v), dtype=np.int64)
    index = faiss.index_factory(32, "IVF512_HNSW32,Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(v)
    index.add_with_ids(v, ids)
    q = v[:20]
    assert quantizer_params(index, 512).efSearch >= 1024
    plain = index.range_search(q, -2.0, params=faiss.SearchParametersIVF(nprobe=512))[0][-1]
    deep = index.range_search(q, -2.0, params=ivf_params(index, 512))[0][-1]
    assert plain < 0.9 * len(q) * len(v) and deep == len(q) * len(v)  # every vector of every list
    _, got = index.search(q, 10, params=ivf_params(index, 512))
    np.testing.assert_array_equal(got, exact_topk(v, q, 10))
    set_search_params(index, {"nprobe": 512})
    np.testing.assert_array_equal(index.search(q, 10)[1], got)
    flat = faiss.index_factory(32, "IVF16,Flat", faiss.METRIC_INNER_PRODUCT)
    assert quantizer_params(flat, 8) is None


def _lists(index, n):
    import faiss

    ivf = faiss.extract_index_ivf(index)
    out = np.full(n, -1)
    for l in range(ivf.nlist):
        sz = ivf.invlists.list_size(l)
        if sz:
            out[faiss.rev_swig_ptr(ivf.invlists.get_ids(l), sz).copy()] = l
    return out, ivf.quantizer.reconstruct_n(0, ivf.nlist)


def test_hnsw_assignments_far_from_the_true_list_are_redone_exactly(monkeypatch):
    """An HNSW coarse quantizer searched shallowly puts some vectors into far lists; the build checks the
    vectors farthest from their list exactly, so none is left far from its nearest list."""
    import faiss

    import t2c.indexer.index_build as ib

    monkeypatch.setattr(ib, "ASSIGN_EF", 1)
    v = _clustered(30000, d=32, seed=3)
    for factory in ("IVF256_HNSW32,PQ16x4fsr", "IVF256_HNSW32,PQ8np"):
        index, info = build_index(v, np.arange(len(v)), exact_max=1000, factory=factory)
        lists, cents = _lists(index, len(v))
        s = v @ cents.T
        gap = s.max(1) - s[np.arange(len(v)), lists]
        # the check found work to do: the shallow graph's own choice leaves far placements
        q = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer)
        q.hnsw.efSearch = 1
        own = q.search(v, 1)[1][:, 0]
        assert (s.max(1) - s[np.arange(len(v)), own] > 0.1).sum() > 0 and info["reassigned"] > 0
        assert (gap > 0.1).sum() == 0, factory


def test_fast_scan_codes_are_built_converted_and_searched():
    """``PQ{M}x4fsr`` / ``x4fs``: 4-bit codes written by a plain IVF-PQ index, then converted to fast-scan (on
    the residual or not); searches and (de)serialisation work, and OPQ in front is refused."""
    import faiss

    v = _clustered()
    ids = np.arange(len(v), dtype=np.int64) + 3
    for factory, residual in (("IVF64,PQ16x4fsr", True), ("IVF64,PQ16x4fs", False)):
        index, info = build_index(v, ids, exact_max=1000, factory=factory)
        fs = faiss.downcast_index(index)
        assert isinstance(fs, faiss.IndexIVFPQFastScan) and fs.by_residual == residual and fs.ntotal == len(v)
        assert info["m"] == 8 and info["score_error"] > 0 and info["recall_at_10"] >= 0.95
        again = faiss.deserialize_index(faiss.serialize_index(index))
        set_search_params(again, info)
        set_search_params(index, info)
        _, i0 = index.search(v[:20], 10)
        _, i1 = again.search(v[:20], 10)
        np.testing.assert_array_equal(i0, i1)
        # codes alone put most vectors among their own top 10 (tuning's recall above re-ranks exactly)
        assert np.mean([i in row for i, row in zip(ids[:20], i1.tolist())]) >= 0.7
    with pytest.raises(InvalidInput, match="OPQ"):
        build_index(v, ids, exact_max=1000, factory="OPQ16,IVF64,PQ16x4fsr")
