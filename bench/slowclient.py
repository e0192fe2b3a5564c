#!/usr/bin/env python3
"""slowclient -- what one never-reading WebSocket client costs egd (issue 10, item 3).

A kernel prints ~1 KB lines continuously (``--rate`` lines a second, flushed every 10 lines) for
``--seconds`` (default 60). Two clients are connected to it: one with a 4 KiB receive buffer that completes the
WebSocket handshake and never reads again, and one that reads everything. Reported: egd's VmRSS before, at its
peak and after, how many of the lines the reading client received (it must be all), and whether egd logged
the slow client's disconnection (close code 4008). Runs egd with its default configuration (``--config`` for
another) on 127.0.0.1; everything it starts is stopped at the end.

    python bench/slowclient.py [--seconds 60] [--rate 2000] [--config egd.yaml]

Exit status 0 when egd grew by less than ``--max-growth-mib`` (default 100) and the reader got every line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# The measurement is the one tests/test_backlog.py makes in 15 s, with the same gateway fixture (after the path).
from tests import conftest
from tests import test_backlog as backlog


def main() -> int:
    """Run the measurement and print the figures (and a JSON line)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--rate", type=int, default=backlog.RATE, help="lines of ~1 KB a second")
    parser.add_argument("--config", help="a YAML file of egd settings (its sections override the defaults)")
    parser.add_argument("--max-growth-mib", type=float, default=100.0)
    args = parser.parse_args()
    overrides = yaml.safe_load(Path(args.config).read_text()) if args.config else None
    conftest._ROOT.rmdir()  # made on import, for the tests; this run keeps its gateway's files apart
    conftest._ROOT = Path(tempfile.mkdtemp(prefix="egd-slowclient-"))
    backlog.RATE = args.rate  # a module constant of the shared measurement
    gw = conftest.GatewayProcess(overrides)
    try:
        result = backlog.run_slow_client(gw, args.seconds)
        time.sleep(2)
        after = backlog.vm_rss_kib(gw.proc.pid)
        log = gw.log()
    finally:
        gw.stop()
        shutil.rmtree(conftest._ROOT, ignore_errors=True)
    grown = (result["peak_kib"] - result["before_kib"]) / 1024
    disconnected = "disconnecting session never-reads (close code 4008)" in log
    print(f"output: {result['lines']} lines of ~1 KB in {args.seconds:g} s ({args.rate} lines/s)")
    print(f"egd VmRSS: before {result['before_kib'] / 1024:.1f} MiB, peak {result['peak_kib'] / 1024:.1f} MiB "
          f"(+{grown:.1f} MiB), 2 s after {after / 1024:.1f} MiB")
    print(f"reading client: {result['received']} of {result['lines']} lines"
          f"{'' if result['reader_error'] is None else ', error: ' + repr(result['reader_error'])}")
    print(f"never-reading client disconnected with 4008: {'yes' if disconnected else 'no'}")
    print(json.dumps({**{k: v for k, v in result.items() if k != "reader_error"}, "after_kib": after,
                      "grown_mib": round(grown, 1), "disconnected_4008": disconnected,
                      "reader_error": None if result["reader_error"] is None else repr(result["reader_error"])}))
    ok = grown < args.max_growth_mib and result["received"] == result["lines"] and result["reader_error"] is None
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
