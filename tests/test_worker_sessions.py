"""Workers that hold generation sessions: KV caches per sequence on every stage, steps,
releases, bounds, idle expiry, and the last stage's sampling.

The model is a hand-built toy "decoder" in two stages, each with one layer's key cache
(past [batch, heads, past, head_dim] -> present = Concat(past, new keys)), whose outputs
depend on the whole cache, and a numpy reference of the same computation step by step.
"""

from __future__ import annotations

import hashlib
import itertools
import time
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
from edge.worker.sampling import distribution, draw_tokens
from helpers import Events

V = 16  # vocabulary


class Toy:
    """Weights of the toy decoder with ``heads`` x ``head_dim`` keys per layer."""

    def __init__(self, heads: int = 2, head_dim: int = 4, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.heads, self.head_dim, self.dim = heads, head_dim, 2 * head_dim
        f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
        self.embed, self.pos = f(V, self.dim), f(self.dim) * 0.1
        self.wk = [f(self.dim, heads * head_dim) * 0.5 for _ in range(2)]
        self.out = f(self.dim, V)

    # --------------------------------------------------------------- reference

    def _block(self, layer: int, h: np.ndarray, past: np.ndarray):
        n = h.shape[1]
        k = (h @ self.wk[layer]).reshape(1, n, self.heads, self.head_dim).transpose(0, 2, 1, 3)
        present = np.concatenate([past, k], axis=2)
        s = present.mean(axis=(1, 2))[:, None, :]  # [1, 1, head_dim]
        return h + np.concatenate([s, s], axis=2), present

    def reference(self, ids, mask, positions, pasts):
        """logits and the two presents, in numpy."""
        h = (self.embed[ids] + positions[..., None].astype(np.float32) * self.pos
             + np.float32(0.001) * mask.sum(dtype=np.float32))
        h, p0 = self._block(0, h, pasts[0])
        h, p1 = self._block(1, h, pasts[1])
        return h @ self.out, (p0, p1)

    def greedy(self, prompt: list[int], new: int) -> list[int]:
        pasts = [np.zeros((1, self.heads, 0, self.head_dim), np.float32)] * 2
        ids, pos, out = list(prompt), 0, []
        for _ in range(new):
            n = len(ids)
            logits, pasts = self.reference(np.array([ids]), np.ones((1, pos + n), np.int64),
                                           np.arange(pos, pos + n)[None], pasts)
            out.append(int(logits[0, -1].argmax()))
            ids, pos = [out[-1]], pos + n
        return out

    # --------------------------------------------------------------- ONNX

    def _block_nodes(self, layer: int, h: str, out: str):
        H, K = self.heads, self.head_dim
        p = f"l{layer}_"
        nodes = [
            helper.make_node("MatMul", [h, f"{p}wk"], [f"{p}k"]),
            helper.make_node("Reshape", [f"{p}k", "kshape"], [f"{p}k4"]),
            helper.make_node("Transpose", [f"{p}k4"], [f"{p}kt"], perm=[0, 2, 1, 3]),
            helper.make_node("Concat", [f"past_key_values.{layer}.key", f"{p}kt"],
                             [f"present.{layer}.key"], axis=2),
            helper.make_node("ReduceMean", [f"present.{layer}.key"], [f"{p}s4"], axes=[1, 2],
                             keepdims=1),
            helper.make_node("Squeeze", [f"{p}s4", "one"], [f"{p}s"]),
            helper.make_node("Concat", [f"{p}s", f"{p}s"], [f"{p}ss"], axis=2),
            helper.make_node("Add", [h, f"{p}ss"], [out]),
        ]
        inits = [numpy_helper.from_array(self.wk[layer], f"{p}wk")]
        past = helper.make_tensor_value_info(f"past_key_values.{layer}.key", TensorProto.FLOAT,
                                             ["batch", H, "past", K])
        present = helper.make_tensor_value_info(f"present.{layer}.key", TensorProto.FLOAT,
                                                ["batch", H, "total", K])
        return nodes, inits, past, present

    def _embed_nodes(self):
        nodes = [
            helper.make_node("Gather", ["embed", "input_ids"], ["emb"]),
            helper.make_node("Cast", ["position_ids"], ["pf"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["pf", "two"], ["pf3"]),
            helper.make_node("Mul", ["pf3", "posw"], ["pe"]),
            helper.make_node("Cast", ["attention_mask"], ["mf"], to=TensorProto.FLOAT),
            helper.make_node("ReduceSum", ["mf"], ["ms"], keepdims=0),
            helper.make_node("Mul", ["ms", "milli"], ["msc"]),
            helper.make_node("Add", ["emb", "pe"], ["e1"]),
            helper.make_node("Add", ["e1", "msc"], ["h0"]),
        ]
        inits = [numpy_helper.from_array(self.embed, "embed"),
                 numpy_helper.from_array(self.pos, "posw"),
                 numpy_helper.from_array(np.array([2], np.int64), "two"),
                 numpy_helper.from_array(np.array(0.001, np.float32), "milli")]
        ins = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
               helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                             ["batch", "total"]),
               helper.make_tensor_value_info("position_ids", TensorProto.INT64,
                                             ["batch", "sequence"])]
        return nodes, inits, ins

    def shard(self, path: Path, part: str) -> str:
        """Write stage ``part`` ("0", "1" or "whole") to ``path``; its sha256."""
        common = [numpy_helper.from_array(np.array([0, 0, self.heads, self.head_dim], np.int64),
                                          "kshape"),
                  numpy_helper.from_array(np.array([1], np.int64), "one")]
        hidden = helper.make_tensor_value_info("hidden", TensorProto.FLOAT,
                                               ["batch", "sequence", self.dim])
        logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                               ["batch", "sequence", V])
        nodes, inits, ins, outs = [], list(common), [], []
        if part in ("0", "whole"):
            n, i, e_ins = self._embed_nodes()
            b, bi, past, present = self._block_nodes(0, "h0", "hidden")
            nodes += n + b
            inits += i + bi
            ins += e_ins + [past]
            outs += [present] if part == "whole" else [hidden, present]
        if part in ("1", "whole"):
            b, bi, past, present = self._block_nodes(1, "hidden", "h1")
            nodes += b + [helper.make_node("MatMul", ["h1", "wout"], ["logits"])]
            inits += bi + [numpy_helper.from_array(self.out, "wout")]
            ins += ([] if part == "whole" else [hidden]) + [past]
            outs = [logits] + outs + [present]
        model = helper.make_model(helper.make_graph(nodes, f"toy-{part}", ins, outs, inits),
                                  opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        onnx.save(model, str(path))
        return hashlib.sha256(path.read_bytes()).hexdigest()


TOKENS_IN = [TensorSpec("input_ids", "int64", ("batch", "sequence")),
             TensorSpec("attention_mask", "int64", ("batch", "total")),
             TensorSpec("position_ids", "int64", ("batch", "sequence"))]
LOGITS = TensorSpec("logits", "float32", ("batch", "sequence", V))


def stage_config(sha: str, part: str, dim: int, epoch: int, next_address: str = "",
                 max_sequences: int = 4, state: list | None = None,
                 context: int = 0) -> pb.StageConfig:
    hidden = TensorSpec("hidden", "float32", ("batch", "sequence", dim))
    ins, outs, layers = {"0": (TOKENS_IN, [hidden], [0]), "1": ([hidden], [LOGITS], [1]),
                         "whole": (TOKENS_IN, [LOGITS], [0, 1])}[part]
    if state is None:
        state = [(f"past_key_values.{n}.key", f"present.{n}.key") for n in layers]
    return pb.StageConfig(
        stage=0 if part != "1" else 1, num_stages=2 if part != "whole" else 1,
        shard_sha256=sha, epoch=epoch, protocol=PROTOCOL_VERSION, plan_id="toy",
        inputs=[encode_spec(s) for s in ins], outputs=[encode_spec(s) for s in outs],
        next_address=next_address, max_sequences=max_sequences, context=context,
        state=[pb.StatePair(input=a, output=b) for a, b in state])


def upload(stub, path: Path, sha: str) -> None:
    data = path.read_bytes()
    stub.UploadShard(iter([pb.ShardChunk(header=pb.ShardHeader(sha256=sha, size=len(data))),
                           pb.ShardChunk(data=data)]), timeout=10)


def step_tensors(ids: list[int], position: int) -> list[pb.Tensor]:
    n = len(ids)
    return encode_tensors({"input_ids": np.array([ids], np.int64),
                           "attention_mask": np.ones((1, position + n), np.int64),
                           "position_ids": np.arange(position, position + n,
                                                     dtype=np.int64)[None]})


_ids = itertools.count()


def send_step(stub, epoch: int, sequence: str, ids: list[int], position: int,
              sampling: pb.Sampling | None = None) -> str:
    rid = f"r{next(_ids)}"
    stub.Forward(pb.Activation(request_id=rid, epoch=epoch, tensors=step_tensors(ids, position),
                               step=pb.Step(sequence_id=sequence, position=position,
                                            sampling=sampling or pb.Sampling())), timeout=10)
    return rid


def send_release(stub, epoch: int, sequence: str) -> str:
    rid = f"r{next(_ids)}"
    stub.Forward(pb.Activation(request_id=rid, epoch=epoch,
                               step=pb.Step(sequence_id=sequence, release=True)), timeout=10)
    return rid


def status(stub) -> pb.WorkerStatus:
    return stub.GetStatus(pb.StatusRequest(), timeout=5)


class Pair:
    """Two chained workers serving the toy's two stages."""

    def __init__(self, root: Path, toy: Toy):
        self.toy = toy
        self.workers = [spawn_worker(root, f"kv{i}", threads=1) for i in range(2)]
        self.channels = [create_channel(w.address) for w in self.workers]
        self.stubs = [pb_grpc.WorkerStub(c) for c in self.channels]
        self.shards = []
        for part, stub in zip("01", self.stubs):
            path = root / f"toy-{part}.onnx"
            sha = toy.shard(path, part)
            upload(stub, path, sha)
            self.shards.append(sha)
        self.epoch = 0

    def configure(self, max_sequences: int = 4, context: int = 0) -> int:
        self.epoch += 1
        dim = self.toy.dim
        self.stubs[1].Configure(stage_config(self.shards[1], "1", dim, self.epoch,
                                             max_sequences=max_sequences, context=context),
                                timeout=30)
        self.stubs[0].Configure(stage_config(self.shards[0], "0", dim, self.epoch,
                                             self.workers[1].address, max_sequences,
                                             context=context), timeout=30)
        return self.epoch

    def close(self):
        for c in self.channels:
            c.close()
        for w in self.workers:
            w.stop()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    p = Pair(tmp_path_factory.mktemp("kv"), Toy())
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def events(pair):
    """Each stage's Subscribe stream (failures come from the stage that refuses)."""
    streams = []
    try:
        for stub in pair.stubs:
            streams.append(Events(stub))
        yield streams
    finally:
        for s in streams:
            s.close()


def result(events, rid: str) -> pb.Event:
    return events[1].wait([rid], timeout=20)[rid]


def generate(pair, events, epoch, sequence, prompt, new):
    """Prefill and ``new`` - 1 decode steps; the tokens drawn."""
    tokens, ids, position = [], list(prompt), 0
    for _ in range(new):
        e = result(events, send_step(pair.stubs[0], epoch, sequence, ids, position))
        assert e.WhichOneof("kind") == "result", e
        assert not e.result.tensors and e.result.step.sequence_id == sequence
        assert e.result.step.position == position
        tokens.append(e.result.tokens[0])
        position += len(ids)
        ids = [tokens[-1]]
    return tokens


PROMPT = [3, 1, 4, 1, 5]


def test_steps_through_two_stages_draw_the_reference_tokens(pair, events):
    epoch = pair.configure()
    toy = pair.toy
    want = toy.greedy(PROMPT, 5)
    tokens, ids, position = [], list(PROMPT), 0
    per_token = toy.heads * toy.head_dim * 4
    for _ in range(5):  # prefill and 4 decode steps
        e = result(events, send_step(pair.stubs[0], epoch, "s1", ids, position))
        assert e.WhichOneof("kind") == "result", e
        assert not e.result.tensors
        tokens.append(e.result.tokens[0])
        position += len(ids)
        ids = [tokens[-1]]
        for stub in pair.stubs:  # the caches grow by one token's keys per step
            st = status(stub)
            assert (st.sequences, st.kv_cache_bytes) == (1, position * per_token)
    assert tokens == want
    # position 0 restarts the sequence: the same tokens again
    assert generate(pair, events, epoch, "s1", PROMPT, 3) == want[:3]


def test_plain_infer_runs_with_empty_caches(pair, events):
    epoch = pair.configure()
    rid = f"r{next(_ids)}"
    pair.stubs[0].Forward(pb.Activation(request_id=rid, epoch=epoch,
                                        tensors=step_tensors(PROMPT, 0)), timeout=10)
    e = result(events, rid)
    assert not e.result.HasField("step") and not e.result.tokens
    got = decode_tensors(e.result.tensors)
    empty = np.zeros((1, 2, 0, 4), np.float32)
    want, _ = pair.toy.reference(np.array([PROMPT]), np.ones((1, 5), np.int64),
                                 np.arange(5)[None], [empty, empty])
    assert set(got) == {"logits"}
    np.testing.assert_allclose(got["logits"], want, rtol=1e-5, atol=1e-5)
    assert status(pair.stubs[0]).sequences == 0


def test_position_mismatch_is_a_failed_precondition_and_keeps_the_caches(pair, events):
    epoch = pair.configure()
    first = generate(pair, events, epoch, "s", PROMPT, 1)
    rid = send_step(pair.stubs[0], epoch, "s", [first[0]], 3)  # 5 tokens are cached
    e = events[0].wait([rid])[rid]
    assert e.WhichOneof("kind") == "failure"
    assert e.failure.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert "5 tokens cached" in e.failure.message and "position 3" in e.failure.message
    rid = send_step(pair.stubs[0], epoch, "unknown", [1], 2)
    e = events[0].wait([rid])[rid]
    assert e.failure.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert "0 tokens cached" in e.failure.message
    # the right position still continues the sequence
    e = result(events, send_step(pair.stubs[0], epoch, "s", [first[0]], 5))
    assert e.result.tokens[0] == pair.toy.greedy(PROMPT, 2)[1]
    assert all(w.process.poll() is None for w in pair.workers)


def test_too_many_sequences_and_release(pair, events):
    epoch = pair.configure(max_sequences=2)
    for s in ("a", "b"):
        generate(pair, events, epoch, s, PROMPT, 1)
    rid = send_step(pair.stubs[0], epoch, "c", PROMPT, 0)
    e = events[0].wait([rid])[rid]
    assert e.failure.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert "max_sequences is 2" in e.failure.message
    e = result(events, send_release(pair.stubs[0], epoch, "a"))
    assert e.WhichOneof("kind") == "result" and e.result.step.release
    assert not e.result.tokens and not e.result.tensors
    assert [status(s).sequences for s in pair.stubs] == [1, 1]
    result(events, send_release(pair.stubs[0], epoch, "a"))  # again: nothing to free, fine
    assert generate(pair, events, epoch, "c", PROMPT, 2) == pair.toy.greedy(PROMPT, 2)
    for s in ("b", "c"):
        result(events, send_release(pair.stubs[0], epoch, s))
    for stub in pair.stubs:
        st = status(stub)
        assert (st.sequences, st.kv_cache_bytes) == (0, 0)


def test_context_bounds_a_sequence(pair, events):
    epoch = pair.configure(context=6)
    generate(pair, events, epoch, "s", PROMPT, 2)  # 6 tokens
    rid = send_step(pair.stubs[0], epoch, "s", [1], 6)
    e = events[0].wait([rid])[rid]
    assert e.failure.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "context of 6" in e.failure.message


def test_reconfigure_frees_all_sequences(pair, events):
    epoch = pair.configure()
    generate(pair, events, epoch, "s", PROMPT, 1)
    assert status(pair.stubs[1]).sequences == 1
    epoch = pair.configure()
    assert [status(s).sequences for s in pair.stubs] == [0, 0]
    rid = send_step(pair.stubs[0], epoch, "s", [1], 5)
    assert events[0].wait([rid])[rid].failure.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]


