"""`t2c world ...` commands."""
from __future__ import annotations

import json

import pyarrow.parquet as pq
import typer
from typer.testing import CliRunner

from t2c.data.errors import T2CError
from t2c.service.cli_world import register


def _app() -> typer.Typer:
    app = typer.Typer()
    register(app)

    @app.callback()
    def _root() -> None:  # keeps `world` a sub-command
        pass

    return app


def test_world_generate(tmp_path):
    out = tmp_path / "w"
    r = CliRunner().invoke(_app(), ["world", "generate", str(out), "--n", "12", "--seed", "4", "--size", "40",
                                    "--quiet", "--weights", "color.red=0", "--weights", "background.teal=0",
                                    "background.gray=0"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output.strip().splitlines()[-1])
    rows = pq.read_table(info["labels"]).to_pylist()
    assert len(rows) == 12
    assert all(r_["background"] in ("black", "striped") for r_ in rows)
    assert all(o["color"] != "red" for r_ in rows for o in r_["objects"])


def test_world_generate_bad_weight_is_a_typed_error(tmp_path):
    r = CliRunner().invoke(_app(), ["world", "generate", str(tmp_path / "w"), "--n", "2", "--weights", "color.mauve=2"])
    assert r.exit_code != 0
    assert isinstance(r.exception, T2CError) and "mauve" in str(r.exception)


def test_world_models_lists_encoders():
    r = CliRunner().invoke(_app(), ["world", "models"])
    assert r.exit_code == 0
    assert {"clip", "pairnet", "autoenc"} <= set(json.loads(r.output))
