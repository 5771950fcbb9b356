"""The size guard on decoders with a KV cache: past, new and total lengths move together,
so the total must count once, not as a third factor of its own.

A decode step with past length 300, on a plan made for past 24, was refused as needing
20 GiB (every tensor fell back to "grows with the square" in each of the three lengths, and
the factors were multiplied); its inputs and outputs are 2.5 MiB. The models here are built
by hand in both naming styles exporters use for the total length: a name of its own
(``total_sequence_length``, which must equal past + new) and an expression as optimum and
torch's dynamo exporter write it (``past_sequence_length + sequence_length``,
``past_sequence_length + 1``).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge.coordinator.guard import TooLarge, check_fits, describe_limits, largest, request_sizes
from edge.planning.graph import analyze
from edge.planning.plan import dim_expression, dim_value, free_sizes, load_plan

PAST, NEW, TOTAL = "past_sequence_length", "sequence_length", "total_sequence_length"
# The total length's dim_param per style, and what the plan is made for (past 24, one new
# token): a name of its own must be bound too; an expression never is.
STYLES = {
    "named": (TOTAL, {PAST: 24, NEW: 1, TOTAL: 25}),
    # as transformers' models: a mask longer than past + new is cut to that length, so the
    # total length can grow alone, and the mask grows with it while the cache does not
    "sliced": (TOTAL, {PAST: 24, NEW: 1, TOTAL: 25}),
    "sum": (f"{PAST} + {NEW}", {PAST: 24, NEW: 1}),
    "plus-one": (f"{PAST} + 1", {PAST: 24}),
}


def kv_decoder(total: str, layers: int = 2, heads: int = 4, head_dim: int = 16,
               vocab: int = 256, slice_mask: bool = False, seed: int = 0) -> onnx.ModelProto:
    """A decoder step with a KV cache, GPT-2's attention by hand: per layer the new tokens'
    keys and values are appended to the past ones along the length (the ``present``
    outputs), and the new tokens attend over the total length, masked by
    ``attention_mask[batch, total]``.

    Args:
        total: the total length's dim_param: a name, or an expression of the past length
            (``... + 1``: one new token, ``input_ids`` is ``[batch, 1]``).
        slice_mask: the mask's first past + new positions are used; it may be longer.
    """
    rng = np.random.default_rng(seed)
    hidden = heads * head_dim
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def weight(name, *shape):
        inits.append(numpy_helper.from_array(
            (rng.standard_normal(shape) * 0.2).astype(np.float32), name))
        return name

    def const(name, values, dtype=np.int64):
        inits.append(numpy_helper.from_array(np.asarray(values, dtype=dtype), name))

    def node(op, ins, out, **attrs):
        nodes.append(helper.make_node(op, ins, [out], name=f"{op}_{len(nodes)}", **attrs))
        return out

    new_len = 1 if total.endswith("+ 1") else NEW
    const("heads_shape", [0, 0, heads, head_dim])
    const("hidden_shape", [0, 0, hidden])
    const("mask_axes", [1, 2])
    const("one", 1.0, np.float32)
    const("neg", -1e4, np.float32)
    const("scale", 1.0 / math.sqrt(head_dim), np.float32)
    h = node("Gather", [weight("embed", vocab, hidden), "input_ids"], "h0")

    def mask_bias(mask):
        m = node("Cast", [mask], "mask_f", to=TensorProto.FLOAT)
        m = node("Mul", [node("Sub", ["one", m], "mask_inv"), "neg"], "mask_bias")
        return node("Unsqueeze", [m, "mask_axes"], "mask_bias4")

    const("zero", [0])
    const("length_axis", [1])
    bias = None if slice_mask else mask_bias("attention_mask")
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", new_len]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                            ["batch", total])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                             ["batch", new_len, vocab])]
    for i in range(layers):
        qkv = {}
        for kind in "qkv":
            x = node("MatMul", [h, weight(f"w{kind}{i}", hidden, hidden)], f"{kind}{i}")
            x = node("Reshape", [x, "heads_shape"], f"{kind}{i}_h")
            qkv[kind] = node("Transpose", [x], f"{kind}{i}_t", perm=[0, 2, 1, 3])
        for kind, word in (("k", "key"), ("v", "value")):
            past, present = f"past_key_values.{i}.{word}", f"present.{i}.{word}"
            inputs.append(helper.make_tensor_value_info(past, TensorProto.FLOAT,
                                                        ["batch", heads, PAST, head_dim]))
            outputs.append(helper.make_tensor_value_info(present, TensorProto.FLOAT,
                                                         ["batch", heads, total, head_dim]))
            qkv[kind] = node("Concat", [past, qkv[kind]], present, axis=2)
        if bias is None:
            length = node("Shape", [qkv["k"]], "kv_length", start=2, end=3)
            bias = mask_bias(node("Slice", ["attention_mask", "zero", length, "length_axis"],
                                  "mask_used"))
        s = node("MatMul", [qkv["q"], node("Transpose", [qkv["k"]], f"kT{i}", perm=[0, 1, 3, 2])],
                 f"scores{i}")
        s = node("Add", [node("Mul", [s, "scale"], f"scaled{i}"), bias], f"masked{i}")
        c = node("MatMul", [node("Softmax", [s], f"probs{i}", axis=-1), qkv["v"]], f"ctx{i}")
        c = node("Transpose", [c], f"ctx{i}_t", perm=[0, 2, 1, 3])
        c = node("Reshape", [c, "hidden_shape"], f"ctx{i}_r")
        h = node("Add", [h, node("MatMul", [c, weight(f"wo{i}", hidden, hidden)], f"attn{i}")],
                 f"h{i + 1}")
    node("MatMul", [h, weight("head", hidden, vocab)], "logits")
    g = helper.make_graph(nodes, "kv_decoder", inputs, outputs, initializer=inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    return model


def model_of(style: str) -> onnx.ModelProto:
    return kv_decoder(STYLES[style][0], slice_mask=style == "sliced")


def decode_step(model: onnx.ModelProto, past: int, new: int = 1, batch: int = 1,
                seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of a step with ``past`` cached positions and ``new`` new tokens."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in model.graph.input:
        dims = [d.dim_value or d.dim_param for d in vi.type.tensor_type.shape.dim]
        if vi.name == "input_ids":
            feeds[vi.name] = rng.integers(0, 256, (batch, new), dtype=np.int64)
        elif vi.name == "attention_mask":
            feeds[vi.name] = np.ones((batch, past + new), np.int64)
        else:
            feeds[vi.name] = rng.standard_normal((batch, dims[1], past, dims[3])).astype(
                np.float32)
    return feeds


def sizes_at(style: str, past: int, new: int = 1) -> dict[str, int]:
    """The bindings of ``style`` at another past length."""
    _, bindings = STYLES[style]
    out = {PAST: past}
    if NEW in bindings:
        out[NEW] = new
    if TOTAL in bindings:
        out[TOTAL] = past + new
    return out


def test_dim_expressions():
    assert dim_expression(f"{PAST} + 1") == ({PAST: 1}, 1)
    assert dim_expression(f"{PAST} + {NEW}") == ({PAST: 1, NEW: 1}, 0)
    assert dim_expression("2*s0 - 1") == ({"s0": 2}, -1)
    assert dim_expression("(a + b) - (a - 3)") == ({"b": 1}, 3)
    for plain_or_not_linear in ("batch", "batch_size", "s0*s1", "s0 / 2", "1 + 2"):
        assert dim_expression(plain_or_not_linear) is None, plain_or_not_linear
    # dim names need not be identifiers: Paddle's, and intake's names of unnamed dims
    assert dim_expression("p2o.DynamicDimension.0 + x:2") == (
        {"p2o.DynamicDimension.0": 1, "x:2": 1}, 0)
    assert dim_value(f"{PAST} + {NEW}", {PAST: 300, NEW: 1}) == 301
    assert dim_value(f"{PAST} + 1", {NEW: 1}) is None


@pytest.mark.parametrize("style", list(STYLES))
def test_total_length_counts_once(style):
    """The total length is derived when it cannot move alone: found to be the sum (a name
    of its own) or computed from its expression (never bound), and the others' degrees are
    measured with it moving along. Where it can move alone (a mask cut to length), it is a
    dim of its own, but no tensor grows with it and the past at once."""
    total, bindings = STYLES[style]
    costs = analyze(model_of(style), bindings)
    assert costs.bindings == {**bindings, "batch": 1}
    assert costs.derived == ({TOTAL: f"{PAST} + {NEW}"} if style == "named" else {})
    n = costs.num_nodes
    assert costs.activation_degrees(0, n) == {
        PAST: 1, "batch": 1, **({NEW: 2} if NEW in bindings else {}),
        **({TOTAL: 1} if style == "sliced" else {})}
    assert all(d.get(PAST, 0) <= 1 and not (PAST in d and TOTAL in d)
               for d in costs.tensor_degrees.values())
    assert all(not (PAST in v and TOTAL in v) for v in costs.activation_growth(0, n))
    # the cache and the attention over it grow with the past; the logits do not
    assert costs.tensor_degrees["present.0.key"][PAST] == 1
    assert costs.tensor_degrees["scores0"][PAST] == 1
    assert PAST not in costs.tensor_degrees["logits"]
    assert costs.concrete_shapes["present.1.value"] == (1, 4, 25, 16)
    if style == "sliced":  # the mask as it comes grows with the total, not the past
        assert costs.tensor_degrees["attention_mask"][TOTAL] == 1
        assert PAST not in costs.tensor_degrees["attention_mask"]


def test_an_expression_dim_bound_anyway_is_found_to_follow():
    """Bound with --dim as plans before had to: it is found to follow from the past."""
    expression = f"{PAST} + 1"
    costs = analyze(model_of("plus-one"), {PAST: 24, expression: 25})
    assert costs.derived == {expression: expression}
    assert costs.activation_degrees(0, costs.num_nodes) == {PAST: 1, "batch": 1}


def test_an_expression_dim_is_never_bound_alone():
    """Only the dims it names need sizes; a missing one is named in the error."""
    from edge.errors import GraphError

    with pytest.raises(GraphError, match=PAST) as e:
        analyze(kv_decoder(f"{PAST} + {NEW}"), {NEW: 1})
    assert f"--dim {PAST}=SIZE" in str(e.value) and "+" not in str(e.value)


@pytest.mark.parametrize("style", list(STYLES))
@pytest.mark.parametrize("past", [300, 5000])
def test_bound_holds_for_every_tensor(style, past):
    """At past 300 and 5000, every tensor's real size (onnxruntime's outputs, shape
    inference for the rest) is within what the degrees measured at past 24 allow."""
    total, bindings = STYLES[style]
    model = model_of(style)
    planned = analyze(model, bindings)
    at = sizes_at(style, past)
    real = analyze(model, at)
    # the sizes analysed are those onnxruntime produces
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = session.run(None, decode_step(model, past))
    for o, value in zip(session.get_outputs(), outs):
        assert real.concrete_shapes[o.name] == value.shape, o.name
    free = free_sizes(planned.bindings, at, planned.derived)
    assert free[PAST] == past
    for t, size in planned.tensor_bytes.items():
        allowed = size * math.prod((free[sym] / planned.bindings[sym]) ** d
                                   for sym, d in planned.tensor_degrees[t].items())
        assert real.tensor_bytes[t] <= allowed + 1e-6, t
    # and tightly: the past's factor alone, not its square nor a second one for the total
    grown = real.live_bytes.max() / planned.live_bytes.max()
    assert grown <= past / 24 < 1.5 * grown


def plan_for(style: str, tmp_path, addresses, memory_mb: float = 120):
    """A plan for past 24 of ``style``'s decoder (written to ``tmp_path``), on devices of
    ``memory_mb``; (the model's path, the plan as loaded)."""
    from edge.build import make_plan
    from edge.planning.cluster import cluster_from_profile

    total, bindings = STYLES[style]
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"kv-{style}.onnx"
    onnx.save(model_of(style), str(path))
    devices = [dataclasses.replace(d, memory_mb=memory_mb)
               for d in cluster_from_profile("rpi4b-2gb", len(addresses),
                                             addresses=addresses).devices]
    make_plan(path, devices, tmp_path / "plan", bindings=bindings, modes=("fp32",))
    return path, load_plan(tmp_path / "plan" / "plan.json")


@pytest.mark.parametrize("style", list(STYLES))
def test_guard_arithmetic(style, tmp_path):
    """On a plan for past 24: a decode step at past 300 is admitted, and its bound covers
    the planner's own prediction at that size, within 1.5x; past 300,000 is refused, and
    so is a total length beyond past + new (a request the model would reject, but whose
    mask exists)."""
    from edge.planning.planner import evaluate

    model_path, plan = plan_for(style, tmp_path, ["127.0.0.1:1", "127.0.0.1:2"])
    assert plan.model.derived == ({TOTAL: f"{PAST} + {NEW}"} if style == "named" else {})
    step = decode_step(onnx.load(str(model_path)), 300)
    sizes = request_sizes(plan.model.inputs, [(k, v.shape) for k, v in step.items()])
    check_fits(plan, sizes)
    # The bound against the planner's own prediction at the real sizes, as the cache grows
    # 12-fold and 200-fold: above it, and within 1.5x of it, both for the whole stage and
    # for its activations alone (the part that grows).
    for past in (300, 5000):
        at = {**sizes, PAST: past, **({TOTAL: past + 1} if TOTAL in sizes else {})}
        real = analyze(model_path, sizes_at(style, past))
        for stage in plan.stages:
            p = stage.predicted
            bound = p.memory_at(plan.model.bindings, at, plan.model.derived)
            want = evaluate(real, stage.device, *stage.node_range, stage.mode)
            assert want.memory_mb <= bound <= 1.5 * want.memory_mb, (past, stage.index)
            act_bound = bound - p.memory_mb + p.activations_mb
            assert want.activations_mb <= act_bound <= 1.5 * want.activations_mb
    # Truly too large: refused, naming the past length (and not a total that follows).
    with pytest.raises(TooLarge, match=rf"{PAST}=300000.*has 120 MiB") as e:
        check_fits(plan, {**sizes, PAST: 300000, **({TOTAL: 300001} if TOTAL in sizes else {})})
    asked = str(e.value).split("would need")[0]
    assert "+" not in asked and (TOTAL not in asked or style == "sliced"), asked
    # A mask over 300,000 positions with a cache of 24: the excess counts in the past.
    total = TOTAL if TOTAL in sizes else next(k for k in sizes if dim_expression(k))
    with pytest.raises(TooLarge):
        check_fits(plan, {**{k: v for k, v in plan.model.bindings.items()}, **sizes,
                          PAST: 24, total: 300000})
    # The largest past the devices hold, and the limits shown to people.
    n = largest(plan, PAST)
    assert n >= 300
    check_fits(plan, {**sizes, PAST: n})
    limits = describe_limits(plan)
    assert f"{PAST} up to {n}" in limits and "+" not in limits
    if style != "sliced":  # a total that follows is no limit of its own
        assert largest(plan, TOTAL) is None and TOTAL not in limits


def test_old_plans_load(tmp_path):
    """plan.json without the derived dims and the per-tensor growth (made before they were
    recorded) loads, and is bounded as before: by each dim's highest degree, multiplied.
    A derived dim that is not a sum of dims is refused, naming the field."""
    import json

    from edge.errors import ConfigError

    for style in ("named", "sliced"):
        _, plan = plan_for(style, tmp_path / style, ["127.0.0.1:1"])
        path = tmp_path / style / "plan" / "plan.json"
        raw = json.loads(path.read_text())
        assert raw["model"]["derived"] == plan.model.derived
        assert raw["stages"][0]["predicted"]["activation_growth"]
        del raw["model"]["derived"]
        for stage in raw["stages"]:
            del stage["predicted"]["activation_growth"]
        path.write_text(json.dumps(raw))
        old = load_plan(path)
        assert old.model.derived == {} and old.stages[0].predicted.activation_growth == ()
    # The mask cut to length: the total is a dim of its own, and without the growth per
    # tensor its factor multiplies the past's.
    sizes = {**plan.model.bindings, PAST: 300, TOTAL: 301}
    new_bound = plan.stages[0].predicted.memory_at(plan.model.bindings, sizes)
    old_bound = old.stages[0].predicted.memory_at(old.model.bindings, sizes)
    p = plan.stages[0].predicted
    assert new_bound == pytest.approx(p.memory_mb + p.activations_mb * (300 / 24 - 1))
    assert old_bound == pytest.approx(p.memory_mb + p.activations_mb * (300 / 24 * 301 / 25 - 1))
    raw["model"]["derived"] = {TOTAL: "past * 2 ** 3"}
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=r"model\.derived\.total_sequence_length.*expected a sum"):
        load_plan(path)


