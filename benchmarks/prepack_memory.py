"""Prepacking and the arena on a generation stage: load peak, steady RSS and step times.

onnxruntime prepacks the constant B of a MatMul into a packed copy while the session is
built; for a moment the mapped original and the packed copy are both resident. For
SmolLM2's LM head (576 x 49152 float32, 108 MiB) that is the load peak that kept the head
off a 260 MiB Pi Zero 2 W. This measures, one fresh process per case (peak RSS from VmHWM):

- ``head``: the LM head alone (one MatMul, random weights in an external data file);
- ``layers``: a decoder-layer shard of a real plan (``--shard``), fed real activations
  computed by the shard before it (``--prev``).

For each, prepacking on/off x arena on/off: VmHWM after the session is built (the load
peak), VmRSS after the runs (steady), VmHWM at the end, the prefill time (``--prefill``
tokens) and the median decode step (one token, the prefill as past).

    PYTHONPATH=$PWD python benchmarks/prepack_memory.py --work /tmp/prepack \\
        --shards /tmp/kvdemo-work/real/build/shards

The shard folder is that of a SmolLM2 plan whose stage 0 takes the token ids and stage 1
holds decoder layers only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HIDDEN, VOCAB = 576, 49152


def _status(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _head_model(work: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    path = work / "head.onnx"
    if path.is_file():
        return path
    w = np.random.default_rng(0).normal(0, 0.02, (HIDDEN, VOCAB)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["hidden", "W"], ["logits"])], "head",
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [1, "sequence", HIDDEN])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "sequence", VOCAB])],
        [numpy_helper.from_array(w, "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="head.onnx.data", size_threshold=1024)
    return path


def _feeds(case: str, shards: Path, work: Path, prefill: int):
    """(prefill feeds, decode feeds) for the case's model."""
    if case == "head":
        rng = np.random.default_rng(1)
        return ({"hidden": rng.normal(size=(1, prefill, HIDDEN)).astype(np.float32)},
                {"hidden": rng.normal(size=(1, 1, HIDDEN)).astype(np.float32)})
    cache = work / f"layers-{prefill}.npz"
    if not cache.is_file():
        import onnxruntime as ort

        s0 = ort.InferenceSession(str(shards / "stage-0.onnx"))
        names = [o.name for o in s0.get_outputs()]

        def run0(ids, past, start):
            n = len(ids)
            feeds = {"input_ids": np.array([ids], np.int64),
                     "attention_mask": np.ones((1, start + n), np.int64),
                     "position_ids": np.arange(start, start + n, dtype=np.int64)[None]}
            for i in s0.get_inputs():
                if i.name.startswith("past_key_values"):
                    feeds[i.name] = past.get(i.name, np.zeros((1, 3, 0, 64), np.float32))
            return dict(zip(names, s0.run(None, feeds)))

        ids = list(range(100, 100 + prefill))
        out_p = run0(ids, {}, 0)
        past = {k.replace("present", "past_key_values"): v for k, v in out_p.items()
                if k.startswith("present")}
        out_d = run0([42], past, prefill)
        np.savez(cache, **{f"p:{k}": v for k, v in out_p.items()},
                 **{f"d:{k}": v for k, v in out_d.items()})
    z = np.load(cache)
    return ({k[2:]: z[k] for k in z.files if k.startswith("p:")},
            {k[2:]: z[k] for k in z.files if k.startswith("d:")})


def _child(args) -> None:
    from edge.profiling.memory import tune_malloc

    tune_malloc()
    import onnxruntime as ort

    from edge.shards.runtime import session_options

    shards, work = Path(args.shards), Path(args.work)
    model = _head_model(work) if args.case == "head" else shards / args.shard
    pre, dec = _feeds(args.case, shards, work, args.prefill)
    base = _status("VmHWM")
    so = session_options(args.threads, "fp32")
    so.enable_cpu_mem_arena = args.arena
    if not args.prepack:
        so.add_session_config_entry("session.disable_prepacking", "1")
    t0 = time.perf_counter()
    sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - t0
    load_peak = _status("VmHWM")
    inputs = {i.name for i in sess.get_inputs()}
    past_names = [i.name for i in sess.get_inputs() if i.name.startswith("past_key_values")]

    def feeds(base_feeds, past):
        f = {k: v for k, v in base_feeds.items() if k in inputs}
        for n in past_names:
            f[n] = past.get(n, np.zeros((1, 3, 0, 64), np.float32))
        return f

    outs = [o.name for o in sess.get_outputs()]
    t0 = time.perf_counter()
    res = dict(zip(outs, sess.run(None, feeds(pre, {}))))
    prefill_ms = (time.perf_counter() - t0) * 1e3
    past = {k.replace("present", "past_key_values"): v for k, v in res.items()
            if k.startswith("present")}
    steps = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        sess.run(None, feeds(dec, past))
        steps.append((time.perf_counter() - t0) * 1e3)
    print(json.dumps({"case": args.case, "prepack": args.prepack, "arena": args.arena,
                      "before_mb": round(base, 1), "load_peak_mb": round(load_peak, 1),
                      "steady_mb": round(_status("VmRSS"), 1),
                      "peak_mb": round(_status("VmHWM"), 1), "load_s": round(load_s, 2),
                      "prefill_ms": round(prefill_ms, 1),
                      "decode_ms": round(float(np.median(steps)), 2)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/prepack")
    p.add_argument("--shards", default="/tmp/kvdemo-work/real/build/shards")
    p.add_argument("--shard", default="stage-1.onnx")
    p.add_argument("--cases", default="head,layers")
    p.add_argument("--prefill", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--child", action="store_true")
    p.add_argument("--case", default="head")
    p.add_argument("--prepack", type=int, default=1)
    p.add_argument("--arena", type=int, default=1)
    args = p.parse_args()
    if args.child:
        args.prepack, args.arena = bool(args.prepack), bool(args.arena)
        return _child(args)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    # Made here, so that no child's peak holds the weights' or stage 0's making.
    for case in args.cases.split(","):
        if case == "head":
            _head_model(work)
        _feeds(case, Path(args.shards), work, args.prefill)
    for case in args.cases.split(","):
        for _ in range(args.repeat):
            for prepack in (1, 0):
                for arena in (1, 0):
                    cmd = [sys.executable, __file__, "--child", "--case", case,
                           "--prepack", str(prepack), "--arena", str(arena),
                           "--work", args.work, "--shards", args.shards, "--shard", args.shard,
                           "--prefill", str(args.prefill), "--steps", str(args.steps),
                           "--threads", str(args.threads)]
                    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                    print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
