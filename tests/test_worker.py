"""A worker process on its own: uploads, configuration, bad input, restarts, imports.

The shard here is a small hand-built ONNX graph, so these tests need no planner; the
end-to-end tests cover real models.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge.planning.plan import TensorSpec
from edge.proto import edge_pb2 as pb
from edge.proto import edge_pb2_grpc as pb_grpc
from edge.transport.channels import create_channel
from edge.transport.codec import PROTOCOL_VERSION, decode_tensors, encode_spec, encode_tensors
from edge.worker.launch import spawn_worker
from helpers import Events

W = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
B = np.arange(3, dtype=np.float32)
INPUTS = (TensorSpec("x", "float32", ("batch", 4)), TensorSpec("keep", "int64", ("batch",)))
OUTPUTS = (TensorSpec("y", "float32", ("batch", 3)), TensorSpec("keep", "int64", ("batch",)))


def make_shard(path: Path) -> str:
    """y = relu(x @ W + b); `keep` only passes through the stage."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "B"], ["z"]),
         helper.make_node("Relu", ["z"], ["y"])],
        "shard",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def expected(x: np.ndarray) -> np.ndarray:
    return np.maximum(x @ W + B, 0)


def chunks(sha: str, data: bytes, size: int | None = None, step: int = 100):
    yield pb.ShardChunk(header=pb.ShardHeader(sha256=sha, size=len(data) if size is None else size))
    for i in range(0, len(data), step):
        yield pb.ShardChunk(data=data[i:i + step])


def config(sha: str, epoch: int = 1) -> pb.StageConfig:
    return pb.StageConfig(stage=0, num_stages=1, shard_sha256=sha, epoch=epoch,
                          protocol=PROTOCOL_VERSION,
                          inputs=[encode_spec(s) for s in INPUTS],
                          outputs=[encode_spec(s) for s in OUTPUTS])


@pytest.fixture
def shard(tmp_path):
    path = tmp_path / "shard.onnx"
    return path, make_shard(path)


@pytest.fixture
def worker(tmp_path):
    w = spawn_worker(tmp_path / "w", "w0")
    channel = create_channel(w.address)
    try:
        yield w, pb_grpc.WorkerStub(channel)
    finally:
        channel.close()
        w.stop()


def upload_and_configure(stub, shard):
    path, sha = shard
    stub.UploadShard(chunks(sha, path.read_bytes()), timeout=10)
    stub.Configure(config(sha), timeout=30)


def forward(stub, request_id: str, arrays: dict, epoch: int = 1):
    return stub.Forward(pb.Activation(request_id=request_id, epoch=epoch,
                                      tensors=encode_tensors(arrays)), timeout=10)


def good_inputs(batch: int = 2, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((batch, 4)).astype(np.float32),
            "keep": np.arange(batch, dtype=np.int64) + 7}


def assert_serves(stub, events, request_id="ok"):
    x = good_inputs(3, seed=5)
    forward(stub, request_id, x)
    event = events.next()
    assert event.WhichOneof("kind") == "result" and event.result.request_id == request_id
    out = decode_tensors(event.result.tensors)
    np.testing.assert_allclose(out["y"], expected(x["x"]), rtol=1e-6)
    np.testing.assert_array_equal(out["keep"], x["keep"])


def test_serves_its_stage_and_passes_tensors_through(worker, shard):
    w, stub = worker
    upload_and_configure(stub, shard)
    events = Events(stub)
    try:
        for i in range(5):
            assert_serves(stub, events, f"r{i}")
    finally:
        events.close()
    status = stub.GetStatus(pb.StatusRequest(), timeout=5)
    assert status.configured and status.shard_sha256 == shard[1]
    assert status.requests_done == 5 and status.requests_failed == 0
    assert status.peak_rss_bytes >= status.rss_bytes > 10 * 2**20
    assert status.facts.cpu_count >= 1 and status.facts.memory_total_bytes > 0


