"""In-memory workers for testing the coordinator without processes or sockets.

A :class:`FakeCluster` holds :class:`FakeWorker` devices by address; its :meth:`client`
is a ``Pipeline(worker_factory=...)``: each coordinator gets its own connections
(:class:`FakeConnection`, a :class:`~edge.coordinator.workers.WorkerClient`). A fake
worker runs its stage as a python function on numpy arrays (add one, by default), hands
the outputs to the next stage's fake worker, and publishes the last stage's result on
its event streams, as a real worker does over gRPC. Tests make it fail as real devices
do: :meth:`FakeWorker.kill`, :meth:`~FakeWorker.restart` (empty), :meth:`~FakeWorker.hang`,
``refuse`` (Configure answers a refusal), and :meth:`~FakeWorker.hold` (requests wait in
the stage until released: a request in flight when something happens).

Steps of generated sequences (``Activation.step``) are honoured as the contract of
``edge generate`` says: each fake stage counts the tokens it caches per sequence, refuses
a step whose position is not that count (FAILED_PRECONDITION) or a new sequence past
``max_sequences`` (RESOURCE_EXHAUSTED), frees a sequence on a release, and the last stage
publishes ``tokens`` instead of tensors; a batch (``Activation.rows``) is checked and
counted row by row (``batches``: the rows of each one run). :func:`decoder_stage` is a
stage function that "draws" ``(last token * 7 + its position) % DECODER_VOCAB``, and
:func:`fake_decoder_plan` a plan with ``generation`` set over it.

:func:`fake_plan` makes a plan over fake devices, with small shard files on disk, and
:class:`FakeReplanner` re-plans over any devices without a model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import queue
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Callable, Iterator, Sequence

import grpc
import numpy as np
from grpc_health.v1 import health_pb2

from edge.coordinator.failover import Deployment, Replanner
from edge.coordinator.workers import CallError, Done
from edge.planning.plan import (Device, Generation, ModelInfo, Plan, Stage, StagePrediction,
                                TensorSpec)
from edge.proto import edge_pb2 as pb
from edge.transport.codec import decode_tensors, encode_tensors

__all__ = ["FakeCluster", "FakeWorker", "FakeConnection", "FakeReplanner", "fake_plan",
           "fake_devices", "add_one", "decoder_stage", "fake_decoder_plan", "fake_next_token",
           "DECODER_VOCAB"]

Code = grpc.StatusCode
StageFn = Callable[[pb.StageConfig, dict], dict]


def add_one(config: pb.StageConfig, arrays: dict) -> dict:
    """The default stage: every array plus one (n stages add n)."""
    return {k: v + 1 for k, v in arrays.items()}


DECODER_VOCAB = 50


def fake_next_token(token: int, position: int) -> int:
    """The token :func:`decoder_stage` draws after ``token`` at ``position``."""
    return (int(token) * 7 + int(position)) % DECODER_VOCAB


def decoder_stage(config: pb.StageConfig, arrays: dict) -> dict:
    """A fake decoder's stage: the first stages pass their inputs on; the last draws
    :func:`fake_next_token` of the last input token (as ``tokens``, one per row)."""
    if config.next_address:
        return dict(arrays)
    ids, positions = arrays["input_ids"], arrays["position_ids"]
    return {"tokens": np.array([fake_next_token(i, p) for i, p in
                                zip(ids[:, -1], positions[:, -1])], dtype=np.int64)}


class _Stream:
    def __init__(self, coordinator_id: str):
        self.coordinator_id = coordinator_id
        self.queue: queue.Queue = queue.Queue()


class FakeWorker:
    """One device's worker, in memory.

    Attributes:
        alive: answers calls (False after :meth:`kill`).
        hung: up but never answers (calls fail with DEADLINE_EXCEEDED at once).
        refuse: the code Configure answers with (None: it takes its stage).
        config: the stage it serves (None: none).
        owner: the coordinator that owns it ("" none).
        configured: how many times it took a stage.
        full: the next this many Forwards are refused with RESOURCE_EXHAUSTED (a full
            queue).
        forwards: Forwards it accepted.
        health_checks: health checks it was asked.
    """

    def __init__(self, cluster: "FakeCluster", address: str):
        self.cluster, self.address = cluster, address
        self.alive, self.hung = True, False
        self.refuse: grpc.StatusCode | None = None
        self.config: pb.StageConfig | None = None
        self.owner = ""
        self.configured = 0
        self.full = 0
        self.forwards = 0
        self.health_checks = 0
        self.cache: set[str] = set()
        self.sequences: dict[str, int] = {}  # tokens cached per generated sequence
        self.batches: list[int] = []  # the rows of each batch of decode steps run
        self._lock = threading.Lock()
        self._streams: list[_Stream] = []
        self._taken_from: set[str] = set()
        self._holding = False
        self._held: list[pb.Activation] = []

    # ------------------------------------------------------------------ faults

    def kill(self) -> None:
        """The device dies: its streams break, what it holds is lost."""
        self.alive, self._holding = False, False
        self._held.clear()
        self.sequences.clear()
        self._end_streams(lambda s: (Code.UNAVAILABLE, "connection reset"))

    def restart(self, empty: bool = True) -> None:
        """The worker comes back, with no stage and no owner (and, ``empty``, no shards)."""
        self.alive, self.hung = True, False
        self.config, self.owner = None, ""
        self.sequences.clear()
        if empty:
            self.cache.clear()

    def hang(self) -> None:
        self.hung = True

    def hold(self) -> None:
        """Keep the requests it takes from now on until :meth:`release`."""
        self._holding = True

    @property
    def subscribers(self) -> int:
        """Event streams of its owner open now (results published meanwhile reach them)."""
        with self._lock:
            return sum(s.coordinator_id == self.owner for s in self._streams)

    @property
    def held(self) -> int:
        return len(self._held)

    @property
    def held_requests(self) -> list[pb.Activation]:
        """The requests it holds now, oldest first."""
        with self._lock:
            return list(self._held)

    def release(self, n: int | None = None) -> None:
        """Run ``n`` (default all) held requests, oldest first, and stop holding."""
        self._holding = False
        with self._lock:
            n = len(self._held) if n is None else n
            batch, self._held = self._held[:n], self._held[n:]
        for activation in batch:
            self._run(activation)

    # ------------------------------------------------------------------ calls

    def _check(self) -> None:
        if not self.alive:
            raise CallError(Code.UNAVAILABLE, f"failed to connect to {self.address}")
        if self.hung:
            raise CallError(Code.DEADLINE_EXCEEDED, "deadline exceeded")

    def forward(self, activation: pb.Activation) -> tuple[grpc.StatusCode, str]:
        try:
            self._check()
        except CallError as e:
            return e.code(), e.details()
        config = self.config
        if config is None:
            return Code.FAILED_PRECONDITION, "this worker has no stage yet"
        if activation.epoch != config.epoch:
            return Code.FAILED_PRECONDITION, (f"request belongs to epoch {activation.epoch}, "
                                              f"this worker serves epoch {config.epoch}")
        if self.full > 0:
            self.full -= 1
            return Code.RESOURCE_EXHAUSTED, "queue full; retry later"
        for step in ([activation.step] if activation.HasField("step") else []) + list(
                activation.rows):
            refused = self._check_step(step, config)
            if refused:
                return refused
        self.forwards += 1
        with self._lock:
            if self._holding:
                self._held.append(activation)
                return Code.OK, ""
        threading.Thread(target=self._run, args=(activation,), daemon=True).start()
        return Code.OK, ""

    def _check_step(self, step: pb.Step, config: pb.StageConfig) -> tuple | None:
        """The refusal of a step that does not match this stage's caches, or None."""
        if step.release:
            return None
        cached = self.sequences.get(step.sequence_id)
        if step.position != 0 and step.position != (cached or 0):
            return Code.FAILED_PRECONDITION, (
                f"sequence {step.sequence_id}: step at position {step.position}, stage "
                f"{config.stage} caches {cached or 0} tokens of it")
        if cached is None and config.max_sequences and \
                len(self.sequences) >= config.max_sequences:
            return Code.RESOURCE_EXHAUSTED, (f"{config.max_sequences} sequences already "
                                             f"cached on stage {config.stage}")
        return None

    def _run(self, activation: pb.Activation) -> None:
        config = self.config
        if not self.alive or config is None:
            return
        step = activation.step if activation.HasField("step") else None
        out = pb.Activation(request_id=activation.request_id, epoch=activation.epoch,
                            rows=activation.rows)
        if step is not None:
            out.step.CopyFrom(step)
        if step is not None and step.release:
            self.sequences.pop(step.sequence_id, None)
        else:
            arrays = decode_tensors(activation.tensors)
            try:
                outputs = self.cluster.stage_fn(config, arrays)
            except ValueError as e:  # the contents: a real worker's run failure
                self._publish(pb.Event(failure=pb.Failure(
                    request_id=activation.request_id, stage=config.stage,
                    code=Code.INVALID_ARGUMENT.value[0], message=f"stage {config.stage}: {e}",
                    epoch=activation.epoch)))
                return
            if step is not None:
                self.sequences[step.sequence_id] = step.position + arrays["input_ids"].shape[1]
            for row in activation.rows:  # a batch of decode steps: one token each
                self.sequences[row.sequence_id] = row.position + 1
            if activation.rows:
                self.batches.append(len(activation.rows))
            if (step is not None or activation.rows) and not config.next_address:
                out.tokens.extend(int(t) for t in outputs["tokens"])
            else:
                out.tensors.extend(encode_tensors(outputs))
        if not config.next_address:
            self._publish(pb.Event(result=out))
            return
        code, details = self.cluster.workers[config.next_address].forward(out)
        if code != Code.OK:
            self._publish(pb.Event(failure=pb.Failure(
                request_id=activation.request_id, stage=config.stage, code=code.value[0],
                message=f"stage {config.stage + 1} at {config.next_address}: {details}",
                epoch=activation.epoch)))

    def _publish(self, event: pb.Event) -> None:
        with self._lock:
            streams = [s for s in self._streams if s.coordinator_id == self.owner]
        for s in streams:
            s.queue.put(event)

    def _end_streams(self, why: Callable[[_Stream], tuple | None]) -> None:
        with self._lock:
            for s in list(self._streams):
                ended = why(s)
                if ended:
                    s.queue.put(CallError(*ended))
                    self._streams.remove(s)

    def subscribe(self, coordinator_id: str) -> _Stream:
        self._check()
        if coordinator_id in self._taken_from:
            raise CallError(Code.ABORTED, f"taken over by coordinator {self.owner}")
        stream = _Stream(coordinator_id)
        with self._lock:
            self._streams.append(stream)
        return stream

    def unsubscribe(self, stream: _Stream) -> None:
        with self._lock:
            if stream in self._streams:
                self._streams.remove(stream)

    def configure(self, config: pb.StageConfig) -> pb.ConfigureReply:
        self._check()
        if self.refuse is not None:
            raise CallError(self.refuse, f"{self.address} refuses stage {config.stage}")
        if config.shard_sha256 not in self.cache:
            raise CallError(Code.FAILED_PRECONDITION, f"no shard {config.shard_sha256[:12]}")
        owner, new = self.owner, config.coordinator_id
        if owner and owner != new:
            if not config.take_over:
                raise CallError(Code.FAILED_PRECONDITION,
                                f"{self.address} belongs to coordinator {owner}")
            self._taken_from.add(owner)
            self._end_streams(lambda s: (Code.ABORTED, f"taken over by coordinator {new}")
                              if s.coordinator_id == owner else None)
        self.config, self.owner = config, new
        self.configured += 1
        return pb.ConfigureReply(load_ms=1.0)

    def status(self) -> pb.WorkerStatus:
        self._check()
        c = self.config
        return pb.WorkerStatus(device=self.address, configured=c is not None,
                               stage=c.stage if c else 0, epoch=c.epoch if c else 0,
                               plan_id=c.plan_id if c else "", coordinator_id=self.owner)


