"""A run with nothing to read imports only what it needs: pandas and numpy wait for the first message.

A caught-up run (cron every minute on a quiet topic) is mostly start-up; importing pandas and numpy
was 0.4 of its 0.9 s of CPU (issue 22).
"""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("pandas", "numpy")


def test_the_run_path_imports_no_pandas_until_a_batch() -> None:
    code = (
        "import sys\n"
        "import etl.cli, etl.cli.run, etl.run, etl.run.pipeline, etl.kafka.source, etl.run.loader\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == ""


def test_a_batch_still_gets_its_frame() -> None:
    from etl.contract import RawMessage
    from etl.normalise import normalise

    frame = normalise([RawMessage("t", 0, 5, 1_700_000_000_000, None, b'{"url": "https://a.example"}')])
    assert frame["offset"].tolist() == [5]
    assert frame["url"].tolist() == ["https://a.example"]
    assert str(frame["kafka_timestamp"].dtype) == "datetime64[us, UTC]"
