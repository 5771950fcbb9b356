"""Helpers the tests share: the unsharded reference, a plan's shards chained in
onnxruntime, a local pipeline of worker processes, and a worker's Subscribe stream.

Imported as ``helpers`` (pytest puts ``tests/`` on the path); the fixtures that wrap them
are in conftest.py.
"""

from __future__ import annotations

import queue
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np

BINDINGS = {"batch": 1, "sequence": 16}

# The SmolLM2 tests' chat question (the answer is "The capital of France is Paris.") and
# the tokens they generate at most.
SMOLLM2_QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
SMOLLM2_NEW_TOKENS = 24


def until(condition: Callable[[], bool], seconds: float = 2.0, what: str = "condition",
          poll: float = 0.002) -> None:
    """Wait for ``condition()`` to hold; AssertionError naming ``what`` after ``seconds``."""
    end = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll)


def unit_sections(path: Path) -> dict[str, dict[str, list[str]]]:
    """A systemd unit file's sections, each key with its values in order (systemd repeats
    keys such as Environment=, which configparser refuses)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, value = line.split("=", 1)
        current.setdefault(key, []).append(value)
    return sections


def assert_no_torch(*modules: str) -> None:
    """Importing ``modules`` in a fresh interpreter loads neither torch nor transformers."""
    import subprocess
    import sys

    code = (f"import sys, {', '.join(modules)}; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "sys.exit(f'imported {bad}' if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr + res.stdout


def references(model: str | Path, inputs: Sequence[dict], options: Any = None) -> list[dict]:
    """The unsharded model's outputs for each of ``inputs``, by output name.

    Args:
        model: the .onnx file.
        inputs: feeds, one dict per request.
        options: onnxruntime SessionOptions (default onnxruntime's).
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return [dict(zip(names, session.run(None, x))) for x in inputs]


def reference(model: str | Path, x: dict, options: Any = None) -> dict:
    """The unsharded model's outputs for ``x``, by output name."""
    return references(model, [x], options)[0]


def run_chain(plan_dir: str | Path, plan, feeds: dict) -> dict:
    """Run a plan's shards one after another in onnxruntime, as the workers would: each
    stage reads its inputs in its mode, and forwards the tensors it passes through."""
    import onnxruntime as ort

    from edge.shards.runtime import session_options

    cur = dict(feeds)
    for st in plan.stages:
        sess = ort.InferenceSession(str(Path(plan_dir) / st.shard),
                                    session_options(1, st.mode),
                                    providers=["CPUExecutionProvider"])
        assert set(cur) == {t.name for t in st.inputs}
        res = sess.run(None, {i.name: cur[i.name] for i in sess.get_inputs()})
        nxt = {k: cur[k] for k in st.passthrough}
        nxt.update(zip([o.name for o in sess.get_outputs()], res))
        cur = nxt
    return cur


def assert_close(got: dict, want: dict, atol: float, what: str = "") -> None:
    """Same names, same shapes, values within ``atol``."""
    assert set(got) == set(want), what
    for k in want:
        assert got[k].shape == want[k].shape, (what, k)
        np.testing.assert_allclose(got[k], want[k], atol=atol, rtol=0, err_msg=f"{what} {k}")


class Local(NamedTuple):
    """A started pipeline over local worker processes."""

    workers: Any  # edge.worker.launch.LocalWorkers
    plan: Any  # edge.planning.plan.Plan
    pipeline: Any  # edge.coordinator.pipeline.Pipeline


@contextmanager
def local_pipeline(model: str | Path, count: int, root: Path, *,
                   plan_dir: Path | None = None, bindings: dict | None = None,
                   make: Callable[[tuple], Any] | None = None, device: str | None = None,
                   **pipeline_args) -> Iterator[Local]:
    """``count`` rpi4b-2gb workers on this machine, a plan over them, its Pipeline started.

    Args:
        model: the .onnx file.
        count: workers.
        root: their files go to ``root / "w"``.
        plan_dir: where the plan is built (default ``root / "build"``).
        bindings: dim sizes to plan for (default batch 1, sequence 16).
        make: ``make(devices) -> Plan`` for tests that shape the devices or the plan
            themselves; default ``make_plan`` over the workers' devices.
        device: the workers' ``--device`` profile.
        pipeline_args: for Pipeline (default ``deadlines=Deadlines(infer=60)``).
    """
    from edge.coordinator.pipeline import Pipeline
    from edge.build import make_plan
    from edge.planning.cluster import cluster_from_profile
    from edge.transport.channels import Deadlines
    from edge.worker.launch import LocalWorkers

    plan_dir = plan_dir or root / "build"
    pipeline_args.setdefault("deadlines", Deadlines(infer=60))
    with LocalWorkers(count, root / "w", device=device, threads=1) as workers:
        devices = cluster_from_profile("rpi4b-2gb", count, addresses=workers.addresses).devices
        plan = (make(devices) if make else
                make_plan(model, devices, plan_dir, bindings=bindings or BINDINGS))
        with Pipeline(plan, plan_dir, **pipeline_args) as pipeline:
            pipeline.start()
            yield Local(workers, plan, pipeline)


class Events:
    """A worker's Subscribe stream, collected on a thread: in order (``next``) and by
    request id (``wait``)."""

    def __init__(self, stub, request=None):
        from edge.proto import edge_pb2 as pb

        self.q: queue.Queue = queue.Queue()
        self.by_id: dict[str, Any] = {}
        self.cond = threading.Condition()
        self.call = stub.Subscribe(request if request is not None else pb.SubscribeRequest())
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        import grpc

        try:
            for e in self.call:
                kind = e.WhichOneof("kind")
                rid = (e.result.request_id if kind == "result" else
                       e.failure.request_id if kind == "failure" else None)
                self.q.put(e)
                if rid is not None:
                    with self.cond:
                        self.by_id[rid] = e
                        self.cond.notify_all()
        except grpc.RpcError:
            pass

    def next(self, timeout: float = 20):
        """The next event, in order."""
        return self.q.get(timeout=timeout)

    def wait(self, ids, timeout: float = 60.0) -> dict:
        """The events for request ``ids``, waiting for all of them."""
        end = time.monotonic() + timeout
        with self.cond:
            while not all(i in self.by_id for i in ids):
                left = end - time.monotonic()
                assert left > 0, f"no event for {sorted(set(ids) - set(self.by_id))[:5]}"
                self.cond.wait(left)
            return {i: self.by_id.pop(i) for i in ids}

    def close(self):
        self.call.cancel()
