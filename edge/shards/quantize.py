"""int8 shards: quantize a built fp32 shard, and measure how far its outputs drift.

onnxruntime's dynamic quantization (``quantize_dynamic(weight_type=QInt8,
per_channel=True)``) stores MatMul and Conv weights as int8 with one scale per output
channel and runs them as MatMulInteger / ConvInteger on activations quantized on the fly.
In onnxruntime 1.32 it also quantizes Gather tables (per tensor, uint8): the Gather then
reads ``<table>_quantized`` and a DequantizeLinear follows it. The quantized shard is
written in the same layout as an fp32 one (``edge.shards.build.save_shard``), so the
quantized embedding table, being what the Gather reads, lands in ``.gather.data``.
Before quantizing, Gemm layers with constant weights become MatMul + Add and transposes of
constant weights are folded (``_prepare``), both exact, so that they are quantized too.

Measured on BERT-base over 4 stages (seq 128): peak RSS 95 / 93 MiB against ~160 MiB
fp32, cosine of stage outputs vs fp32 >= 0.9997 (benchmarks/shard_memory_modes.py).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from edge.errors import GraphError
from edge.planning.intake import set_nodes
from edge.shards.build import ShardInfo, save_shard
from edge.shards.runtime import session_options

__all__ = ["quantize_shard", "drift", "cosine"]

log = logging.getLogger(__name__)


def quantize_shard(src: str | Path, dst: str | Path, check: bool = True) -> ShardInfo:
    """Quantize the fp32 shard ``src`` to int8 and write it as ``dst`` + data files.

    Args:
        src: a shard written by ``build_shard`` (its data files beside it).
        dst: the ``.onnx`` to write; may be ``src`` itself (it is read whole first).
        check: run the ONNX checker on the result.

    Returns:
        ShardInfo of ``dst`` (sha256 and size of the ``.onnx``; its data files).
    """
    # Slow to import (it loads onnx's and its own tooling): only int8 plans need it.
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = Path(src), Path(dst)
    with tempfile.TemporaryDirectory(prefix="edge-int8-") as tmp:
        fp32 = onnx.load(str(src))
        if _prepare(fp32):
            src = Path(tmp) / "fp32.onnx"
            onnx.save_model(fp32, str(src), save_as_external_data=True,
                            location="fp32.onnx.data", size_threshold=1024)
        del fp32
        out = Path(tmp) / "int8.onnx"
        root = logging.getLogger()
        root.addFilter(_no_preprocess_hint)
        try:
            quantize_dynamic(src, out, weight_type=QuantType.QInt8, per_channel=True,
                             use_external_data_format=True)
        except Exception as e:
            raise GraphError(f"int8 quantization of {src} failed: {e}") from e
        finally:
            root.removeFilter(_no_preprocess_hint)
        m = onnx.load(str(out))  # with its weights, before dst's files are replaced
    digest, size, data_files = save_shard(m, dst, check=check, what=f"int8 shard {dst.name}")
    g = m.graph
    log.info("int8 shard %s: %.1f MiB of weights", dst.name,
             sum(f.size for f in data_files) / 2**20)
    return ShardInfo(path=dst, sha256=digest, size=size,
                     inputs=tuple(i.name for i in g.input),
                     outputs=tuple(o.name for o in g.output),
                     initializers=tuple(t.name for t in g.initializer),
                     data_files=tuple(data_files))


def _prepare(m: onnx.ModelProto) -> int:
    """Rewrite, exactly, what dynamic quantization would leave in fp32; in place.

    - ``Gemm(A, W, C)`` with an initializer ``W`` (alpha = beta = 1, A not transposed)
      becomes ``MatMul(A, W') + C``: onnxruntime quantizes MatMul, not Gemm, and GPT-2's
      Conv1D layers export as Gemm.
    - ``Transpose(W)`` of an initializer becomes the transposed initializer, so a MatMul
      reading it (GPT-2's head, tied to the embedding) gets an int8 weight.

    Returns:
        The number of nodes rewritten.
    """
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    nodes, added, changed = [], [], 0
    for nd in g.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in nd.attribute}
        if (nd.op_type == "Transpose" and nd.domain in ("", "ai.onnx")
                and nd.input[0] in inits
                and inits[nd.input[0]].data_type == onnx.TensorProto.FLOAT):
            w = numpy_helper.to_array(inits[nd.input[0]])
            perm = attrs.get("perm")
            added.append(numpy_helper.from_array(
                np.ascontiguousarray(np.transpose(w, perm if perm else None)), nd.output[0]))
            changed += 1
            continue
        if (nd.op_type == "Gemm" and nd.domain in ("", "ai.onnx") and nd.input[1] in inits
                and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0
                and not attrs.get("transA", 0)
                and inits[nd.input[1]].data_type == onnx.TensorProto.FLOAT):
            b = nd.input[1]
            if attrs.get("transB", 0):
                w = numpy_helper.to_array(inits[b]).T
                b = f"{nd.input[1]}_transposed"
                if b not in inits:
                    added.append(numpy_helper.from_array(np.ascontiguousarray(w), b))
                    inits[b] = added[-1]
            has_c = len(nd.input) > 2 and nd.input[2]
            mm_out = f"{nd.output[0]}_matmul" if has_c else nd.output[0]
            name = nd.name or nd.output[0]
            nodes.append(helper.make_node("MatMul", [nd.input[0], b], [mm_out],
                                          name=f"{name}_matmul"))
            if has_c:
                nodes.append(helper.make_node("Add", [mm_out, nd.input[2]], [nd.output[0]],
                                              name=f"{name}_bias"))
            changed += 1
            continue
        nodes.append(nd)
    if changed:
        g.initializer.extend(added)
        set_nodes(g, nodes)
    return changed


def _no_preprocess_hint(record: logging.LogRecord) -> bool:
    # quantize_dynamic logs this on the root logger for every model; the shard comes from
    # an exported, already shape-inferred graph.
    return "pre-processing before quantization" not in record.getMessage()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two arrays, flattened, in float64 (1.0 when both are zero)."""
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    nx, ny = float(np.linalg.norm(x)), float(np.linalg.norm(y))
    if nx == 0.0 or ny == 0.0:
        return 1.0 if nx == ny else 0.0
    return float(np.dot(x, y) / (nx * ny))


def drift(fp32_shard: str | Path, int8_shard: str | Path,
          feeds: Mapping[str, np.ndarray]) -> float:
    """Min cosine similarity over the float outputs of an int8 shard against its fp32 one.

    Both run with the worker's session options for their mode, one thread.

    Args:
        fp32_shard, int8_shard: the two ``.onnx`` files (data files beside them).
        feeds: the stage's inputs (extra names are ignored).
    """
    outs = []
    for path, mode in ((fp32_shard, "fp32"), (int8_shard, "int8")):
        sess = ort.InferenceSession(str(path), session_options(1, mode),
                                    providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        res = sess.run(None, {i.name: feeds[i.name] for i in sess.get_inputs()})
        outs.append(dict(zip(names, res)))
    ref, got = outs
    sims = [cosine(ref[k], got[k]) for k in ref
            if np.issubdtype(np.asarray(ref[k]).dtype, np.floating)]
    return min(sims) if sims else 1.0
