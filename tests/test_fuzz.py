"""Bad input never crashes a worker or the coordinator (issue 6).

Every RPC of a running, configured worker process (a bert-tiny stage) and of a coordinator
is fuzzed with hypothesis through a real gRPC channel: well-formed messages with bad
contents (each with the status code it must get), and raw bytes that are not the message at
all. No answer may be UNKNOWN or INTERNAL (an exception the handler did not expect), every
error must say what was expected, and afterwards the worker process is still alive and
still computes what onnxruntime computes.

Deterministic (``derandomize=True``); the per-RPC case counts are printed in the terminal
summary and each must reach a minimum.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from edge.coordinator.deploy import connect, upload_shard
from edge.coordinator.pipeline import Pipeline
from edge.coordinator.server import start_coordinator
from edge.build import make_plan
from edge.planning.cluster import cluster_from_profile
from edge.proto import edge_pb2 as pb
from edge.proto import edge_pb2_grpc as pb_grpc
from edge.transport.channels import Deadlines, create_channel
from edge.transport.codec import (PROTOCOL_VERSION, decode_tensors, encode_spec, encode_tensor,
                                  encode_tensors)
from edge.worker.launch import spawn_worker

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
DATA_LOSS = grpc.StatusCode.DATA_LOSS
NEVER = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}

EPOCH = 7
BUDGET_MB = 2000  # the fuzzed worker's --memory-budget
VOCAB = 30522     # bert's vocabulary: ids outside +-VOCAB cannot be looked up
COUNTS: Counter = Counter()
# The fewest cases each RPC must have seen by the end.
MINIMUM = {"Worker.GetStatus": 40, "Worker.HasShard": 80, "Worker.UploadShard": 100,
           "Worker.Configure": 100, "Worker.Forward": 250, "Worker.Subscribe": 30,
           "Worker.GetProfile": 60, "Worker.Calibrate": 60,
           "Coordinator.Infer": 100, "Coordinator.GetClusterStatus": 30,
           "Coordinator.GetClusterProfile": 40}


def fuzz_settings(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck), print_blob=False)


def call(rpc: str, fn, expect: set, *words: str):
    """Run one RPC; check its status is one of ``expect`` and never UNKNOWN or INTERNAL,
    and that an error's details contain ``words``. Returns the reply (or None)."""
    COUNTS[rpc] += 1
    try:
        reply, code, details = fn(), OK, ""
    except grpc.RpcError as e:
        reply, code, details = None, e.code(), e.details() or ""
    assert code not in NEVER, f"{rpc} answered {code.name}: {details}"
    assert code in expect, (f"{rpc}: expected {sorted(c.name for c in expect)}, "
                            f"got {code.name}: {details}")
    if code != OK:
        assert details.strip(), f"{rpc} answered {code.name} without saying why"
        for w in words:  # a word, or a tuple of words of which one must appear
            assert any(x in details for x in ((w,) if isinstance(w, str) else w)), (
                f"{rpc} {code.name}: {w!r} not in {details!r}")
    return reply


# ---------------------------------------------------------------------------- set-up


class Events:
    """A worker's Subscribe stream, collected by request id on a thread."""

    def __init__(self, stub):
        self.by_id: dict[str, pb.Event] = {}
        self.cond = threading.Condition()
        self.call = stub.Subscribe(pb.SubscribeRequest())
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        try:
            for e in self.call:
                kind = e.WhichOneof("kind")
                rid = e.result.request_id if kind == "result" else e.failure.request_id
                with self.cond:
                    self.by_id[rid] = e
                    self.cond.notify_all()
        except grpc.RpcError:
            pass

    def wait(self, ids, timeout: float = 60.0) -> dict[str, pb.Event]:
        end = time.monotonic() + timeout
        with self.cond:
            while not all(i in self.by_id for i in ids):
                left = end - time.monotonic()
                assert left > 0, f"no event for {sorted(set(ids) - set(self.by_id))[:5]}"
                self.cond.wait(left)
            return {i: self.by_id.pop(i) for i in ids}

    def close(self):
        self.call.cancel()


def stage_config(stage, epoch: int = EPOCH) -> pb.StageConfig:
    """The stage's config as a coordinator sends it, but as the last stage (results go to
    Subscribe), so that one worker can be fuzzed on its own."""
    return pb.StageConfig(
        stage=0, num_stages=1, shard_sha256=stage.sha256,
        inputs=[encode_spec(s) for s in stage.inputs],
        outputs=[encode_spec(s) for s in stage.outputs],
        next_address="", epoch=epoch, plan_id="fuzz", predicted_memory_mb=100.0,
        data_files=[pb.ShardFileRef(name=f.name, sha256=f.sha256, random_access=f.random_access)
                    for f in stage.data_files],
        mode=stage.mode, protocol=PROTOCOL_VERSION)


