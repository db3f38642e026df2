"""Query by example (like:ID / like:"file"), the duplicate audit, and their CLI and HTTP edges."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from t2c.data.errors import ImageDecodeError, InvalidInput, NotFound, QuerySyntaxError
from t2c.data.store import open_store
from t2c.indexer.pipeline import index_folder
from t2c.query import ast as qa
from t2c.query.calibrate import calibrate
from t2c.query.engine import Engine
from t2c.query.parse import format as fmt
from t2c.query.parse import parse

CLIP = "python:tests.tiny_encoders:tiny_clip"


def _scene(rng, size=(56, 48)) -> Image.Image:
    """A textured image with a few coloured blocks (distinct per call)."""
    arr = np.clip(rng.integers(0, 256, 3) + rng.normal(0, 30, (size[1], size[0], 3)), 0, 255)
    for _ in range(3):
        x, y = rng.integers(0, size[0] - 12), rng.integers(0, size[1] - 12)
        arr[y:y + 12, x:x + 12] = rng.integers(0, 256, 3)
    return Image.fromarray(arr.astype(np.uint8))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """40 distinct scenes plus planted copies of scenes 0-3: exact, resized, mirrored, re-encoded."""
    root = tmp_path_factory.mktemp("examples")
    rng = np.random.default_rng(0)
    imgs = root / "imgs"
    imgs.mkdir()
    scenes = [_scene(rng) for _ in range(40)]
    for i, im in enumerate(scenes):
        im.save(imgs / f"s{i:03d}.png")
    (imgs / "s000-copy.png").write_bytes((imgs / "s000.png").read_bytes())
    scenes[1].resize((112, 96), Image.BICUBIC).save(imgs / "s001-resized.png")
    ImageOps.mirror(scenes[2]).save(imgs / "s002-flipped.png")
    scenes[3].save(imgs / "s003-reencoded.jpg", quality=92)
    index_folder(imgs, root / "st", CLIP, workers=0)
    return root


def _id_of(snap, name: str) -> int:
    return int(snap.catalog().execute("SELECT id FROM images WHERE path LIKE ?", [f"%/{name}"]).fetchone()[0])


# ------------------------------------------------------------------------------------------ the language
def test_like_leaves_parse_format_and_json_round_trip():
    t = parse('2*like:812@0.9 AND NOT red AND n_objects=1 OR like:"a b\\".jpg"')
    ex = qa.examples(t)
    assert ex == [qa.Example(812, 2.0, 0.9), qa.Example('a b".jpg')]
    assert parse(fmt(t)) == t and qa.from_json(qa.to_json(t)) == t
    assert parse("like:cat.jpg") == qa.Example("cat.jpg") and parse("like:7") == qa.Example(7)
    assert qa.Example(7).text == "like:7" and qa.Example(7).key == ("example", "like:7")
    assert qa.Concept("like:7").key != qa.Example(7).key  # a quoted concept never meets an example
    assert parse("like>3") == qa.Filter("like", ">", 3)  # only like: starts an example
    for bad in ("like:", 'like:""', "like:3@2", "2*like:"):
        with pytest.raises(QuerySyntaxError):
            parse(bad)
    for bad in (-1, True, "", "a\x00b", 1.5):
        with pytest.raises(InvalidInput):
            qa.Example(bad)
    with pytest.raises(InvalidInput, match=r"\$\.ref"):
        qa.from_json({"type": "example", "ref": -3})


# ------------------------------------------------------------------------------------------ the engine
def test_like_id_answers_match_brute_force_and_mix_with_everything(world):
    snap = open_store(world / "st")
    eng = Engine(snap, exact_rows=0)
    a = _id_of(snap, "s005.png")
    for q in (f"like:{a}", f"like:{a} AND NOT red", f"2*like:{a} AND like:{a + 1}", f"like:{a} OR width>=100",
              f"like:{a} AND width<100"):
        res = eng.search(q, k=100)
        assert sorted(res.all_ids.tolist()) == eng.reference_answer(q).tolist(), q
    res = eng.search(f"like:{a}", k=3, explain=True)
    assert res.hits[0].id == a  # the example is its own best match
    e = res.hits[0].explanation[0]
    assert e["concept"] == f"like:{a}" and e["score"] == pytest.approx(1.0, abs=1e-5)
    # the threshold is calibrated on the collection's similarities to the example, like a concept's
    sims = np.asarray(snap.vectors) @ np.asarray(snap.vectors[snap.rows_of([a])[0]])
    assert e["threshold"] == pytest.approx(calibrate(sims).for_search().threshold, abs=1e-6)
    assert e["method"] == calibrate(sims).for_search().method


def test_like_file_embeds_the_store_way_and_bad_files_have_reasons(world, tmp_path):
    snap = open_store(world / "st")
    eng = Engine(snap)
    a = _id_of(snap, "s007.png")
    by_id = eng.search(f"like:{a}", k=10)
    by_file = eng.search(f'like:"{world / "imgs" / "s007.png"}"', k=10)
    assert [h.id for h in by_file.hits] == [h.id for h in by_id.hits] and by_file.total == by_id.total
    assert eng.examples.vector_of(str(world / "imgs" / "s007.png")) == pytest.approx(
        np.asarray(snap.vectors[snap.rows_of([a])[0]]), abs=1e-5)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 20)
    with pytest.raises(ImageDecodeError) as ei:
        eng.search(f'like:"{tmp_path / "bad.png"}"')
    assert ei.value.reason in ("corrupt", "truncated")
    with pytest.raises(ImageDecodeError) as ei:
        eng.search(f'like:"{tmp_path / "none.png"}"')
    assert ei.value.reason == "not_found"
    with pytest.raises(NotFound, match="99999"):
        eng.search("like:99999")


def test_uploads_are_refused_files_on_a_server_bank(world):
    from t2c.query.examples import ExampleBank

    snap = open_store(world / "st")
    bank = ExampleBank(snap, allow_files=False)
    eng = Engine(snap, examples=bank)
    with pytest.raises(InvalidInput, match="upload"):
        eng.search(f'like:"{world / "imgs" / "s007.png"}"')
    ref = bank.add_upload((world / "imgs" / "s007.png").read_bytes(), "s007.png")
    assert ref.startswith("sha256:")
    assert eng.search(f'like:"{ref}"', k=1).hits[0].id == _id_of(snap, "s007.png")
    with pytest.raises(NotFound, match="upload the image again"):
        eng.search('like:"sha256:00"')
    with pytest.raises(ImageDecodeError) as ei:
        bank.add_upload(b"GIF89a" + b"\x00" * 5)
    assert ei.value.reason in ("corrupt", "truncated")


# ------------------------------------------------------------------------------------------ duplicates
def test_duplicate_pairs_match_brute_force_on_seeded_vectors():
    from t2c.query.duplicates import _audit_index, duplicate_pairs

    rng = np.random.default_rng(1)
    V = rng.standard_normal((3000, 16)).astype(np.float32)
    V[2900:] = V[:100] + 0.05 * rng.standard_normal((100, 16)).astype(np.float32)
    V /= np.linalg.norm(V, axis=1, keepdims=True)
    S = V @ V.T
    np.fill_diagonal(S, -2)
    thr = 0.95
    want = {(int(i), int(j)) for i, j in zip(*np.nonzero(np.triu(S >= thr)))}
    P, sims = duplicate_pairs(V, thr)
    assert set(map(tuple, P.tolist())) == want
    assert np.allclose(sims, S[P[:, 0], P[:, 1]], atol=1e-5)
    index, nprobe = _audit_index(V)
    assert nprobe is None  # small: an exact (flat) range search


def test_find_duplicates_groups_planted_copies_only(world):
    from t2c.query.duplicates import find_duplicates

    snap = open_store(world / "st")
    rep = find_duplicates(snap)
    names = [sorted(Path(p).name for p in g["paths"]) for g in rep.groups]
    # the tiny test encoder is not mirror-invariant, so the mirrored copy never becomes a candidate here
    assert sorted(names) == [["s000-copy.png", "s000.png"], ["s001-resized.png", "s001.png"],
                             ["s003-reencoded.jpg", "s003.png"]]
    kinds = {tuple(n): g["kind"] for n, g in zip(names, rep.groups)}
    assert kinds[("s000-copy.png", "s000.png")] == "exact" and kinds[("s001-resized.png", "s001.png")] == "near"
    d = rep.to_dict()
    assert d["n_duplicates"] == 3 and d["verified"] and d["candidate_pairs"] >= 3 and d["method"].startswith("nn_")
    # a mirrored pair that is a candidate passes the pixel check; two distinct scenes do not
    from t2c.query.duplicates import MATCH_CORRELATION, PixelVerifier

    pv = PixelVerifier(dict(snap.catalog().execute("SELECT id, path FROM images").fetchall()))
    assert pv.score(_id_of(snap, "s002.png"), _id_of(snap, "s002-flipped.png")) >= MATCH_CORRELATION
    assert pv.score(_id_of(snap, "s004.png"), _id_of(snap, "s005.png")) < MATCH_CORRELATION


def test_cli_query_image_and_audit_duplicates(world, tmp_path, capsys):
    from t2c.service.cli import main

    def run(*args):
        with pytest.raises(SystemExit) as ei:
            main([str(a) for a in args])
        return ei.value.code, capsys.readouterr()

    main_ok = ["query", world / "st", "--image", world / "imgs" / "s009.png", "-k", 2, "--json", "--explain"]
    try:
        main([str(a) for a in main_ok])
    except SystemExit as e:
        assert not e.code
    hits = json.loads(capsys.readouterr().out)["hits"]  # --json --explain prints the whole answer
    assert Path(hits[0]["path"]).name == "s009.png" and hits[0]["explanation"][0]["concept"].startswith("like:")
    code, out = run("query", world / "st", "--image", tmp_path / "missing.png")
    assert code == 2 and "no such file" in out.err and "Traceback" not in out.err
    code, out = run("query", world / "st")
    assert code == 2 and "--image" in out.err
    try:
        main(["audit", str(world / "st"), "--duplicates", "--json", "--html", str(tmp_path / "d.html")])
    except SystemExit as e:
        assert not e.code
    d = json.loads(capsys.readouterr().out)
    assert d["n_groups"] == 3
    html = (tmp_path / "d.html").read_text()
    assert html.count('class="group"') == 3 and html.count("data:image/png;base64") == 6