class FakeConnection:
    """One coordinator's connection to a :class:`FakeWorker`: a WorkerClient."""

    def __init__(self, worker: FakeWorker):
        self.worker = worker
        self.address = worker.address
        self._closed = threading.Event()
        self._streams: list[_Stream] = []

    def forward(self, activation: pb.Activation, timeout: float, done: Done) -> None:
        if not self._closed.is_set():
            done(*self.worker.forward(activation))

    def subscribe(self, coordinator_id: str, results=None) -> Iterator[pb.Event]:
        self._gone()  # no event loop: ``results`` come through the iterator too
        stream = self.worker.subscribe(coordinator_id)
        self._streams.append(stream)
        return self._events(stream)

    def _events(self, stream: _Stream) -> Iterator[pb.Event]:
        try:
            while True:
                try:
                    item = stream.queue.get(timeout=0.01)
                except queue.Empty:
                    self._gone()
                    continue
                if isinstance(item, CallError):
                    raise item
                yield item
        finally:
            self.worker.unsubscribe(stream)

    def _gone(self) -> None:
        if self._closed.is_set():
            raise CallError(Code.CANCELLED, "channel closed")

    def release(self, coordinator_id: str, timeout: float) -> None:
        self._gone()  # a fake worker's owner has no claim to let go of: it changes nothing
        self.worker._check()

    def status(self, timeout: float) -> pb.WorkerStatus:
        self._gone()
        return self.worker.status()

    def health(self, timeout: float) -> Future:
        out: Future = Future()
        self.worker.health_checks += 1
        try:
            self._gone()
            self.worker._check()
            out.set_result(health_pb2.HealthCheckResponse.SERVING)
        except CallError as e:
            out.set_exception(e)
        return out

    def has_shard(self, sha256: str, timeout: float) -> bool:
        self._gone()
        self.worker._check()
        return sha256 in self.worker.cache

    def upload(self, chunks: Iterator[pb.ShardChunk], timeout: float) -> None:
        self._gone()
        self.worker._check()
        sha = next(chunks).header.sha256
        for _ in chunks:
            pass
        self.worker.cache.add(sha)

    def configure(self, config: pb.StageConfig, timeout: float) -> pb.ConfigureReply:
        self._gone()
        return self.worker.configure(config)

    def profile(self, since: float, timeout: float) -> pb.WorkerProfile:
        self._gone()
        self.worker._check()
        return pb.WorkerProfile()

    def close(self) -> None:
        self._closed.set()


