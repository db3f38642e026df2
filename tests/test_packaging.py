"""The wheel installs under one import name (``t2c``) and lives beside a project with its own ``data``/``service``."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(REPO)], check=True, capture_output=True, text=True)
    (whl,) = out.glob("text2concept-*.whl")
    return whl


def test_wheel_installs_only_t2c_at_the_top(wheel):
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    dist_info = {t for t in tops if t.endswith(".dist-info")}
    assert tops - dist_info == {"t2c"}
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "t2c/py.typed" in names and "t2c/service/static/index.html" in names
    assert any(n.startswith("t2c/indexer/world/weights/") and n.endswith(".safetensors") for n in names)


def test_wheel_beside_a_project_with_its_own_data_and_service(wheel, tmp_path):
    """A fresh venv (deps borrowed from this one) gets the wheel; the user's own ``data``/``service`` still import."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    deps = [p for p in sys.path if p.endswith("site-packages")]
    Path(site, "zz_deps.pth").write_text("\n".join(deps) + "\n")  # torch & co. (and pip) without a second copy
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, capture_output=True)
    proj = tmp_path / "proj"
    for pkg, val in (("data", "mine-data"), ("service", "mine-service")):
        (proj / pkg).mkdir(parents=True)
        (proj / pkg / "__init__.py").write_text(f"WHO = {val!r}\n")
    code = ("import data, service, t2c, t2c.data.store, t2c.query.parse, t2c.service.cli\n"
            "assert data.WHO == 'mine-data' and service.WHO == 'mine-service'\n"
            f"assert t2c.data.store.__file__.startswith({site!r}), t2c.data.store.__file__\n"
            "print(t2c.query.parse.parse('red AND NOT circle'))\n")
    r = subprocess.run([str(py), "-c", code], cwd=proj, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "red" in r.stdout
    r = subprocess.run([str(venv / "bin" / "t2c"), "--help"], cwd=proj, capture_output=True, text=True)
    assert r.returncode == 0 and "encoders" in r.stdout, r.stderr


def test_library_never_imports_the_old_top_level_names():
    """Every t2c module imports as t2c.*; nothing reaches for a top-level ``data``/``query``/... by accident."""
    code = ("import importlib, pkgutil, sys\n"
            "for top in ('t2c', 't2c.data', 't2c.indexer', 't2c.query', 't2c.service'):\n"
            "    pkg = importlib.import_module(top)\n"
            "    for m in pkgutil.walk_packages(pkg.__path__, top + '.'):\n"
            "        importlib.import_module(m.name)\n"
            "bad = sorted(n for n in sys.modules if n.split('.')[0] in {'data', 'indexer', 'query', 'service'})\n"
            "print(len([n for n in sys.modules if n.startswith('t2c.')]), bad)\n"
            "sys.exit(1 if bad else 0)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