@pytest.mark.parametrize("arrays, message", [
    ({"x": np.zeros((2, 4), np.float64), "keep": np.zeros(2, np.int64)},
     r"stage 0 expects x float32\[batch,4\], got float64\[2,4\]"),
    ({"x": np.zeros((2, 5), np.float32), "keep": np.zeros(2, np.int64)},
     r"stage 0 expects x float32\[batch,4\], got float32\[2,5\]"),
    ({"x": np.zeros((2, 4), np.float32), "keep": np.zeros(3, np.int64)},
     r"dimension 'batch' is 2 in x but 3 in keep"),
    ({"x": np.zeros((2, 4), np.float32), "keep": np.zeros(2, np.int64), "z": np.zeros(1)},
     r"unknown tensor\(s\) z"),
    ({"x": np.zeros((2, 4), np.float32)}, r"missing tensor\(s\) keep int64\[batch\]"),
])
def test_bad_tensors_get_invalid_argument_and_worker_keeps_serving(worker, shard, arrays, message):
    w, stub = worker
    upload_and_configure(stub, shard)
    events = Events(stub)
    try:
        with pytest.raises(grpc.RpcError) as e:
            forward(stub, "bad", arrays)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert pytest.importorskip("re").search(message, e.value.details()), e.value.details()
        assert_serves(stub, events)
    finally:
        events.close()
    assert w.process.poll() is None


