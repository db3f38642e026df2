"""CLI: `t2c serve STORE` runs the web service (FastAPI + the web page)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer


def resolve_api_key(env_var: str | None) -> str | None:
    """The API key from environment variable ``env_var``; an unset or empty variable is an error."""
    from t2c import InvalidInput

    if env_var is None:
        return None
    key = os.environ.get(env_var, "")
    if not key.strip():
        raise InvalidInput(f"--api-key-env {env_var}: the environment variable is unset or empty",
                           f"export {env_var}=<a long random key> before starting the server")
    return key.strip()


def serve(
    store: Path = typer.Argument(..., help="Store directory (built by `t2c index`)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (loopback by default)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="TCP port."),
    api_key_env: Optional[str] = typer.Option(None, "--api-key-env",
                                              help="Require the API key held in this environment variable."),
    thumb_size: int = typer.Option(256, "--thumb-size", min=16, max=2048, help="Largest thumbnail side."),
    log_level: str = typer.Option("info", "--log-level"),
) -> None:
    """Serve a store over HTTP: search, thumbnails, audit, and a web page at http://HOST:PORT/."""
    import uvicorn

    import t2c
    from t2c.service.app import create_app
    from t2c.service.deps import Settings

    key = resolve_api_key(api_key_env)
    t2c.open(store, verify=False).close()  # fail fast, with a typed error, on a missing or empty store
    if host not in ("127.0.0.1", "localhost", "::1") and key is None:
        typer.secho(f"warning: serving on {host} without an API key; anyone who can reach it can query the store",
                    fg=typer.colors.YELLOW, err=True)
    settings = Settings(store_path=store, api_key=key, thumb_max_side=thumb_size)
    app = create_app(store, settings=settings)
    typer.echo(f"serving {store} on http://{host}:{port}/ (API docs at /docs)" + (" with an API key" if key else ""))
    uvicorn.run(app, host=host, port=port, log_level=log_level)


def register(app: typer.Typer) -> None:
    """Add `serve` to the t2c CLI."""
    app.command("serve")(serve)
