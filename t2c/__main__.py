"""``python -m t2c``: the ``t2c`` command line."""
from t2c.service.cli import cli

if __name__ == "__main__":
    cli()