@pytest.mark.parametrize("step, message", [
    (pb.Step(sequence_id=""), "sequence id of 1-256"),
    (pb.Step(sequence_id="x" * 257), "sequence id of 1-256"),
])
def test_bad_sequence_ids_are_invalid_arguments(pair, step, message):
    epoch = pair.configure()
    with pytest.raises(grpc.RpcError) as e:
        pair.stubs[0].Forward(pb.Activation(request_id="r", epoch=epoch, step=step,
                                            tensors=step_tensors(PROMPT, 0)), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in e.value.details()
    with pytest.raises(grpc.RpcError) as e:  # a release carries no tensors
        pair.stubs[0].Forward(pb.Activation(
            request_id="r", epoch=epoch, tensors=step_tensors(PROMPT, 0),
            step=pb.Step(sequence_id="s", release=True)), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no tensors" in e.value.details()


@pytest.mark.parametrize("state, message", [
    ([("past_key_values.9.key", "present.0.key")], "expected a past among the shard's inputs"),
    ([("past_key_values.0.key", "hidden")], "also among the outputs"),
    ([("input_ids", "present.0.key")], "also among the inputs"),
    ([("past_key_values.0.key", "")], "both named"),
])
def test_configure_checks_the_state_pairs(pair, state, message):
    cfg = stage_config(pair.shards[0], "0", pair.toy.dim, 99, pair.workers[1].address,
                       state=state)
    with pytest.raises(grpc.RpcError) as e:
        pair.stubs[0].Configure(cfg, timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in e.value.details()


def _whole_worker(root: Path, toy: Toy, name: str, extra: list[str] | None = None):
    w = spawn_worker(root, name, threads=1, extra_args=extra)
    channel = create_channel(w.address)
    stub = pb_grpc.WorkerStub(channel)
    path = root / f"{name}.onnx"
    sha = toy.shard(path, "whole")
    upload(stub, path, sha)
    stub.Configure(stage_config(sha, "whole", toy.dim, 1, max_sequences=64), timeout=30)
    return w, channel, stub


def test_idle_sequences_are_freed(tmp_path):
    toy = Toy()
    w, channel, stub = _whole_worker(tmp_path, toy, "idle", ["--session-idle", "0.5"])
    events = Events(stub)
    try:
        rid = send_step(stub, 1, "s", PROMPT, 0)
        assert events.wait([rid])[rid].result.tokens[0] == toy.greedy(PROMPT, 1)[0]
        end = time.monotonic() + 10
        while status(stub).sequences and time.monotonic() < end:
            time.sleep(0.1)
        assert status(stub).sequences == 0
        rid = send_step(stub, 1, "s", [1], 5)
        assert events.wait([rid])[rid].failure.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    finally:
        events.close()
        channel.close()
        w.stop()


def test_released_caches_give_their_memory_back(tmp_path):
    toy = Toy(heads=8, head_dim=64)  # 4 KiB per token over the two layers
    w, channel, stub = _whole_worker(tmp_path, toy, "mem")
    events = Events(stub)
    prompt = list(np.random.default_rng(1).integers(0, V, 1024))
    count = 16  # 16 x 1024 tokens x 4 KiB = 64 MiB of caches

    def run(sequences):
        rids = [send_step(stub, 1, s, prompt, 0) for s in sequences]
        assert all(e.WhichOneof("kind") == "result" for e in events.wait(rids).values())

    def release(sequences):
        events.wait([send_release(stub, 1, s) for s in sequences])

    try:
        run(["warm"])  # onnxruntime's buffers for a 1024-token step
        release(["warm"])
        before = status(stub).rss_bytes
        run([f"s{i}" for i in range(count)])
        full = status(stub)
        assert full.sequences == count and full.kv_cache_bytes == count * 1024 * 4096
        assert full.rss_bytes - before > 48 * 2**20
        release([f"s{i}" for i in range(count)])
        after = status(stub)
        assert after.sequences == 0 and after.kv_cache_bytes == 0
        assert after.rss_bytes - before < 8 * 2**20, (before, full.rss_bytes, after.rss_bytes)
    finally:
        events.close()
        channel.close()
        w.stop()


# ------------------------------------------------------------------ sampling


def _logits(seed: int = 0, batch: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, 50)).astype(np.float32)


def test_greedy_draws_the_argmax():
    logits = _logits(batch=3)
    np.testing.assert_array_equal(draw_tokens(logits, 0.0, 0, 0.0, 7, 0),
                                  logits[:, -1].argmax(-1))


def test_top_k_of_one_is_greedy():
    for seed in range(5):
        logits = _logits(seed)
        assert draw_tokens(logits, 1.3, 1, 0.0, seed, 4)[0] == logits[0, -1].argmax()


def test_seeded_draws_repeat_and_vary_with_seed_and_position():
    logits = _logits()
    draws = [draw_tokens(logits, 1.0, 0, 0.0, 11, p)[0] for p in range(40)]
    assert draws == [draw_tokens(logits, 1.0, 0, 0.0, 11, p)[0] for p in range(40)]
    assert len(set(draws)) > 5
    assert draws != [draw_tokens(logits, 1.0, 0, 0.0, 12, p)[0] for p in range(40)]


def test_top_p_keeps_the_nucleus():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    p = distribution(logits, 1.0, top_p=0.75)  # 0.5 + 0.3 reach 0.75: two tokens
    np.testing.assert_allclose(p, [0.625, 0.375, 0, 0], atol=1e-6)
    p = distribution(logits, 1.0, top_p=0.5)  # the first alone reaches it
    np.testing.assert_allclose(p, [1, 0, 0, 0], atol=1e-6)
    p = distribution(logits, 1.0, top_k=3, top_p=0.99)
    np.testing.assert_allclose(p, np.array([0.5, 0.3, 0.15, 0]) / 0.95, atol=1e-6)
    row = np.broadcast_to(logits, (1, 2, 4))
    drawn = {draw_tokens(row, 1.0, 0, 0.75, 3, k)[0] for k in range(200)}
    assert drawn == {0, 1}


def test_random_step_streams_never_break_a_stage(pair, events):
    """Steps, releases and restarts in any order, over a few sequences: each accepted one
    ends in a result or a refusal with a real code, the workers live on, and the caches'
    lengths are what the accepted steps made them."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    epoch = pair.configure(max_sequences=2, context=12)
    lengths: dict[str, int] = {}  # what the stages must hold: the model of the store
    codes = {grpc.StatusCode.FAILED_PRECONDITION.value[0],
             grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
             grpc.StatusCode.INVALID_ARGUMENT.value[0]}

    @settings(max_examples=60, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.sampled_from("abc"), st.sampled_from(["step", "step", "release", "restart"]),
           st.integers(1, 4), st.integers(-1, 1))
    def run(sequence, kind, n, skew):
        cached = lengths.get(sequence, 0)
        if kind == "release":
            rid = send_release(pair.stubs[0], epoch, sequence)
            assert result(events, rid).result.step.release
            lengths.pop(sequence, None)
            return
        position = 0 if kind == "restart" else max(cached + skew, 0)
        rid = send_step(pair.stubs[0], epoch, sequence, [1] * n, position)
        ok = ((position == 0 and (sequence in lengths or len(lengths) < 2))
              or (position == cached and sequence in lengths)) and position + n <= 12
        if ok:
            e = result(events, rid)
            assert e.WhichOneof("kind") == "result", e
            lengths[sequence] = position + n
        else:  # refused by stage 0, which holds the same sequences as stage 1
            e = events[0].wait([rid])[rid]
            assert e.WhichOneof("kind") == "failure" and e.failure.code in codes, e

    run()
    st_ = [status(s) for s in pair.stubs]
    assert [s.sequences for s in st_] == [len(lengths)] * 2
    per_token = pair.toy.heads * pair.toy.head_dim * 4
    assert st_[0].kv_cache_bytes == sum(lengths.values()) * per_token
    assert all(w.process.poll() is None for w in pair.workers)


@pytest.mark.parametrize("rows, step, message", [
    ([pb.Step(sequence_id="a", position=0)], None, "position of at least 1"),
    ([pb.Step(sequence_id="a", position=5), pb.Step(sequence_id="a", position=5)], None,
     "comes twice"),
    ([pb.Step(sequence_id="a", position=5)], pb.Step(sequence_id="a", position=5),
     "expected no step"),
])
def test_bad_batches_are_invalid_arguments(pair, rows, step, message):
    epoch = pair.configure()
    with pytest.raises(grpc.RpcError) as e:
        pair.stubs[0].Forward(pb.Activation(request_id="r", epoch=epoch, rows=rows, step=step,
                                            tensors=step_tensors([1] * len(rows), 5)),
                              timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in e.value.details()
