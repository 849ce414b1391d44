"""What real producers write: compressed batches (librdkafka via kcat), read by `metric-etl run` as a
separate process against the real broker."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from etl.errors import ConfigError
from tests.support import REPO, cli_env, count, good_message, rows, run_cli

pytestmark = pytest.mark.services

CODECS = ("gzip", "snappy", "lz4", "zstd")


def kcat() -> str:
    """kcat (scripts/deps.sh installs it with the stack); a clear failure where it is missing."""
    found = shutil.which("kcat") or shutil.which("kafkacat")
    if found is None:
        pytest.fail("kcat is not installed (scripts/deps.sh installs it: apt-get install kcat)", pytrace=False)
    return found


def kcat_produce(stack, topic: str, values: list[bytes], codec: str) -> None:
    """``values`` into ``topic`` by librdkafka, in batches compressed with ``codec``, one per line."""
    proc = subprocess.run(
        [
            kcat(),
            "-P",
            "-b",
            stack.plaintext,
            "-t",
            topic,
            "-z",
            codec,
            # Batches of many records, as a busy producer makes them: the codec has work to do.
            "-X",
            "linger.ms=100",
        ],
        input=b"\n".join(values) + b"\n",
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")


def stored_offsets(admin_engine, schema: str) -> dict[int, int]:
    found = rows(admin_engine, f'SELECT partition, next_offset FROM "{schema}".etl_offsets')
    return {r.partition: r.next_offset for r in found}


# -- compressed batches ---------------------------------------------------------------------------


@pytest.mark.parametrize("codec", CODECS)
def test_every_codec_is_read_out_of_the_box(codec, stack, make_topic, pg_schema, admin_engine) -> None:
    topic = make_topic()
    values = [good_message(i) for i in range(2000)]
    kcat_produce(stack, topic, values, codec)

    proc = run_cli(["run", "--output", "json"], cli_env(stack, topic, pg_schema))

    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert (report["read"], report["loaded"], report["rejected"]) == (2000, 2000, 0)
    assert count(admin_engine, pg_schema, "website_metrics") == 2000
    urls = rows(admin_engine, f'SELECT url FROM "{pg_schema}".website_metrics ORDER BY "offset"')
    assert [r.url for r in urls] == [f"https://example.com/{i}" for i in range(2000)]
    assert stored_offsets(admin_engine, pg_schema) == {0: 2000}


def blocked_codec_run(env: dict[str, str], module: str) -> subprocess.CompletedProcess[str]:
    """``metric-etl run`` in a process where ``import <module>`` fails, as where it is not installed."""
    code = (
        "import sys\n"
        f"sys.modules[{module!r}] = None  # import {module} raises ImportError\n"
        "sys.argv = ['metric-etl', 'run']\n"
        "from etl.cli import main\n"
        "main()\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=str(REPO)
    )


def test_a_codec_without_its_package_is_a_config_error_naming_both(
    stack, make_topic, pg_schema, admin_engine
) -> None:
    topic = make_topic()
    kcat_produce(stack, topic, [good_message(i) for i in range(300)], "snappy")
    env = cli_env(stack, topic, pg_schema)

    proc = blocked_codec_run(env, "snappy")

    # Exit 3 (fix the installation), not 4 (a scheduler would retry it forever); nothing lost.
    assert proc.returncode == 3, proc.stderr
    assert "snappy" in proc.stderr and "python-snappy" in proc.stderr, proc.stderr
    assert count(admin_engine, pg_schema, "website_metrics") == 0
    assert stored_offsets(admin_engine, pg_schema) == {}
    again = run_cli(["run"], env)
    assert again.returncode == 0, again.stderr
    assert count(admin_engine, pg_schema, "website_metrics") == 300


@pytest.mark.parametrize(
    ("message", "codec", "package"),
    [
        ("Libraries for snappy compression codec not found", "snappy", "python-snappy"),
        ("Libraries for lz4 compression codec not found", "lz4", "'lz4'"),
        ("Libraries for zstd compression codec not found", "zstd", "zstandard"),
        ("Unrecognized compression type: 5", "compression type: 5", "kafka-python"),
    ],
)
def test_codec_error_names_the_codec_and_the_package(message, codec, package) -> None:
    from kafka.errors import UnsupportedCodecError

    from etl.source import codec_error

    error = codec_error(UnsupportedCodecError(message), "metrics")

    assert isinstance(error, ConfigError) and error.exit_code == 3
    assert codec in str(error) and "'metrics'" in str(error)
    assert package in error.hint
