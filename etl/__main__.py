"""``python -m etl`` is the ``metric-etl`` command."""

from etl.cli import main

if __name__ == "__main__":
    main()
