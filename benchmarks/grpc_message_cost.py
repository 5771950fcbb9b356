"""What one message exchange costs in Python gRPC, the floor under the coordinator's CPU
(issue 16).

Per request the coordinator handles three exchanges: the client's Infer (a unary call it
serves, whose reply carries the outputs), the Forward to the first stage (a unary call it
makes) and the result from the last stage (a message on the event stream). This measures
each kind alone, on loopback, in plaintext, at a paced rate (requests arrive one at a time,
as from a pipeline of Pi-class boards, so each one wakes the threads it needs):

- *serving* a unary call, with gRPC's synchronous server and with its asyncio server, for
  a small reply and for a reply of ``--reply-kib`` (BERT-base's outputs at sequence 128 are
  387 KiB): the CPU of the server's process per call;
- *making* a call: a blocking unary call, a ``.future()`` unary call, and one message and
  its answer on an open bidirectional stream: the CPU of the calling process per call.

Each figure is the process's CPU over the calls divided by their count, less what the
process spends per second without calls (measured before, over ``--idle-seconds``).
psutil counts CPU in 10 ms ticks, so each figure carries about +-0.05 ms.

Run (BENCHMARKS.md cites this command; about four minutes)::

    python benchmarks/grpc_message_cost.py --rate 20 --calls 300

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import socket
import subprocess
import sys
import time
from concurrent import futures

import grpc
import psutil

_SERVICE = "bench.Cost"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(kind: str, port: int, reply_bytes: int) -> None:
    """The server process: Unary answers ``reply_bytes``; Bidi answers each message."""
    reply = b"x" * reply_bytes
    if kind == "sync":
        def unary(request, context):
            return reply

        def bidi(requests, context):
            for _ in requests:
                yield b"ok"

        handlers = grpc.method_handlers_generic_handler(_SERVICE, {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Bidi": grpc.stream_stream_rpc_method_handler(bidi)})
        server = grpc.server(futures.ThreadPoolExecutor(16))
        server.add_generic_rpc_handlers((handlers,))
        server.add_insecure_port(f"127.0.0.1:{port}")
        server.start()
        server.wait_for_termination()
        return

    async def unary_async(request, context):
        return reply

    async def main() -> None:
        handlers = grpc.method_handlers_generic_handler(
            _SERVICE, {"Unary": grpc.unary_unary_rpc_method_handler(unary_async)})
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((handlers,))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


class _Server:
    def __init__(self, kind: str, reply_bytes: int):
        self.port = _free_port()
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve", kind, "--port", str(self.port),
             "--reply-bytes", str(reply_bytes)])
        self.channel = grpc.insecure_channel(
            f"127.0.0.1:{self.port}", options=[("grpc.max_receive_message_length", 1 << 30)])
        grpc.channel_ready_future(self.channel).result(timeout=30)
        self.ps = psutil.Process(self.process.pid)

    def close(self) -> None:
        self.channel.close()
        self.process.kill()
        self.process.wait()


def _cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def _per_call(process: psutil.Process, send, calls: int, rate: float,
              idle_seconds: float) -> dict:
    """CPU ms per call of ``process`` while ``send()`` runs ``calls`` times at ``rate``."""
    for _ in range(20):  # warm up: connections, first-call costs
        send()
    time.sleep(0.5)
    c0 = _cpu(process)
    time.sleep(idle_seconds)
    idle_per_s = (_cpu(process) - c0) / idle_seconds
    c0, start = _cpu(process), time.monotonic()
    for i in range(calls):
        send()
        time.sleep(max(0.0, start + (i + 1) / rate - time.monotonic()))
    elapsed, used = time.monotonic() - start, _cpu(process) - c0
    return {"cpu_ms_per_call": round((used - idle_per_s * elapsed) / calls * 1e3, 3),
            "cpu_ms_per_call_with_idle": round(used / calls * 1e3, 3),
            "idle_cpu_ms_per_s": round(idle_per_s * 1e3, 2)}


def _bidi(channel: grpc.Channel):
    """``send()`` of one message and its answer on an open stream, and its closer."""
    outgoing: queue.SimpleQueue = queue.SimpleQueue()

    def requests():
        while (message := outgoing.get()) is not None:
            yield message

    answers = channel.stream_stream(f"/{_SERVICE}/Bidi")(requests())

    def send() -> None:
        outgoing.put(b"r" * 3000)
        next(answers)
    return send, lambda: outgoing.put(None)


def run(rate: float, calls: int, reply_kib: int, idle_seconds: float) -> dict:
    me = psutil.Process()
    request = b"r" * 3000  # BERT's three int64[1,128] inputs are about this size
    out: dict = {"benchmark": "grpc_message_cost", "rate_per_s": rate, "calls": calls,
                 "grpc": grpc.__version__, "cpus": os.cpu_count(), "serving": {},
                 "calling": {}}
    for kind in ("sync", "asyncio"):
        for reply_bytes in (2, reply_kib * 1024):
            server = _Server(kind, reply_bytes)
            try:
                call = server.channel.unary_unary(f"/{_SERVICE}/Unary")
                reply = "small reply" if reply_bytes < 1024 else f"{reply_kib} KiB reply"
                key = f"{kind} server, {reply}"
                out["serving"][key] = _per_call(server.ps, lambda: call(request), calls, rate,
                                                idle_seconds)
            finally:
                server.close()
    server = _Server("sync", 2)
    try:
        call = server.channel.unary_unary(f"/{_SERVICE}/Unary")
        out["calling"]["blocking unary call"] = _per_call(
            me, lambda: call(request), calls, rate, idle_seconds)
        out["calling"][".future() unary call"] = _per_call(
            me, lambda: call.future(request).result(), calls, rate, idle_seconds)
        send, close = _bidi(server.channel)
        out["calling"]["message and answer on an open stream"] = _per_call(
            me, send, calls, rate, idle_seconds)
        close()
    finally:
        server.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=20.0, help="calls a second")
    parser.add_argument("--calls", type=int, default=300, help="calls measured per figure")
    parser.add_argument("--reply-kib", type=int, default=387, help="the large reply's size")
    parser.add_argument("--idle-seconds", type=float, default=10.0,
                        help="seconds without calls measured before each figure")
    parser.add_argument("--serve", choices=("sync", "asyncio"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--reply-bytes", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        _serve(args.serve, args.port, args.reply_bytes)
        return
    print(json.dumps(run(args.rate, args.calls, args.reply_kib, args.idle_seconds), indent=1))


if __name__ == "__main__":
    main()
