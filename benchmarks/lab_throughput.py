"""Pipelined throughput of 4 stages against one device, measured in the device lab.

The same comparison ``edge bench`` makes as "a. ... measured in the emulated lab", on its
own (see ``edge.bench.lab_pipeline``). Needs root.

    python benchmarks/lab_throughput.py --model bert-base --profile rpi4b-2gb --requests 48
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bert-base", help="KIND-SIZE, e.g. bert-base")
    ap.add_argument("--profile", default="rpi4b-2gb")
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--sequence", type=int, default=128)
    ap.add_argument("--requests", type=int, default=48, help="per throughput block")
    ap.add_argument("--in-flight", type=int, help="for the pipeline (default 2 per stage)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--work", default=None)
    ap.add_argument("--json")
    args = ap.parse_args()

    from edge.bench.lab_pipeline import lab_pipeline_vs_one
    from edge.export import example_inputs, export_model

    kind, size = args.model.split("-", 1)
    work = Path(args.work or tempfile.mkdtemp(prefix="edge-lab-tp-"))
    model = work / f"{kind}-{size}.onnx"
    if not model.exists():
        export_model(kind, size=size, seed=0, out=model)
    inputs = [example_inputs(kind, size, batch=1, seq=args.sequence, seed=i)
              for i in range(args.requests)]
    result = lab_pipeline_vs_one(model, inputs, {"batch": 1, "sequence": args.sequence},
                                 args.profile, args.devices, args.rounds, work,
                                 in_flight=args.in_flight,
                                 say=lambda m: print(m, file=sys.stderr))
    result["model"] = args.model
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["status"] == "measured" else 2


if __name__ == "__main__":
    sys.exit(main())