class Env:
    def __init__(self, root: Path, model: Path):
        self.root, self.model = root, model
        self.worker = spawn_worker(root, "fuzzed", threads=1,
                                   extra_args=["--memory-budget", str(BUDGET_MB)])
        self.workers = [spawn_worker(root, f"pipe-{i}", threads=1) for i in range(2)]
        cluster = cluster_from_profile("rpi4b-2gb", 2, addresses=[w.address for w in self.workers])
        self.plan_dir = root / "plan"
        self.plan = make_plan(model, cluster.devices, self.plan_dir,
                              bindings={"batch": 1, "sequence": 16})
        assert len(self.plan.stages) == 2
        self.channel = create_channel(self.worker.address)
        self.stub = pb_grpc.WorkerStub(self.channel)
        self.pipeline = Pipeline(self.plan, self.plan_dir, deadlines=Deadlines(infer=60))
        self.pipeline.start()
        self.server, port = start_coordinator(self.pipeline, "127.0.0.1:0")
        self.coordinator_channel = create_channel(f"127.0.0.1:{port}")
        self.coordinator = pb_grpc.CoordinatorStub(self.coordinator_channel)
        self.sessions = {}
        self.events: Events | None = None

    def session(self, rel: str) -> ort.InferenceSession:
        if rel not in self.sessions:
            self.sessions[rel] = ort.InferenceSession(str(self.plan_dir / rel),
                                                      providers=["CPUExecutionProvider"])
        return self.sessions[rel]

    def upload_all(self):
        """Every shard and data file of the plan into the fuzzed worker's cache."""
        for stage in self.plan.stages:
            handle = connect(stage, self.pipeline.security)
            handle.stub = self.stub  # the fuzzed worker, not the plan's device
            upload_shard(handle, self.plan_dir, Deadlines())
            handle.close()

    def configure(self, index: int):
        self.stub.Configure(stage_config(self.plan.stages[index]), timeout=60)

    def close(self):
        if self.events:
            self.events.close()
        self.coordinator_channel.close()
        self.server.stop(0)
        self.pipeline.close()
        self.channel.close()
        for w in [self.worker, *self.workers]:
            w.stop()


@pytest.fixture(scope="module")
def env(bert_tiny, tmp_path_factory, request):
    e = Env(tmp_path_factory.mktemp("fuzz"), bert_tiny)
    request.config._edge_fuzz_counts = COUNTS  # printed by conftest's terminal summary
    try:
        yield e
    finally:
        e.close()


def model_inputs(batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, size=(batch, seq), dtype=np.int64)
    mask = np.ones((batch, seq), np.int64)
    mask[:, seq // 2 + 1:] = rng.integers(0, 2)
    return {"input_ids": ids, "attention_mask": mask}


def reference(env: Env, x: dict) -> dict[str, np.ndarray]:
    s = ort.InferenceSession(str(env.model), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, x)))


def stage0_outputs(env: Env, x: dict) -> dict[str, np.ndarray]:
    """What stage 0 sends on for ``x``: the inputs of stage 1."""
    s0 = env.plan.stages[0]
    sess = env.session(s0.shard)
    out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, x)))
    return {t.name: out[t.name] if t.name in out else x[t.name] for t in s0.outputs}


# ---------------------------------------------------------------------------- strategies

WEIRD_DTYPES = st.one_of(
    st.sampled_from(["object", "", "str", "U8", "<f4", "float32 ", "FLOAT32", "float128",
                     "complex64", "void", "datetime64", "O", "float 32", "int", "√", "🙂",
                     "float32\0", "bfloat16"]),
    st.text(max_size=12))
WEIRD_NAMES = st.one_of(
    st.sampled_from(["", " ", "../../etc/passwd", "\0", "input_ids\0", "名前", "x" * 5000]),
    st.text(max_size=30))
BAD_FLOATS = st.sampled_from([math.nan, math.inf, -math.inf, -1.0, -1e-300, -1e308])


def mutate_tensors(draw, tensors: list[pb.Tensor], specs) -> tuple[str, list[pb.Tensor], tuple]:
    """One kind of damage to a valid list of wire tensors. Returns (kind, tensors, words the
    error must contain)."""
    kind = draw(st.sampled_from(["dtype", "bytes", "huge", "negative", "rank", "fixed",
                                 "symbol", "unknown", "missing", "duplicate"]))
    i = draw(st.integers(0, len(tensors) - 1))
    t = pb.Tensor()
    t.CopyFrom(tensors[i])
    spec = {s.name: s for s in specs}[t.name]
    words: tuple = ()
    if kind == "dtype":
        t.dtype = draw(WEIRD_DTYPES)
        assume(t.dtype != spec.dtype)
        words = (("expected one of", "expects", "needs"),)
    elif kind == "bytes":
        delta = draw(st.integers(-len(t.data), 64).filter(lambda d: d != 0))
        t.data = t.data + b"\1" * delta if delta > 0 else t.data[:len(t.data) + delta]
        words = ("bytes, got",)
    elif kind == "huge":
        at = draw(st.integers(0, len(t.shape)))
        t.shape.insert(at, draw(st.sampled_from([2**35, 2**40, 2**62, 2**63 - 1])))
        words = ("elements",)
    elif kind == "negative":
        if not t.shape:
            t.shape.append(1)
        t.shape[draw(st.integers(0, len(t.shape) - 1))] = draw(st.integers(-2**63, -1))
        words = ("negative",)
    elif kind == "rank":  # same bytes, one dim more or one less
        shape = list(t.shape)
        if len(shape) >= 2 and draw(st.booleans()):
            shape[-2:] = [shape[-2] * shape[-1]]
        else:
            shape.insert(draw(st.integers(0, len(shape))), 1)
        t.shape[:] = shape
        words = ("expects",)
    elif kind == "fixed":
        fixed = [k for k, d in enumerate(spec.shape) if isinstance(d, int)]
        assume(fixed and t.shape)
        k = draw(st.sampled_from(fixed))
        new = spec.shape[k] + draw(st.sampled_from([-1, 1, 7]))
        assume(new > 0)
        itemsize = len(t.data) // max(1, int(np.prod(t.shape)))
        t.shape[k] = new
        t.data = b"\0" * (int(np.prod(t.shape)) * itemsize)
        words = ("expects",)
    elif kind == "symbol":
        sym = [k for k, d in enumerate(spec.shape) if isinstance(d, str)]
        others = [s for s in specs if s.name != t.name
                  and {d for d in s.shape if isinstance(d, str)} & {spec.shape[k] for k in sym}]
        assume(sym and others)
        k = draw(st.sampled_from(sym))
        itemsize = len(t.data) // max(1, int(np.prod(t.shape)))
        t.shape[k] = t.shape[k] + draw(st.integers(1, 3))
        t.data = b"\0" * (int(np.prod(t.shape)) * itemsize)
        words = ("dimension",)
    out = [x for x in tensors]
    if kind == "unknown":
        name = draw(WEIRD_NAMES)
        assume(name not in {s.name for s in specs})
        t.name = name
        out.append(t)
        words = ("unknown tensor",)
    elif kind == "missing":
        del out[i]
        words = ("missing tensor",)
    elif kind == "duplicate":
        out.append(t)
        words = ("sent twice",)
    else:
        out[i] = t
    return kind, out, words


