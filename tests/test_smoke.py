"""A first end-to-end check: a kernel starts, runs code over the WebSocket and stops."""

from tests.client import GatewayClient


def test_execute_round_trip(client: GatewayClient, kernel: str) -> None:
    """A python3 kernel runs a cell and its output and result come back on the legacy protocol."""
    sock = client.connect(kernel)
    try:
        run = sock.execute("print('hello'); 6*7")
    finally:
        sock.close()
    assert run.reply["content"]["status"] == "ok"
    assert run.stdout == "hello\n"
    assert run.result == "42"
