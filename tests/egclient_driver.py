"""Drive a gateway with Enterprise Gateway's own client, as EG's integration tests do; report what it saw.

Run by ``tests/egclient.py`` with the python of a venv holding EG (not the test environment: EG pins
``jupyter_server<2``); it must import nothing of egd or the tests. EG's client takes the gateway from
``GATEWAY_HOST`` (``host:port``) and its timeouts from ``REQUEST_TIMEOUT``/``KERNEL_LAUNCH_TIMEOUT``.

Steps: start a kernel, execute (where the kernel runs, state), interrupt a long cell from a second thread
(EG's ``start_interrupt_thread``), check the state survived, restart, check the state is gone and the kernel is
a new process, read the state over REST, shut the kernel down. The last line on stdout is one JSON object with an
entry per step; ``error`` names the step that raised. The driver asserts nothing: the test does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from typing import Any

from enterprise_gateway.client.gateway_client import GatewayClient, KernelClient

#: Where the kernel runs, and which program started it (EG's launcher runs its kernel in its own process).
WHERE = ("import os, socket, sys; "
         "print('where', socket.gethostname(), os.getpid(), os.path.basename(sys.argv[0]), 6 * 7)")
#: Long enough that only an interrupt ends it before the client gives up waiting (REQUEST_TIMEOUT).
LONG_CELL = ["import time\n", "print('begin')\n", "time.sleep(600)\n", "print('end')\n"]


def _execute(kernel: KernelClient, code: str | list[str]) -> dict[str, Any]:
    started = time.monotonic()
    result, has_error = kernel.execute(code)
    return {"result": result, "has_error": has_error, "seconds": round(time.monotonic() - started, 3)}


def run(kernelspec: str, interrupt_after: float, report: dict[str, Any]) -> None:
    """The steps, each recorded in ``report`` as soon as it is done."""
    client = GatewayClient(host=os.environ["GATEWAY_HOST"])
    step = "start"
    started = time.monotonic()
    kernel = client.start_kernel(kernelspec)
    report["start"] = {"kernel_id": kernel.kernel_id, "seconds": round(time.monotonic() - started, 3)}
    try:
        step = "execute"
        report["where"] = _execute(kernel, WHERE)
        report["execute"] = [_execute(kernel, "x = 123"), _execute(kernel, "print(x)")]

        step = "interrupt"
        kernel.start_interrupt_thread(wait_time=interrupt_after)
        report["interrupt"] = _execute(kernel, LONG_CELL)
        kernel.terminate_interrupt_thread()
        step = "after_interrupt"
        report["after_interrupt"] = _execute(kernel, "print(x + 1)")

        step = "restart"
        started = time.monotonic()
        report["restart"] = {"ok": kernel.restart(), "seconds": round(time.monotonic() - started, 3)}
        step = "after_restart"
        report["after_restart"] = _execute(kernel, "print(x)")
        report["where_after_restart"] = _execute(kernel, WHERE)

        step = "state"
        report["state"] = kernel.get_state()
    except BaseException:
        report["error"] = {"step": step, "traceback": traceback.format_exc()}
    step = "shutdown"
    try:
        started = time.monotonic()
        client.shutdown_kernel(kernel)  # KernelClient.shutdown: DELETE, raises unless 204
        report["shutdown"] = {"ok": True, "seconds": round(time.monotonic() - started, 3)}
    except BaseException:
        report["shutdown"] = {"ok": False}
        report.setdefault("error", {"step": step, "traceback": traceback.format_exc()})


def main() -> None:
    """Parse the arguments, run, print the report, exit 0 when no step raised."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kernelspec", required=True)
    parser.add_argument("--interrupt-after", type=float, default=3.0,
                        help="seconds between sending the long cell and POST .../interrupt")
    args = parser.parse_args()
    report: dict[str, Any] = {"kernelspec": args.kernelspec}
    try:
        run(args.kernelspec, args.interrupt_after, report)
    except BaseException:
        report.setdefault("error", {"step": "start", "traceback": traceback.format_exc()})
    print(json.dumps(report), flush=True)
    sys.stderr.flush()
    # EG's client reads the WebSocket in a non-daemon thread that a failed step can leave blocked: never wait
    # for it.
    os._exit(1 if "error" in report else 0)


if __name__ == "__main__":
    main()