class FakeCluster:
    """Fake workers by address.

    Args:
        addresses: the devices' addresses.
        stage_fn: what a stage computes, ``fn(config, arrays) -> arrays`` (default
            :func:`add_one`).
    """

    def __init__(self, addresses: Sequence[str], stage_fn: StageFn = add_one):
        self.stage_fn = stage_fn
        self.workers = {a: FakeWorker(self, a) for a in addresses}

    def __getitem__(self, address: str) -> FakeWorker:
        return self.workers[address]

    def client(self, address: str) -> FakeConnection:
        """A ``worker_factory`` for :class:`~edge.coordinator.pipeline.Pipeline`."""
        return FakeConnection(self.workers[address])


def fake_devices(n: int, prefix: str = "fake", standby: bool = False,
                 memory_mb: float = 512.0) -> list[Device]:
    return [Device(name=f"{prefix}-{i}", address=f"{prefix}-{i}:50051", profile="fake",
                   memory_mb=memory_mb, gflops=1.0, bandwidth_mbps=100.0, standby=standby)
            for i in range(n)]


def fake_plan(plan_dir: Path, devices: Sequence[Device], standby: Sequence[Device] = (),
              shape: tuple[int, ...] = (1, 4), inputs: tuple[TensorSpec, ...] | None = None,
              generation: Generation | None = None) -> Plan:
    """A plan of one stage per device over a float32 ``x`` of ``shape`` (or ``inputs``,
    passed from stage to stage), with a small shard file per stage under ``plan_dir``
    (deploy checks them against the plan)."""
    plan_dir = Path(plan_dir)
    (plan_dir / "shards").mkdir(parents=True, exist_ok=True)
    x = inputs or (TensorSpec("x", "float32", tuple(shape)),)
    stages = []
    for i, device in enumerate(devices):
        data = f"stage {i} of {len(devices)} in {plan_dir}".encode()
        rel = f"shards/stage{i}.onnx"
        (plan_dir / rel).write_bytes(data)
        stages.append(Stage(
            index=i, device=device, node_range=(i, i + 1), inputs=x, outputs=x, shard=rel,
            sha256=hashlib.sha256(data).hexdigest(), shard_bytes=len(data),
            predicted=StagePrediction(weights_mb=1, activations_mb=1, runtime_floor_mb=1,
                                      memory_mb=64, gflops=0.1, compute_ms=1,
                                      transfer_ms=1, time_ms=2)))
    model = ModelInfo(name="fake", sha256="0" * 64, num_nodes=len(devices), inputs=x,
                      outputs=x, generation=generation)
    return Plan(model=model, stages=tuple(stages), standby=tuple(standby))