def test_byte_length_disagreeing_with_shape(worker, shard):
    w, stub = worker
    upload_and_configure(stub, shard)
    bad = pb.Tensor(name="x", dtype="float32", shape=[2, 4], data=b"\0" * 31)
    keep = encode_tensors({"keep": np.zeros(2, np.int64)})
    with pytest.raises(grpc.RpcError) as e:
        stub.Forward(pb.Activation(request_id="r", epoch=1, tensors=[bad, *keep]), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "needs 32 bytes, got 31" in e.value.details()


def test_corrupt_and_truncated_uploads_are_refused(worker, shard):
    w, stub = worker
    path, sha = shard
    data = path.read_bytes()
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    cases = [
        (chunks(sha, bytes(flipped)), grpc.StatusCode.DATA_LOSS, "does not match its sha256"),
        (chunks(sha, data[:-10], size=len(data)), grpc.StatusCode.DATA_LOSS, "truncated"),
        (chunks("../../etc/passwd", data), grpc.StatusCode.INVALID_ARGUMENT, "64 lowercase hex"),
        (iter([pb.ShardChunk(data=b"x")]), grpc.StatusCode.INVALID_ARGUMENT, "must start with"),
    ]
    for request, code, message in cases:
        with pytest.raises(grpc.RpcError) as e:
            stub.UploadShard(request, timeout=10)
        assert e.value.code() == code and message in e.value.details(), e.value.details()
        assert not stub.HasShard(pb.ShardRef(sha256=sha), timeout=5).present
    assert not list(w.cache_dir.glob(".incoming-*")), "partial uploads must be cleaned up"
    upload_and_configure(stub, shard)  # still serving, and a good upload works
    assert stub.HasShard(pb.ShardRef(sha256=sha), timeout=5).present


def test_tampered_cache_file_is_not_loaded(worker, shard):
    w, stub = worker
    path, sha = shard
    stub.UploadShard(chunks(sha, path.read_bytes()), timeout=10)
    cached = w.cache_dir / sha
    cached.write_bytes(cached.read_bytes()[:-1] + b"\0")
    with pytest.raises(grpc.RpcError) as e:
        stub.Configure(config(sha), timeout=30)
    assert e.value.code() == grpc.StatusCode.DATA_LOSS and "does not match the plan" in e.value.details()


def test_forward_before_configure_and_unknown_shard(worker, shard):
    w, stub = worker
    with pytest.raises(grpc.RpcError) as e:
        forward(stub, "r", good_inputs())
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as e:
        stub.Configure(config("0" * 64), timeout=10)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "upload them first" in e.value.details()


def test_stale_epoch_is_refused(worker, shard):
    w, stub = worker
    upload_and_configure(stub, shard)
    with pytest.raises(grpc.RpcError) as e:
        forward(stub, "r", good_inputs(), epoch=99)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "epoch" in e.value.details()


def test_sigterm_stops_gracefully_and_restart_reuses_cache(tmp_path, shard):
    w = spawn_worker(tmp_path, "w0")
    with create_channel(w.address) as channel:
        stub = pb_grpc.WorkerStub(channel)
        stub.UploadShard(chunks(shard[1], shard[0].read_bytes()), timeout=10)
    assert w.stop() == 0, w.log()
    again = spawn_worker(tmp_path, "w0b", cache_dir=w.cache_dir)
    try:
        with create_channel(again.address) as channel:
            stub = pb_grpc.WorkerStub(channel)
            assert stub.HasShard(pb.ShardRef(sha256=shard[1]), timeout=5).present
            stub.Configure(config(shard[1]), timeout=30)  # no upload needed
    finally:
        again.stop()


def test_health_service_is_standard(worker):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    w, _ = worker
    with create_channel(w.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="edge.v1.Worker"), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_worker_never_imports_torch(worker):
    w, _ = worker
    maps = Path(f"/proc/{w.process.pid}/maps").read_text()
    assert "libtorch" not in maps and "onnxruntime" in maps
    import subprocess
    import sys

    code = ("import sys, edge.cli, edge.worker.server, edge.planning.cluster;"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# What the base install (a worker) lacks: the [coordinator], [export] and [plot] extras'
# packages. A worker loads none of the planning and coordinating half of edge either.
EXTRAS_ONLY = ("torch", "transformers", "onnxscript", "onnx", "cryptography", "matplotlib",
               "rich", "tokenizers", "jinja2", "starlette", "uvicorn")
NOT_IN_A_WORKER = EXTRAS_ONLY + ("edge.planning.planner", "edge.build", "edge.shards.build",
                                 "edge.coordinator", "edge.console")


def _base_install_env(tmp_path: Path, blocked: tuple[str, ...]) -> dict:
    """os.environ for a Python that behaves like the base install: a sitecustomize puts a
    meta-path finder first that refuses ``blocked``, as if they were not installed."""
    import os

    site = tmp_path / f"blocked-{len(blocked)}"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(
        "import sys\n"
        f"BLOCKED = {blocked!r}\n"
        "class _Blocker:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if any(name == b or name.startswith(b + '.') for b in BLOCKED):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, _Blocker())\n")
    return {**os.environ,
            "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}


def test_the_cli_serves_on_the_base_install(tmp_path, shard, monkeypatch):
    """`edge worker` from the command line, with every extra's package blocked, serves a
    real Forward; `edge --help` and `edge devices` run; a coordinator command names the
    extra to install."""
    import subprocess

    from edge.worker.launch import module_command

    env = _base_install_env(tmp_path, EXTRAS_ONLY)
    for args in (["--help"], ["worker", "--help"], ["devices"]):
        r = subprocess.run(module_command("edge", *args), capture_output=True, text=True,
                           env=env, timeout=60)
        assert r.returncode == 0, (args, r.stderr)
    assert "rpi4b-2gb" in r.stdout  # edge devices, in plain columns without rich
    r = subprocess.run(module_command("edge", "plan", "m.onnx", "--cluster", "c.yaml", "--out",
                                      "o"), capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "onnx is not installed" in r.stderr and "[coordinator]" in r.stderr
    monkeypatch.setenv("PYTHONPATH", _base_install_env(tmp_path, NOT_IN_A_WORKER)["PYTHONPATH"])
    w = spawn_worker(tmp_path, "base", device="rpi4b-2gb")
    try:
        with create_channel(w.address) as channel:
            stub = pb_grpc.WorkerStub(channel)
            upload_and_configure(stub, shard)
            events = Events(stub)
            try:
                assert_serves(stub, events)
            finally:
                events.close()
        maps = Path(f"/proc/{w.process.pid}/maps").read_text()
        assert "onnxruntime" in maps and "libtorch" not in maps
        assert "_rust.abi3" not in maps  # cryptography's native module
    finally:
        assert w.stop() == 0, w.log()


def test_budget_too_small_gets_resource_exhausted_and_worker_keeps_serving(tmp_path, shard):
    w = spawn_worker(tmp_path, "small", extra_args=["--memory-budget", "80"])
    try:
        with create_channel(w.address) as channel:
            stub = pb_grpc.WorkerStub(channel)
            path, sha = shard
            stub.UploadShard(chunks(sha, path.read_bytes()), timeout=10)
            big = config(sha)
            big.predicted_memory_mb = 120
            with pytest.raises(grpc.RpcError) as e:
                stub.Configure(big, timeout=30)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "needs 120 MiB" in e.value.details() and "budget is 80 MiB" in e.value.details()
            assert not stub.GetStatus(pb.StatusRequest(), timeout=5).configured
            fits = config(sha)
            fits.predicted_memory_mb = 70
            stub.Configure(fits, timeout=30)
            events = Events(stub)
            try:
                assert_serves(stub, events)
            finally:
                events.close()
    finally:
        w.stop()


def test_profile_samples_memory_while_serving(worker, shard):
    w, stub = worker
    upload_and_configure(stub, shard)
    events = Events(stub)
    try:
        for i in range(3):
            assert_serves(stub, events, f"r{i}")
    finally:
        events.close()
    import time

    time.sleep(0.3)  # a few sampling intervals
    profile = stub.GetProfile(pb.ProfileRequest(), timeout=5)
    assert len(profile.samples) >= 2 and profile.interval_s > 0
    last = profile.samples[-1]
    assert profile.rss_at_load_bytes > 0
    assert last.peak_rss_bytes >= profile.rss_at_load_bytes
    assert last.rss_bytes == pytest.approx(last.rss_anon_bytes + last.rss_file_bytes, rel=0.05)
    assert last.requests_done == 3
    times = [s.time for s in profile.samples]
    assert times == sorted(times)
    later = stub.GetProfile(pb.ProfileRequest(since=times[-1]), timeout=5)
    assert all(s.time > times[-1] for s in later.samples)


def make_external_shard(folder: Path) -> tuple[Path, list[tuple[Path, str, bool]]]:
    """The same stage with W in `w.data` and a Gather table in `t.gather.data`:
    y = relu(x @ W + b) + table[keep % 5].sum()."""
    from onnx.external_data_helper import set_external_data

    folder.mkdir(parents=True, exist_ok=True)
    table = np.arange(5 * 3, dtype=np.float32).reshape(5, 3)
    w, t = numpy_helper.from_array(W, "W"), numpy_helper.from_array(table, "T")
    for tensor, name in ((w, "w.data"), (t, "t.gather.data")):
        (folder / name).write_bytes(tensor.raw_data)
        set_external_data(tensor, location=name, offset=0, length=len(tensor.raw_data))
        tensor.ClearField("raw_data")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "B"], ["z"]),
             helper.make_node("Relu", ["z"], ["r"]),
             helper.make_node("Mod", ["keep", "five"], ["k"]),
             helper.make_node("Gather", ["T", "k"], ["rows"]),
             helper.make_node("Add", ["r", "rows"], ["y"])]
    graph = helper.make_graph(
        nodes, "shard",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("keep", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [w, t, numpy_helper.from_array(B, "B"), numpy_helper.from_array(np.array(5, np.int64), "five")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    path = folder / "stage.onnx"
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path))
    sha = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    return path, [(folder / "w.data", sha(folder / "w.data"), False),
                  (folder / "t.gather.data", sha(folder / "t.gather.data"), True)]


def test_stage_with_external_data_files(worker, tmp_path):
    w, stub = worker
    path, files = make_external_shard(tmp_path / "ext")
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    cfg = config(sha)
    cfg.data_files.extend(pb.ShardFileRef(name=f.name, sha256=s, random_access=r) for f, s, r in files)
    cfg.mode = "fp32-lean"
    stub.UploadShard(chunks(sha, path.read_bytes()), timeout=10)
    with pytest.raises(grpc.RpcError) as e:  # data files not uploaded yet
        stub.Configure(cfg, timeout=30)
    details = e.value.details()
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "w.data" in details and "t.gather.data" in details and "model.onnx" not in details
    for f, s, _ in files:
        stub.UploadShard(chunks(s, f.read_bytes()), timeout=10)
    evil = pb.StageConfig()
    evil.CopyFrom(cfg)
    evil.data_files[0].name = "../w.data"
    with pytest.raises(grpc.RpcError) as e:
        stub.Configure(evil, timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "plain file name" in e.value.details()
    stub.Configure(cfg, timeout=30)
    events = Events(stub)
    try:
        x = good_inputs(3, seed=2)
        forward(stub, "ext", x)
        out = decode_tensors(events.next().result.tensors)
        table = np.arange(15, dtype=np.float32).reshape(5, 3)
        np.testing.assert_allclose(out["y"], expected(x["x"]) + table[x["keep"] % 5], rtol=1e-6)
    finally:
        events.close()
    data = w.cache_dir / files[0][1]
    data.write_bytes(b"\0" * data.stat().st_size)  # tampered on disk
    with pytest.raises(grpc.RpcError) as e:
        stub.Configure(cfg, timeout=30)
    assert e.value.code() == grpc.StatusCode.DATA_LOSS and "w.data does not match" in e.value.details()


def _first_stage(model, tmp_path, sequence):
    """The plan's first stage (it holds the embedding table) over two devices, its spec."""
    from edge.build import make_plan
    from edge.planning.plan import Device
    from edge.worker.stage import StageSpec

    devs = [Device(f"d{k}", f"d{k}:1", "test", 1e6, 10.0, 1000.0) for k in range(2)]
    plan = make_plan(model, devs, tmp_path, bindings={"batch": 1, "sequence": sequence})
    st = plan.stages[0]
    spec = StageSpec(stage=0, num_stages=2, shard_sha256=st.sha256, inputs=st.inputs,
                     outputs=st.outputs, next_address="", epoch=1, plan_id="t",
                     predicted_memory_mb=0.0,
                     data_files=tuple((f.path.split("/")[-1], f.sha256, f.random_access)
                                      for f in st.data_files))
    return st, spec


def test_gather_table_rows_do_not_accumulate(bert_tiny, tmp_path):
    """Rows of the embedding table read by one request are dropped after it, so many
    requests over different tokens do not make the whole table resident."""
    from edge.worker.stage import StageRunner

    st, spec = _first_stage(bert_tiny, tmp_path, 128)
    runner = StageRunner(spec, tmp_path / st.shard, threads=1)
    tables = list(runner._tables)
    assert tables, "the gather table should be mapped and advised"

    def resident_kib() -> int:
        total, inside = 0, False
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split()
                if "-" in head[0] and len(head) >= 5:
                    start, end = (int(x, 16) for x in head[0].split("-"))
                    inside = any(start < e and s < end for s, e in tables)
                elif inside and head[0] == "Rss:":
                    total += int(head[1])
        return total

    table_kib = sum(f.size for f in st.data_files if f.random_access) // 1024
    rng = np.random.default_rng(0)
    for _ in range(20):
        ids = rng.integers(0, 1000, size=(1, 128), dtype=np.int64)
        runner.run({"input_ids": ids, "attention_mask": np.ones_like(ids)})
    assert resident_kib() < table_kib / 20
    # and without the drop the rows do pile up
    runner._tables = []
    for _ in range(20):
        ids = rng.integers(0, 1000, size=(1, 128), dtype=np.int64)
        runner.run({"input_ids": ids, "attention_mask": np.ones_like(ids)})
    assert resident_kib() > table_kib / 20


def _mappings() -> list[tuple[int, int, str]]:
    """This process's mappings: (start, end, path or "")."""
    out = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        a, b = (int(x, 16) for x in fields[0].split("-"))
        out.append((a, b, fields[5] if len(fields) > 5 else ""))
    return out


def _gaps(mapped: list[tuple[int, int, str]], start: int, end: int) -> list[tuple[int, int]]:
    """The parts of ``[start, end)`` that nothing maps."""
    out, at = [], start
    for a, b, _ in sorted(m for m in mapped if m[0] < end and m[1] > start):
        if a > at:
            out.append((at, a))
        at = max(at, b)
    if at < end:
        out.append((at, end))
    return out


def test_a_runner_drops_only_its_own_table_pages(bert_tiny, tmp_path):
    """A re-wired worker loads its new shard while the old session still maps the same
    (hard-linked) embedding table. Once the old session is gone, its addresses may hold
    anything: the new runner must not drop pages there. (It did, and zeroed whatever was
    mapped there next: a lab worker died after a re-plan.)"""
    import ctypes
    import gc

    from edge.worker.stage import StageRunner

    st, spec = _first_stage(bert_tiny, tmp_path, 16)
    old = StageRunner(spec, tmp_path / st.shard, threads=1)
    new = StageRunner(spec, tmp_path / st.shard, threads=1)
    ids = np.ones((1, 16), dtype=np.int64)
    want = new.run({"input_ids": ids, "attention_mask": ids})
    freed = list(old._tables)
    assert freed, "the gather table should be mapped and advised"
    files = {m[2] for m in _mappings() for start, end in freed if m[0] < end and m[1] > start}
    assert all(files), f"the table's mappings should be of its file: {files}"
    del old
    gc.collect()
    # Map memory at exactly the freed addresses (MAP_FIXED_NOREPLACE fails if they are
    # still mapped), fill it, and let the new runner serve.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    prot_rw, private_anonymous, fixed_noreplace = 0x3, 0x2 | 0x20, 0x100000
    mapped = _mappings()
    for start, end in freed:
        held = [m for m in mapped if m[0] < end and m[1] > start and m[2] in files]
        assert not held, f"the old session's table at {start:#x} is still mapped: {held}"
    # The next allocation may have taken part of a freed range already (the kernel reuses
    # the highest gap): map the parts that are free.
    gaps = [g for start, end in freed for g in _gaps(mapped, start, end)]
    assert gaps, "every freed table page was mapped again before the test could map it"
    views = []
    try:
        for start, end in gaps:
            got = libc.mmap(start, end - start, prot_rw, private_anonymous | fixed_noreplace,
                            -1, 0)
            assert got == start, f"{start:#x}..{end:#x} was free a moment ago"
            view = np.ctypeslib.as_array((ctypes.c_uint8 * (end - start)).from_address(start))
            view[:] = 7
            views.append((start, end, view))
        for _ in range(3):
            got = new.run({"input_ids": ids, "attention_mask": ids})
            for k in want:
                np.testing.assert_array_equal(got[k], want[k])
        for start, _, view in views:
            assert (view == 7).all(), f"pages at {start:#x} were dropped by a runner not mapping them"
    finally:
        for start, end, view in views:
            del view
            libc.munmap(start, end - start)


class _NextHop(pb_grpc.WorkerServicer):
    """A next stage that records the Forward calls it gets; ``hang``: never answers them
    (an unplugged board) until the test ends."""

    def __init__(self, hang: bool):
        self.hang = hang
        self.got: list[str] = []
        self.release = __import__("threading").Event()

    def Forward(self, request, context):
        self.got.append(request.request_id)
        if self.hang:
            self.release.wait(60)
        return pb.Ack()


def _next_hop(hang: bool):
    from concurrent.futures import ThreadPoolExecutor

    hop = _NextHop(hang)
    server = grpc.server(ThreadPoolExecutor(4))
    pb_grpc.add_WorkerServicer_to_server(hop, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return hop, server, f"127.0.0.1:{port}"


def test_a_reconfigure_frees_a_send_stuck_on_a_hanging_next_hop(tmp_path, shard):
    """The send thread blocks in its Forward to the next stage; a Configure that re-wires
    the stage must end that call at once, not after the Forward deadline (30 s), so that
    the new epoch's requests flow."""
    import time

    from edge.worker.server import WorkerConfig, start_worker
    from helpers import until

    hung, hung_server, hung_address = _next_hop(hang=True)
    good, good_server, good_address = _next_hop(hang=False)
    server, port, servicer, _ = start_worker(WorkerConfig(listen="127.0.0.1:0",
                                                          cache_dir=tmp_path / "cache"))
    channel = create_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.WorkerStub(channel)
    path, sha = shard
    try:
        stub.UploadShard(chunks(sha, path.read_bytes()), timeout=10)
        for epoch, address in ((1, hung_address), (2, good_address)):
            cfg = config(sha, epoch=epoch)
            cfg.num_stages, cfg.next_address = 2, address
            stub.Configure(cfg, timeout=30)
            if epoch == 1:
                forward(stub, "stuck", good_inputs(), epoch=1)
                until(lambda: hung.got == ["stuck"], 10, "the first request at the hung hop")
        start = time.monotonic()
        forward(stub, "after", good_inputs(), epoch=2)
        until(lambda: good.got == ["after"], 10, "the next epoch's request at the new hop")
        assert time.monotonic() - start < 5
        assert servicer.engine.stats()[1] == 0  # the stuck one was dropped, not failed
    finally:
        hung.release.set()
        channel.close()
        server.stop(0)
        servicer.stop()
        hung_server.stop(0)
        good_server.stop(0)


def test_an_engine_stops_its_threads_at_once():
    """The compute and send threads wait on their queues for up to a second between looks
    (each wake-up is CPU a board's stage needs); a stop must still end them at once."""
    import time

    from edge.worker.engine import StageEngine
    from edge.worker.events import EventBus

    engine = StageEngine(EventBus())
    time.sleep(0.1)  # both threads waiting on their queues
    start = time.monotonic()
    engine.stop()
    for t in engine._threads:
        t.join(2)
        assert not t.is_alive()
    assert time.monotonic() - start < 0.5
