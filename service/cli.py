"""The `t2c` command line: a thin edge over the library. Typed errors become a message and exit code 2."""
from __future__ import annotations

import importlib
import os
import sys

import typer

from t2c import T2CError

app = typer.Typer(
    name="t2c",
    help="text2concept: search and audit image collections in words, with any vision encoder.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Each module owns one area and exposes register(app). Listed here so the command set is explicit.
COMMAND_MODULES = [
    "t2c.service.cli_index",
    "t2c.service.cli_world",
    "t2c.service.cli_demo",
    "t2c.service.cli_serve",
    "t2c.service.cli_query",
    "t2c.service.cli_audit",
]


def _register_all() -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(app)


def fail(err: T2CError) -> None:
    """Print a typed error for a person and exit non-zero."""
    typer.secho(f"error: {err.message}", fg=typer.colors.RED, err=True)
    if err.hint:
        typer.echo(f"hint: {err.hint}", err=True)
    raise SystemExit(err.exit_code)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `t2c` console script."""
    if "T2C_CACHE_DIR" not in os.environ:  # concept vectors cached per user: repeated queries skip the text tower
        from t2c.query.concepts import user_cache_dir

        os.environ["T2C_CACHE_DIR"] = str(user_cache_dir())
    _register_all()
    try:
        app(args=argv, standalone_mode=True)
    except T2CError as err:
        fail(err)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


def cli() -> None:
    """The ``t2c`` console script and ``python -m t2c``: :func:`main`, then the process ends at once.

    Once torch is loaded, tearing the interpreter down (freeing every module, a last garbage collection) takes a
    second or more after the command is done. Everything a command writes is closed and synced before it
    returns, so the process runs the atexit handlers, flushes its standard streams and exits with the command's
    status without that teardown. In-process callers use :func:`main`, which returns (or raises SystemExit).
    """
    code: int | str | None = 0
    try:
        main()
    except SystemExit as e:
        code = e.code
    if "torch" not in sys.modules:  # nothing slow to tear down: the usual exit
        sys.exit(code)
    import atexit

    atexit._run_exitfuncs()
    if isinstance(code, str):  # sys.exit("message") prints it and exits 1
        print(code, file=sys.stderr)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(int(code or 0))


if __name__ == "__main__":
    cli()