# ---------------------------------------------------------------------------- worker


def test_before_configure_forward_is_a_precondition(env):
    """The fuzzed worker has no stage yet."""
    x = model_inputs(1, 4, 0)
    call("Worker.Forward", lambda: env.stub.Forward(
        pb.Activation(request_id="early", epoch=EPOCH, tensors=encode_tensors(x)), timeout=10),
        {PRECONDITION}, "configure")
    call("Worker.GetStatus", lambda: env.stub.GetStatus(pb.StatusRequest(), timeout=10), {OK})


@pytest.mark.parametrize("index", [0, 1])
def test_forward(env, index):
    """Stage 0 (token ids) and stage 1 (floats and shape tensors) of bert-tiny, fed valid,
    NaN/inf, out-of-range and malformed activations."""
    env.upload_all()
    env.configure(index)
    if env.events is None:
        env.events = Events(env.stub)
    stage = env.plan.stages[index]
    specs = stage.inputs
    accepted: dict[str, str] = {}  # request id -> what must come of it
    counter = iter(range(10**9))

    def valid(batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
        x = model_inputs(batch, seq, seed)
        return x if index == 0 else stage0_outputs(env, x)

    @fuzz_settings(300)
    @given(st.data())
    def run(data):
        draw = data.draw
        batch, seq = draw(st.integers(1, 2)), draw(st.integers(1, 8))
        arrays = valid(batch, seq, draw(st.integers(0, 3)))
        rid = f"{next(counter)}-{draw(st.text(max_size=8))}"
        epoch = EPOCH
        kind = draw(st.sampled_from(["valid", "values", "tensors", "tensors", "tensors",
                                     "epoch", "request_id", "empty"]))
        expect, words, outcome = {INVALID}, (), None
        tensors = encode_tensors(arrays)
        if kind == "valid":
            expect, outcome = {OK, EXHAUSTED}, "result"
        elif kind == "empty":
            # No elements, so the bytes agree with any shape: a 0 in one symbolic dim, and
            # the other one anything, up to 2**62.
            sizes = {"batch": 0, "sequence": draw(st.sampled_from([0, 1, 2**20, 2**40, 2**62]))}
            if draw(st.booleans()):
                sizes = {"batch": sizes["sequence"], "sequence": 0}
            tensors = [pb.Tensor(name=t.name, dtype=t.dtype, shape=[
                sizes[d] if isinstance(d, str) else (d if d is not None else 1)
                for d in t.shape]) for t in specs]
            if index == 1:  # the shape tensors it receives are not empty: keep them
                tensors = [x if any(isinstance(d, str) for d in sp.shape) else encode_tensor(
                    sp.name, arrays[sp.name]) for x, sp in zip(tensors, specs)]
            expect, outcome = {OK, INVALID}, "any"
        elif kind == "values":
            # Values the contract cannot rule out: NaN and inf in floats, token ids out of
            # the vocabulary, garbage in the shape tensors stage 1 receives.
            name = draw(st.sampled_from([s.name for s in specs]))
            a = arrays[name].copy()
            flat = a.reshape(-1)
            if a.dtype.kind == "f":
                flat[draw(st.integers(0, flat.size - 1))] = draw(st.sampled_from(
                    [np.nan, np.inf, -np.inf, 3e38]))
                outcome = "result"
            else:
                flat[draw(st.integers(0, flat.size - 1))] = draw(st.one_of(
                    st.integers(VOCAB, 2**63 - 1), st.integers(-2**63, -VOCAB - 1)))
                outcome = "any"
            arrays[name] = a
            tensors = encode_tensors(arrays)
            expect = {OK, EXHAUSTED}
        elif kind == "tensors":
            kind, tensors, words = mutate_tensors(draw, tensors, specs)
        elif kind == "epoch":
            epoch = draw(st.one_of(st.integers(0, EPOCH - 1), st.integers(EPOCH + 1, 2**64 - 1)))
            expect, words = {PRECONDITION}, ("epoch",)
        elif kind == "request_id":
            rid = draw(st.sampled_from(["", "x" * 5000]))
            words = ("request id",)
        timings = draw(st.lists(st.builds(
            pb.StageTiming, stage=st.integers(0, 2**32 - 1),
            queue_ms=st.floats(allow_nan=True, allow_infinity=True),
            received_unix_ns=st.integers(0, 2**64 - 1)), max_size=3))
        message = pb.Activation(request_id=rid, epoch=epoch, tensors=tensors, timings=timings)
        reply = call("Worker.Forward", lambda: env.stub.Forward(message, timeout=30), expect,
                     *words)
        if reply is not None and outcome:
            accepted[rid] = outcome

    run()
    events = env.events.wait(list(accepted))
    for rid, outcome in accepted.items():
        e = events[rid]
        kind = e.WhichOneof("kind")
        if kind == "failure":
            code = grpc.StatusCode(next(c.value for c in grpc.StatusCode
                                        if c.value[0] == e.failure.code))
            assert outcome == "any" and code in (INVALID, EXHAUSTED), (
                rid, code, e.failure.message)
            assert "could not run" in e.failure.message
        else:
            assert outcome in ("result", "any"), (rid, outcome)
            assert e.result.epoch == EPOCH and {t.name for t in e.result.tensors} == {
                s.name for s in stage.outputs}
    assert sum(o == "result" for o in accepted.values()) >= 20
    assert env.worker.process.poll() is None, env.worker.log()


def test_forward_burst_is_refused_not_dropped(env):
    """More requests at once than the worker queues: each is accepted (and answered) or
    refused with RESOURCE_EXHAUSTED, none is lost."""
    env.configure(0)
    if env.events is None:
        env.events = Events(env.stub)
    x = encode_tensors(model_inputs(2, 16, 3))
    futures = {f"burst-{i}": env.stub.Forward.future(
        pb.Activation(request_id=f"burst-{i}", epoch=EPOCH, tensors=x), timeout=30)
        for i in range(160)}
    accepted = [rid for rid, f in futures.items()
                if call("Worker.Forward", f.result, {OK, EXHAUSTED}, "queued") is not None]
    events = env.events.wait(accepted)
    assert all(e.WhichOneof("kind") == "result" for e in events.values())
    assert accepted


def test_upload_shard(env):
    def chunks(header: pb.ShardHeader | None, data: bytes, step: int = 7):
        if header is not None:
            yield pb.ShardChunk(header=header)
        for k in range(0, len(data), step):
            yield pb.ShardChunk(data=data[k:k + step])

    @fuzz_settings(300)
    @given(st.data())
    def run(data):
        draw = data.draw
        body = draw(st.binary(min_size=1, max_size=300))
        sha = hashlib.sha256(body).hexdigest()
        name = draw(WEIRD_NAMES)
        kind = draw(st.sampled_from(["ok", "other_sha", "short", "long", "no_header",
                                     "empty", "data_first", "two_headers", "empty_chunk",
                                     "size0", "huge", "bad_sha"]))
        header = pb.ShardHeader(sha256=sha, size=len(body), name=name)
        request = None
        if kind == "ok":
            expect, words = {OK}, ()
        elif kind == "other_sha":
            header.sha256 = hashlib.sha256(body + b"!").hexdigest()
            expect, words = {DATA_LOSS}, ("does not match its sha256",)
        elif kind == "short":
            header.size = len(body) + draw(st.integers(1, 1000))
            expect, words = {DATA_LOSS}, ("truncated",)
        elif kind == "long":
            assume(len(body) > 1)
            header.size = draw(st.integers(1, len(body) - 1))
            expect, words = {DATA_LOSS}, ("longer than announced",)
        elif kind == "no_header":
            request = chunks(None, body)
            expect, words = {INVALID}, ("must start with a ShardHeader",)
        elif kind == "empty":
            request = iter([])
            expect, words = {INVALID}, ("must start with a ShardHeader",)
        elif kind == "data_first":
            request = iter([pb.ShardChunk(data=body), pb.ShardChunk(header=header)])
            expect, words = {INVALID}, ("must start with a ShardHeader",)
        elif kind == "two_headers":
            cut = draw(st.integers(0, len(body)))
            request = iter([pb.ShardChunk(header=header), pb.ShardChunk(data=body[:cut]),
                            pb.ShardChunk(header=header), pb.ShardChunk(data=body[cut:])])
            expect, words = {INVALID}, ("second header",)
        elif kind == "empty_chunk":
            request = iter([pb.ShardChunk(header=header), pb.ShardChunk(),
                            pb.ShardChunk(data=body)])
            expect, words = {INVALID}, ("neither",)
        elif kind == "size0":
            header.size = 0
            expect, words = {INVALID}, ("size",)
        elif kind == "huge":
            header.size = draw(st.integers((8 << 30) + 1, 2**64 - 1))
            expect, words = {EXHAUSTED}, ("bytes",)
        else:
            header.sha256 = draw(st.one_of(WEIRD_NAMES, st.just(sha.upper()), st.just(sha[:-1])))
            expect, words = {INVALID}, ("64 lowercase hex",)
        if request is None:
            request = chunks(header, body, draw(st.integers(1, 400)))
        reply = call("Worker.UploadShard", lambda: env.stub.UploadShard(request, timeout=30),
                     expect, *words)
        if reply is not None:
            assert reply.sha256 == sha and reply.size == len(body)
            assert env.stub.HasShard(pb.ShardRef(sha256=sha), timeout=10).present

    run()
    assert not list(env.worker.cache_dir.glob(".incoming-*")), "partial uploads must be removed"


def test_has_shard(env):
    @fuzz_settings(150)
    @given(st.one_of(WEIRD_NAMES, st.text(alphabet="0123456789abcdefABCDEF", min_size=62,
                                          max_size=66)))
    def run(sha):
        valid = len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)
        reply = call("Worker.HasShard", lambda: env.stub.HasShard(pb.ShardRef(sha256=sha),
                                                                  timeout=10),
                     {OK} if valid else {INVALID}, "64 lowercase hex")
        if reply is not None:
            assert reply.present == (env.worker.cache_dir / sha).is_file()

    run()