def fake_decoder_plan(plan_dir: Path, devices: Sequence[Device], standby: Sequence[Device] = (),
                      context: int = 32, sequences: int = 2,
                      eos_token_ids: tuple[int, ...] = (), tokenizer: str = "") -> Plan:
    """A :func:`fake_plan` of a decoder (``input_ids``, ``attention_mask``,
    ``position_ids``) with ``generation`` set; run it with :func:`decoder_stage`.
    ``tokenizer``: the folder under ``plan_dir`` with its tokenizer.json ("" none)."""
    inputs = (TensorSpec("input_ids", "int64", ("batch", "sequence")),
              TensorSpec("attention_mask", "int64", ("batch", "total_sequence")),
              TensorSpec("position_ids", "int64", ("batch", "sequence")))
    return fake_plan(plan_dir, devices, standby, inputs=inputs, generation=Generation(
        context=context, sequences=sequences, prefill=context, tokenizer=tokenizer,
        eos_token_ids=tuple(eos_token_ids)))


class FakeReplanner(Replanner):
    """A :class:`Replanner` that re-plans over any devices with :func:`fake_plan`.

    Attributes:
        replans: the device names of each re-plan made.
    """

    def __init__(self, original: Plan, plan_dir: Path):
        super().__init__(original, plan_dir, None)
        self.replans: list[tuple[str, ...]] = []

    def _replan(self, placed: list[Device], spares: list[Device],
                lost: list[str]) -> Deployment:
        devices = [dataclasses.replace(d, standby=False) for d in placed]
        out = self.plan_dir / "replans" / "-".join(d.name for d in devices)
        self.replans.append(tuple(d.name for d in devices))
        return Deployment(fake_plan(out, devices), out, "re-planned")


def as_array(tensors) -> np.ndarray:
    """The ``x`` of a result's wire tensors."""
    return decode_tensors(tensors)["x"]
