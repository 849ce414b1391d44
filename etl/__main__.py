"""``python -m etl`` is the ``metric-etl`` command."""

from etl.cli import console

if __name__ == "__main__":
    console()
