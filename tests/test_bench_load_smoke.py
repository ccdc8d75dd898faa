"""The load benchmark (scripts/bench_load.py) at a tiny level, so the script cannot rot unnoticed.

Two calls per flow through the real stack: checks that both flows ran, every call was measured and paired
(setup and answer → agent latencies), every recording was found and checked, and the report was printed.
No timing is asserted: the numbers themselves are the benchmark's business.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kasuhara_ari.config import Config

from conftest import REPO, STACK_CONFIG

# Beside the other tests: its own Stasis app, spool, bucket and free agent port, and no timing asserted
# (the numbers are the benchmark's business, measured on a quiet box, not here).
pytestmark = pytest.mark.integration


def test_bench_load_runs_at_a_tiny_level(
    asterisk: Config, s3_server: Config, mqtt_broker: Config, tmp_path: Path
) -> None:
    doc_before = (REPO / "docs" / "benchmarks.md").read_bytes()
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "bench_load.py"),
            "--levels",
            "2",
            "--waves",
            "1",
            "--call-s",
            "8",
            "--pause",
            "0",
            "--config",
            str(STACK_CONFIG),
            "--workdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "## Load" in proc.stdout
    assert "| 2 | **app ÷ baseline** |" in proc.stdout
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [(r["level"], r["flow"]) for r in results] == [(2, "baseline"), (2, "app")]
    for r in results:
        assert (r["attempted"], r["completed"], r["failed"]) == (2, 2, 0), r
        assert len(r["setup_ms"]) == 2 and len(r["answer_to_agent_ms"]) == 2, r
        assert (r["rec_found"], r["rec_ok"]) == (2, 2), r
        assert r["asterisk_cpu_s"] > 0, r
    app = results[1]
    assert app["app_cpu_s"] > 0 and app["rss_peak_mib"] > 0, app
    # Without --write the docs stay as they were.
    assert (REPO / "docs" / "benchmarks.md").read_bytes() == doc_before


def test_bench_console_runs_with_two_sessions_and_every_call_reaches_every_board(
    asterisk: Config, s3_server: Config, mqtt_broker: Config, tmp_path: Path
) -> None:
    """scripts/bench_console.py at 2 browser sessions and one plain SSE session × 2 calls: it exits 0 only if
    each session showed every call and no row stayed after the calls ended, and it measured one delay per
    call and session."""
    doc_before = (REPO / "docs" / "benchmarks.md").read_bytes()
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "bench_console.py"),
            *("--runs", "2x2+1", "--waves", "1", "--call-s", "8", "--idle-s", "1", "--pause", "0"),
            *("--config", str(STACK_CONFIG), "--workdir", str(tmp_path)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "## Console: the live board under load" in proc.stdout
    saved = json.loads((tmp_path / "results.json").read_text())
    (run,) = saved["runs"]
    assert (run["browsers"], run["attempted"], run["completed"], run["rec_ok"]) == (2, 2, 2, 2), run
    assert run["seen"] == [2, 2] and run["left"] == [0, 0], run
    assert len(run["appear_ms"]) == 4 and all(-1000 < d < 60_000 for d in run["appear_ms"]), run
    assert len(run["console_ms"]) == len(run["change_ms"]) >= 4, run  # the console stamps what it sends
    assert run["streams"] == 1 and run["stream_seen"] == [2] and len(run["stream_ms"]) >= 2, run
    assert saved["idle"]["browsers"] == 2 and run["console_rss_peak_mib"] > 0, saved
    assert (REPO / "docs" / "benchmarks.md").read_bytes() == doc_before