def test_configure(env):
    """Bad StageConfigs are refused with the right code; the stage it served stays."""
    env.upload_all()
    env.configure(1)
    stages = env.plan.stages
    garbage = b"not an onnx model at all" * 10
    garbage_sha = hashlib.sha256(garbage).hexdigest()
    env.stub.UploadShard(iter([pb.ShardChunk(header=pb.ShardHeader(sha256=garbage_sha,
                                                                   size=len(garbage))),
                               pb.ShardChunk(data=garbage)]), timeout=10)

    @fuzz_settings(250)
    @given(st.data())
    @example(None)
    def run(data):
        if data is None:  # one valid re-configuration of each stage
            for stage in stages:
                cfg = stage_config(stage)
                call("Worker.Configure", lambda: env.stub.Configure(cfg, timeout=60), {OK})
            return
        draw = data.draw
        k = draw(st.integers(0, 1))
        cfg = stage_config(stages[k])
        kind = draw(st.sampled_from([
            "mode", "protocol", "sha_invalid", "sha_missing", "data_name", "data_sha",
            "data_dup", "spec_dtype", "spec_name", "spec_dup", "spec_dim", "output",
            "memory", "budget", "stage", "next_address", "other_shard", "garbage_shard"]))
        if kind == "mode":
            cfg.mode = draw(st.one_of(WEIRD_NAMES, st.sampled_from(["FP32", "int4", "fp16"])))
            assume(cfg.mode not in ("", "fp32", "fp32-lean", "int8"))
            expect, words = {INVALID}, ("unknown mode",)
        elif kind == "protocol":
            cfg.protocol = draw(st.integers(0, 2**32 - 1).filter(lambda p: p != PROTOCOL_VERSION))
            expect, words = {PRECONDITION}, ("protocol",)
        elif kind == "sha_invalid":
            cfg.shard_sha256 = draw(st.one_of(WEIRD_NAMES, st.just(cfg.shard_sha256.upper())))
            expect, words = {INVALID}, ("64 lowercase hex",)
        elif kind == "sha_missing":
            cfg.shard_sha256 = hashlib.sha256(draw(st.binary(min_size=1))).hexdigest()
            assume(not (env.worker.cache_dir / cfg.shard_sha256).exists())
            expect, words = {PRECONDITION}, ("upload",)
        elif kind == "data_name":
            assume(cfg.data_files)
            cfg.data_files[draw(st.integers(0, len(cfg.data_files) - 1))].name = draw(
                st.one_of(st.sampled_from(["../../etc/passwd", "/etc/passwd", "a\0b", "",
                                           ".hidden", "model.onnx", "a/b", "..", "名前",
                                           "x" * 300]),
                          st.text(max_size=20).map(lambda s: "../" + s)))
            expect, words = {INVALID}, ("plain file name",)
        elif kind == "data_sha":
            assume(cfg.data_files)
            bad = draw(st.one_of(WEIRD_NAMES, st.binary(min_size=1).map(
                lambda b: hashlib.sha256(b).hexdigest())))
            cfg.data_files[0].sha256 = bad
            is_sha = len(bad) == 64 and all(c in "0123456789abcdef" for c in bad)
            assume(not (is_sha and (env.worker.cache_dir / bad).is_file()))
            expect = {PRECONDITION if is_sha else INVALID}
            words = ("upload",) if PRECONDITION in expect else ("64 lowercase hex",)
        elif kind == "data_dup":
            assume(cfg.data_files)
            dup = cfg.data_files.add()
            dup.CopyFrom(cfg.data_files[0])
            if draw(st.booleans()):
                dup.sha256 = stages[1 - k].sha256
            expect, words = {INVALID}, ("twice",)
        elif kind == "spec_dtype":
            spec = draw(st.sampled_from(list(cfg.inputs) + list(cfg.outputs)))
            spec.dtype = draw(WEIRD_DTYPES)
            assume(spec.dtype != next(s.dtype for s in stages[k].inputs + stages[k].outputs
                                      if s.name == spec.name))
            expect, words = {INVALID}, ("dtype",)
        elif kind == "spec_name":
            spec = draw(st.sampled_from(list(cfg.inputs)))
            spec.name = draw(WEIRD_NAMES)
            assume(spec.name not in {s.name for s in stages[k].inputs})
            expect, words = {INVALID}, ()
        elif kind == "spec_dup":
            specs = draw(st.sampled_from([cfg.inputs, cfg.outputs]))
            specs.add().CopyFrom(specs[0])
            expect, words = {INVALID}, ("twice",)
        elif kind == "spec_dim":
            spec = draw(st.sampled_from(list(cfg.inputs)))
            spec.shape.add().size = draw(st.integers(-2**63, -1))
            expect, words = {INVALID}, ("negative",)
        elif kind == "output":
            cfg.outputs.add().CopyFrom(encode_spec(stages[k].inputs[0]))
            cfg.outputs[-1].name = draw(WEIRD_NAMES)
            assume(cfg.outputs[-1].name not in {s.name for s in stages[k].inputs + stages[k].outputs})
            expect, words = {INVALID}, ()
        elif kind == "memory":
            cfg.predicted_memory_mb = draw(BAD_FLOATS)
            expect, words = {INVALID}, ("predicted_memory_mb",)
        elif kind == "budget":
            cfg.predicted_memory_mb = draw(st.floats(BUDGET_MB + 1, 1e300))
            expect, words = {EXHAUSTED}, ("budget",)
        elif kind == "stage":
            cfg.num_stages = draw(st.integers(0, 5))
            cfg.stage = draw(st.integers(cfg.num_stages, 2**32 - 1))
            expect, words = {INVALID}, ("stage",)
        elif kind == "next_address":
            cfg.next_address = draw(st.one_of(
                st.sampled_from(["\0", "host", "host:", ":50051", "host:0", "host:99999",
                                 "host:port", "a b:1", "[::1:80", "unix:/tmp/x\0"]),
                st.text(max_size=20).filter(lambda s: ":" not in s and s)))
            expect, words = {INVALID}, ("host:port",)
        elif kind == "other_shard":
            cfg.shard_sha256 = stages[1 - k].sha256
            expect, words = {INVALID}, ()
        else:
            cfg.shard_sha256 = garbage_sha
            del cfg.data_files[:]
            expect, words = {INVALID}, ("cannot load shard",)
        call("Worker.Configure", lambda: env.stub.Configure(cfg, timeout=60), expect, *words)

    run()
    status = env.stub.GetStatus(pb.StatusRequest(), timeout=10)
    assert status.configured and status.epoch == EPOCH

    # A next hop that nobody answers at: the configuration is fine, each request fails
    # UNAVAILABLE naming the address, and the worker goes on.
    if env.events is None:
        env.events = Events(env.stub)
    cfg = stage_config(stages[1])
    cfg.next_address, cfg.num_stages = "127.0.0.1:1", 2
    call("Worker.Configure", lambda: env.stub.Configure(cfg, timeout=60), {OK})
    x = stage0_outputs(env, model_inputs(1, 5, 1))
    call("Worker.Forward", lambda: env.stub.Forward(pb.Activation(
        request_id="nowhere", epoch=EPOCH, tensors=encode_tensors(x)), timeout=10), {OK})
    failure = env.events.wait(["nowhere"])["nowhere"].failure
    assert failure.code == grpc.StatusCode.UNAVAILABLE.value[0] and "127.0.0.1:1" in failure.message
    env.configure(1)


