#!/usr/bin/env python3
"""minikernel -- the smallest Jupyter kernel that a gateway can drive, for bench/scalebench.py.

It speaks the Jupyter messaging protocol over ZeroMQ with nothing but pyzmq and the standard library, so that
hundreds of kernels fit in memory: ``kernel_info_request``, ``execute_request`` (the code is not run: the reply is
``ok`` and an ``execute_result`` echoes the code), ``shutdown_request``, ``interrupt_request``, with ``status``
busy/idle around each request on iopub and a heartbeat echo. SIGINT is ignored (there is never anything to
interrupt).

    python bench/minikernel.py -f CONNECTION_FILE
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import hmac
import json
import signal
import sys
import uuid

import zmq

DELIM = b"<IDS|MSG>"
VERSION = "5.3"


class MiniKernel:
    """The five sockets of a kernel and the replies it gives."""

    def __init__(self, info: dict) -> None:
        self.key = str(info.get("key", "")).encode()
        self.session = uuid.uuid4().hex
        self.ctx = zmq.Context(io_threads=1)
        address = f"{info['transport']}://{info['ip']}:"
        self.sockets = {}
        for name, kind in (("shell", zmq.ROUTER), ("control", zmq.ROUTER), ("stdin", zmq.ROUTER),
                           ("iopub", zmq.PUB), ("hb", zmq.REP)):
            sock = self.ctx.socket(kind)
            sock.linger = 0
            sock.bind(address + str(info[f"{name}_port"]))
            self.sockets[name] = sock
        self.count = 0

    def sign(self, parts: list[bytes]) -> bytes:
        """The HMAC-SHA256 signature of a message's four JSON parts."""
        if not self.key:
            return b""
        mac = hmac.new(self.key, digestmod=hashlib.sha256)
        for part in parts:
            mac.update(part)
        return mac.hexdigest().encode()

    def send(self, channel: str, msg_type: str, content: dict, parent: dict, idents: list[bytes]) -> None:
        """Sign and send one message."""
        header = {"msg_id": uuid.uuid4().hex, "msg_type": msg_type, "session": self.session, "username": "mini",
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "version": VERSION}
        parts = [json.dumps(p).encode() for p in (header, parent, {}, content)]
        self.sockets[channel].send_multipart([*idents, DELIM, self.sign(parts), *parts])

    def handle(self, channel: str, frames: list[bytes]) -> bool:
        """Answer one request; False when the kernel should exit."""
        i = frames.index(DELIM)
        idents, signature, parts = frames[:i], frames[i + 1], frames[i + 2:i + 6]
        if self.key and not hmac.compare_digest(signature, self.sign(parts)):
            return True  # unsigned or forged: ignored, as a real kernel does
        header = json.loads(parts[0])
        content = json.loads(parts[3])
        kind = header["msg_type"]
        self.send("iopub", "status", {"execution_state": "busy"}, header, [b"status"])
        keep = True
        if kind == "kernel_info_request":
            reply = {"status": "ok", "protocol_version": VERSION, "implementation": "minikernel",
                     "implementation_version": "1", "banner": "minikernel",
                     "language_info": {"name": "text", "version": "1", "mimetype": "text/plain",
                                       "file_extension": ".txt"}}
        elif kind == "execute_request":
            self.count += 1
            self.send("iopub", "execute_input", {"code": content.get("code", ""), "execution_count": self.count},
                      header, [b"execute_input"])
            if not content.get("silent"):
                self.send("iopub", "execute_result", {"execution_count": self.count, "metadata": {},
                                                      "data": {"text/plain": content.get("code", "")}},
                          header, [b"execute_result"])
            reply = {"status": "ok", "execution_count": self.count, "user_expressions": {}, "payload": []}
        elif kind == "shutdown_request":
            reply = {"status": "ok", "restart": bool(content.get("restart"))}
            keep = False
        elif kind == "interrupt_request":
            reply = {"status": "ok"}
        else:
            reply = {"status": "error", "ename": "NotImplemented", "evalue": kind, "traceback": []}
        self.send(channel, kind.replace("_request", "_reply"), reply, header, idents)
        self.send("iopub", "status", {"execution_state": "idle"}, header, [b"status"])
        return keep

    def run(self) -> None:
        """Serve until a shutdown_request."""
        poller = zmq.Poller()
        for name in ("shell", "control", "hb"):
            poller.register(self.sockets[name], zmq.POLLIN)
        by_socket = {self.sockets[name]: name for name in ("shell", "control", "hb")}
        self.send("iopub", "status", {"execution_state": "starting"}, {}, [b"status"])
        while True:
            for sock, _ in poller.poll():
                name = by_socket[sock]
                frames = sock.recv_multipart()
                if name == "hb":
                    sock.send_multipart(frames)
                elif not self.handle(name, frames):
                    return


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-f", "--connection-file", required=True)
    args = parser.parse_args()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with open(args.connection_file) as handle:
        info = json.load(handle)
    kernel = MiniKernel(info)
    try:
        kernel.run()
    finally:
        for sock in kernel.sockets.values():
            sock.close(0)
        kernel.ctx.term()
    return 0


if __name__ == "__main__":
    sys.exit(main())