@pytest.mark.parametrize("style", ["named", "sliced", "plus-one"])
def test_decode_step_is_served(style, tmp_path):
    """Real workers: a decode step at past 300 on a plan for past 24 passes the guard and
    comes back as the whole model computes it; past 300,000 is refused before any worker
    sees it."""
    import grpc

    from edge.coordinator.pipeline import InferError, Pipeline
    from edge.transport.codec import decode_tensors
    from edge.worker.launch import LocalWorkers

    with LocalWorkers(2, tmp_path / "w", threads=1) as workers:
        model_path, plan = plan_for(style, tmp_path, workers.addresses)
        model = onnx.load(str(model_path))
        step = decode_step(model, 300)
        session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        want = dict(zip([o.name for o in session.get_outputs()], session.run(None, step)))
        with Pipeline(plan, tmp_path / "plan") as pipeline:
            pipeline.start()
            got = decode_tensors(pipeline.infer(step).outputs)
            assert set(got) == set(want)
            for k in want:
                np.testing.assert_allclose(got[k], want[k], atol=1e-4, rtol=0)
            with pytest.raises(InferError) as e:
                pipeline.infer(decode_step(model, 300000))
            assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert pipeline.requests_failed == 0
        assert all(w.process.poll() is None for w in workers.workers)