def test_configure_with_tampered_cache_is_data_loss(env):
    """A shard or data file whose cached bytes no longer match the plan is not loaded."""
    env.upload_all()
    stage = env.plan.stages[0]
    for sha, name in [(stage.sha256, "model.onnx")] + [(f.sha256, f.name)
                                                       for f in stage.data_files]:
        cached = env.worker.cache_dir / sha
        data = bytearray(cached.read_bytes())
        data[len(data) // 2] ^= 0x55
        cached.write_bytes(bytes(data))
        call("Worker.Configure", lambda: env.stub.Configure(stage_config(stage), timeout=60),
             {DATA_LOSS}, "does not match the plan", name if name != "model.onnx" else "")
        env.upload_all()  # the damaged file was dropped: upload it again
    env.configure(0)


def test_get_profile(env):
    @fuzz_settings(100)
    @given(st.one_of(st.floats(allow_nan=True, allow_infinity=True), BAD_FLOATS,
                     st.just(time.time())))
    def run(since):
        valid = math.isfinite(since) and since >= 0
        reply = call("Worker.GetProfile", lambda: env.stub.GetProfile(
            pb.ProfileRequest(since=since), timeout=10), {OK} if valid else {INVALID}, "since")
        if reply is not None:
            assert all(s.time > since for s in reply.samples)

    run()


def test_calibrate(env):
    @fuzz_settings(100)
    @given(st.one_of(st.just(0.0), BAD_FLOATS, st.floats(60.001, 1e308)),
           st.one_of(st.binary(max_size=1024), st.sampled_from([1 << 20, 3 << 20])))
    @example(0.01, b"")  # the one real benchmark: at least 3 runs, bounded
    def run(seconds, payload):
        if isinstance(payload, int):  # drawn as a size: a repr of megabytes helps nobody
            payload = b"\xff" * payload
        valid = math.isfinite(seconds) and 0 <= seconds <= 60
        reply = call("Worker.Calibrate", lambda: env.stub.Calibrate(
            pb.CalibrateRequest(seconds=seconds, payload=payload), timeout=60),
            {OK, PRECONDITION} if valid else {INVALID}, "seconds" if not valid else "")
        if reply is not None:
            assert reply.startup_rss_bytes > 0 and reply.facts.cpu_count >= 1
            assert (reply.runs >= 3 and reply.gflops > 0) if seconds > 0 else reply.runs == 0

    run()


def test_subscribe_is_bounded(env):
    """Subscribe streams hold a server thread each: past a limit they are refused with
    RESOURCE_EXHAUSTED, and the worker still answers."""
    from edge.worker.server import MAX_SUBSCRIBERS

    extra = 4
    streams = [env.stub.Subscribe(pb.SubscribeRequest(), timeout=30)
               for _ in range(MAX_SUBSCRIBERS + extra)]  # one more is already open: Events
    try:
        end = time.monotonic() + 10
        while sum(s.done() for s in streams) < extra + 1 and time.monotonic() < end:
            time.sleep(0.02)
        refused = [s for s in streams if s.done()]
        for s in streams:
            COUNTS["Worker.Subscribe"] += 1
        assert len(refused) == extra + 1, [(s.code(), s.details()) for s in refused]
        for s in refused:
            assert s.code() == EXHAUSTED and "subscribers" in s.details(), s.details()
        call("Worker.GetStatus", lambda: env.stub.GetStatus(pb.StatusRequest(), timeout=5), {OK})
    finally:
        for s in streams:
            s.cancel()
    # the slots come back once the streams are gone
    end = time.monotonic() + 10
    while True:
        s = env.stub.Subscribe(pb.SubscribeRequest(), timeout=0.5)
        try:
            next(s)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                break
            assert e.code() == EXHAUSTED and time.monotonic() < end, e.details()
            time.sleep(0.1)


# ---------------------------------------------------------------------------- raw bytes


def _methods(service: str):
    desc = pb.DESCRIPTOR.services_by_name[service]
    return [(f"{service}.{m.name}", f"/{desc.full_name}/{m.name}", getattr(pb, m.input_type.name),
             m.client_streaming, m.server_streaming) for m in desc.methods]


def raw_bytes(sample: bytes):
    """Bytes that may or may not be a message: random, or a valid one damaged."""
    def damage(args):
        cut, pos, flip, tail = args
        b = bytearray(sample[:cut] if cut < len(sample) else sample)
        if b:
            b[pos % len(b)] ^= flip
        return bytes(b) + tail
    return st.one_of(
        st.binary(max_size=80),
        st.tuples(st.integers(0, len(sample)), st.integers(0, 10**6), st.integers(1, 255),
                  st.binary(max_size=8)).map(damage),
        st.sampled_from([b"\xff", b"\x0a\xff\xff\xff\xff\x0f", b"\x08" * 11, b"\x12\x05ab"]))


def raw_call(channel, rpc, path, request_type, client_streaming, server_streaming, data):
    if client_streaming:
        fn = channel.stream_unary(path, request_serializer=None, response_deserializer=None)
        return lambda: fn(iter(data), timeout=10)
    if server_streaming:
        fn = channel.unary_stream(path, request_serializer=None, response_deserializer=None)

        def subscribe():
            stream = fn(data, timeout=0.3)
            try:
                for _ in stream:
                    break
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise  # a stream that was accepted just waits: that is its deadline
            finally:
                stream.cancel()
        return subscribe
    fn = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
    return lambda: fn(data, timeout=30)


def _parses(request_type, data) -> bool:
    try:
        request_type.FromString(data)
        return True
    except DecodeError:
        return False


def _raw_samples(env) -> dict[str, bytes]:
    s = env.plan.stages[0]
    return {
        "Forward": pb.Activation(request_id="r", epoch=EPOCH, tensors=encode_tensors(
            model_inputs(1, 3, 0))).SerializeToString(),
        "Configure": stage_config(s).SerializeToString(),
        "UploadShard": pb.ShardChunk(header=pb.ShardHeader(sha256=s.sha256, size=9)
                                     ).SerializeToString(),
        "HasShard": pb.ShardRef(sha256=s.sha256).SerializeToString(),
        "Calibrate": pb.CalibrateRequest(payload=b"abc").SerializeToString(),
        "GetProfile": pb.ProfileRequest(since=1.5).SerializeToString(),
        "Infer": pb.InferRequest(inputs=encode_tensors(model_inputs(1, 3, 0))).SerializeToString(),
        "GetClusterProfile": pb.ProfileRequest(since=1.5).SerializeToString(),
    }


@pytest.mark.parametrize("service, method", [(s, m.name) for s in ("Worker", "Coordinator")
                                             for m in pb.DESCRIPTOR.services_by_name[s].methods])
def test_raw_bytes(env, service, method):
    """Bytes on the wire that are not the request message: INVALID_ARGUMENT, naming the
    message expected; bytes that do parse get an ordinary answer. Never INTERNAL/UNKNOWN."""
    env.configure(0) if service == "Worker" and method == "Forward" else None
    channel = env.channel if service == "Worker" else env.coordinator_channel
    rpc, path, request_type, cs, ss = next(m for m in _methods(service) if m[0].endswith(
        "." + method))
    sample = _raw_samples(env).get(method, b"")
    n = 50 if ss else 120

    @fuzz_settings(n)
    @given(st.lists(raw_bytes(sample), min_size=1, max_size=3) if cs else raw_bytes(sample))
    def run(data):
        parts = data if cs else [data]
        parsed = [_parses(request_type, b) for b in parts]
        if method == "Calibrate" and all(parsed):
            seconds = request_type.FromString(data).seconds
            assume(not 0 < seconds <= 60)  # a real benchmark: covered in test_calibrate
        fn = raw_call(channel, rpc, path, request_type, cs, ss, data)
        if all(parsed):
            call(rpc, fn, set(grpc.StatusCode) - NEVER)
        elif not parsed[0]:
            call(rpc, fn, {INVALID}, f"expected a serialized {request_type.DESCRIPTOR.full_name}")
        else:  # a stream whose first message parsed may be refused for that one first
            call(rpc, fn, {INVALID})

    run()


# ---------------------------------------------------------------------------- coordinator


def test_infer(env):
    specs = env.plan.model.inputs
    checked = [0]

    @fuzz_settings(250)
    @given(st.data())
    def run(data):
        draw = data.draw
        batch, seq = draw(st.integers(1, 2)), draw(st.integers(1, 12))
        x = model_inputs(batch, seq, draw(st.integers(0, 5)))
        kind = draw(st.sampled_from(["valid", "ids", "long", "empty", "tensors", "tensors",
                                     "tensors"]))
        tensors = encode_tensors(x)
        words: tuple = ()
        if kind == "valid":
            expect = {OK}
        elif kind == "ids":
            x["input_ids"].reshape(-1)[draw(st.integers(0, batch * seq - 1))] = draw(st.one_of(
                st.integers(VOCAB, 2**63 - 1), st.integers(-2**63, -VOCAB - 1)))
            tensors = encode_tensors(x)
            expect, words = {INVALID}, ("could not run",)
        elif kind == "long":
            x = model_inputs(1, draw(st.integers(513, 700)), 0)
            tensors = encode_tensors(x)
            # past the positions the model has; the coordinator may first find it more
            # than a device holds (the plan is for sequence 16)
            expect, words = {INVALID, EXHAUSTED}, ()
        elif kind == "empty":  # no elements: any size goes with the 0
            dims = [0, draw(st.sampled_from([0, 1, 7, 2**20, 2**33, 2**40, 2**62]))]
            dims = dims[::-1] if draw(st.booleans()) else dims
            tensors = [pb.Tensor(name=s.name, dtype=s.dtype, shape=dims) for s in specs]
            # a sequence past the plan's may be refused for memory: tensors that do not
            # grow with the batch (position embeddings) still grow with the sequence
            expect = {OK, INVALID, EXHAUSTED}
        else:
            kind, tensors, words = mutate_tensors(draw, tensors, specs)
            expect = {INVALID}
        reply = call("Coordinator.Infer", lambda: env.coordinator.Infer(
            pb.InferRequest(inputs=tensors), timeout=60), expect, *words)
        if reply is not None and checked[0] < 10:  # a few against onnxruntime
            checked[0] += 1
            want = reference(env, x)
            got = decode_tensors(reply.outputs)
            for k in want:
                np.testing.assert_allclose(got[k], want[k], atol=1e-4, rtol=0)

    run()


def test_cluster_status_and_profile(env):
    @fuzz_settings(80)
    @given(st.one_of(st.floats(allow_nan=True, allow_infinity=True), BAD_FLOATS))
    def run(since):
        valid = math.isfinite(since) and since >= 0
        reply = call("Coordinator.GetClusterProfile", lambda: env.coordinator.GetClusterProfile(
            pb.ProfileRequest(since=since), timeout=30), {OK} if valid else {INVALID}, "since")
        if reply is not None:
            assert len(reply.stages) == 2 and not any(s.error for s in reply.stages)

    run()
    status = call("Coordinator.GetClusterStatus", lambda: env.coordinator.GetClusterStatus(
        pb.ClusterStatusRequest(), timeout=30), {OK})
    assert all(s.healthy for s in status.stages)


# ---------------------------------------------------------------------------- afterwards


def test_still_alive_and_correct(env):
    """After all of the above: the worker process lives and computes what onnxruntime does,
    and so does the pipeline behind the coordinator."""
    assert env.worker.process.poll() is None, env.worker.log()
    for w in env.workers:
        assert w.process.poll() is None, w.log()
    x = model_inputs(2, 11, 42)
    want = reference(env, x)
    env.configure(1)
    rid = "final"
    env.stub.Forward(pb.Activation(request_id=rid, epoch=EPOCH,
                                   tensors=encode_tensors(stage0_outputs(env, x))), timeout=10)
    got = decode_tensors(env.events.wait([rid])[rid].result.tensors)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=1e-4, rtol=0)
    reply = env.coordinator.Infer(pb.InferRequest(inputs=encode_tensors(x)), timeout=60)
    got = decode_tensors(reply.outputs)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=1e-4, rtol=0)
    status = env.stub.GetStatus(pb.StatusRequest(), timeout=10)
    assert status.requests_done > 0
    low = {rpc: COUNTS[rpc] for rpc in MINIMUM if COUNTS[rpc] < MINIMUM[rpc]}
    assert not low, f"too few fuzz cases: {low} (minimum {MINIMUM})"
