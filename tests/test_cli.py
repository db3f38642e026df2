"""The `t2c` CLI edge: typed errors become a message and exit code 2; commands work end to end."""
import json
import re
import subprocess
import sys

import pytest

from t2c.service.cli import main
from tests.test_pipeline import CLIP, CNN, REPO, make_images


def t2c(*args):
    """Run the real console entry point in a subprocess (no disk cache); returns (code, stdout, stderr)."""
    env = {"PYTHONPATH": REPO, "PATH": "/usr/bin:/bin", "T2C_CACHE_DIR": ""}
    p = subprocess.run([sys.executable, "-m", "t2c.service.cli", *map(str, args)], cwd=REPO, capture_output=True,
                       text=True, env=env, timeout=300)
    return p.returncode, p.stdout, p.stderr


def test_cli_caches_concept_vectors_per_user_so_repeated_queries_skip_the_text_tower(tmp_path):
    """Without T2C_CACHE_DIR the CLI caches under $XDG_CACHE_HOME/t2c; a cached query never imports torch."""
    make_images(tmp_path / "imgs", 20)
    code, _, err = t2c("index", tmp_path / "imgs", "--store", tmp_path / "st", "-e", CLIP, "--workers", 0)
    assert code == 0, err
    env = {"PYTHONPATH": REPO, "PATH": "/usr/bin:/bin", "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    probe = ("import sys; from t2c.service.cli import main\n"
             "try:\n    main(['query', sys.argv[1], 'red@-1', '-k', '3', '--json'])\n"
             "except SystemExit as e:\n    assert not e.code, e.code\n"
             "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)")
    runs = [subprocess.run([sys.executable, "-c", probe, str(tmp_path / "st")], cwd=REPO, capture_output=True,
                           text=True, env=env, timeout=300) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr + runs[1].stderr
    assert "TORCH" in runs[0].stderr.split() and "NO-TORCH" in runs[1].stderr.split()
    assert json.loads(runs[0].stdout) == json.loads(runs[1].stdout)
    assert list((tmp_path / "xdg" / "t2c" / "concepts").rglob("*.npy"))


def test_encoders_json_lists_world_models_and_sources():
    code, out, _ = t2c("encoders", "--json")
    assert code == 0
    rows = json.loads(out)
    specs = {r["spec"] for r in rows}
    assert "world:clip" in specs and "timm:NAME" in specs and "open_clip:NAME" in specs
    clip = next(r for r in rows if r["spec"] == "world:clip")
    assert clip["has_text"] is True and clip["dim"] > 0
    code, out, _ = t2c("encoders")  # the text listing also names the feature options
    assert code == 0 and "features=stages" in out and "features=probs" in out


@pytest.mark.parametrize("args,needle", [
    (["index", "/nonexistent/folder", "--store", "/tmp/x", "-e", "world:clip"], "does not exist"),
    (["index", REPO + "/README.md", "--store", "/tmp/x", "-e", "world:clip"], "not a folder"),
    (["info", "/nonexistent/store"], "does not exist"),
    (["align", "-e", "nosuch:thing", "--images", REPO, "--out", "/tmp/a.safetensors"], "valid encoder sources"),
    (["query", "/nonexistent/store", "red"], "does not exist"),
])
def test_bad_input_gives_message_and_exit_2(args, needle):
    code, out, err = t2c(*args)
    assert code == 2, (out, err)
    assert needle in err and "Traceback" not in err


def test_index_info_query_realign_cycle(tmp_path):
    make_images(tmp_path / "imgs", 40)
    code, out, err = t2c("index", tmp_path / "imgs", "--store", tmp_path / "st", "-e", CNN, "--fit-aligner", 40,
                         "--clip", CLIP, "--workers", 0, "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["added"] == 40 and rep["aligner_r2"] is not None
    code, out, _ = t2c("info", tmp_path / "st", "--json")
    info = json.loads(out)
    assert info["counts"]["images"] == 40 and info["encoder"].startswith("python:tests.tiny_encoders:tiny_cnn")
    code, out, err = t2c("query", tmp_path / "st", "red@-1", "-k", 5, "--json")
    assert code == 0, err
    hits = json.loads(out)
    assert len(hits) == 5 and {"id", "path", "score"} <= set(hits[0])
    code, out, err = t2c("query", tmp_path / "st", "red", "-k", 3, "--explain", "--json")
    assert code == 0, err
    ans = json.loads(out)  # --explain --json: the whole answer, with the estimate beside the hits
    assert {"total", "estimate", "hits"} <= set(ans) and "red" in ans["estimate"]["concepts"]
    code, out, err = t2c("query", tmp_path / "st", "red", "-k", 3, "--explain")
    assert code == 0 and "estimated precision" in out, err
    assert "mean cosine to 80 reference words" in out  # the tiny CLIP has no cut of its own: centred scores
    assert ans["plan"]["centred_on"] == 80
    code, out, err = t2c("align", "-e", CNN, "--clip", CLIP, "--images", tmp_path / "imgs", "--max-images", 30,
                         "--out", tmp_path / "al.safetensors", "--json")
    assert code == 0, err
    assert json.loads(out)["n_train"] + json.loads(out)["n_heldout"] == 30
    code, out, err = t2c("realign", tmp_path / "st", "--aligner", tmp_path / "al.safetensors")
    assert code == 0 and "re-projected 40 images" in out, err


def test_main_translates_errors_in_process(capsys):
    with pytest.raises(SystemExit) as ei:
        main(["info", "/nonexistent/store"])
    assert ei.value.code == 2
    assert "hint:" in capsys.readouterr().err


def test_demo_store_names_are_shell_safe():
    from t2c.service.cli_demo import DEMO_ENCODERS, store_name

    assert store_name("world:clip") == "store-world-clip"
    assert store_name("world:pairnet?features=stages") == "store-world-pairnet-features-stages"
    names = [store_name(e) for e in DEMO_ENCODERS]
    assert len(set(names)) == len(names) and all(re.fullmatch(r"[A-Za-z0-9._-]+", n) for n in names)
