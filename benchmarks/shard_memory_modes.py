"""Peak RSS of one shard under different weight formats and onnxruntime session settings.

Answers: does onnxruntime memory-map external-data initializers, which settings keep the
mapped weights file-backed (droppable) instead of copying them to anonymous memory, and what
is the lowest peak RSS for the first BERT stage (word embedding) and for the others.

For every (stage, mode) a FRESH subprocess that imports only numpy and onnxruntime (plus
edge.shards.runtime, which imports only onnxruntime) loads one shard, runs it 3 times on the
stage's real inputs and reports VmHWM, VmRSS, RssAnon and RssFile from /proc/self/status
after load and after the runs, how much of the external data file is resident (from
/proc/self/smaps) and the median latency of a few more runs.

    python benchmarks/shard_memory_modes.py                      # export BERT-base, plan 4 stages
    python benchmarks/shard_memory_modes.py --build /tmp/mm/build  # reuse plan dir (shards/ + plan)
    python benchmarks/shard_memory_modes.py --stages 0 --modes c_ext_noprepack,f_ext64k_noprepack
    python benchmarks/shard_memory_modes.py --json out.json

Modes (all use edge.shards.runtime.session_options unless the mode changes a setting):
  a_embedded             weights inside the .onnx, as `edge plan` writes them
  a_embedded_noprepack   a + session.disable_prepacking=1
  b_ext                  onnx.save_model(save_as_external_data=True, all_tensors_to_one_file=True)
  c_ext_noprepack        b + session.disable_prepacking=1
  d_ext_noprepack_basic  c + ORT_ENABLE_BASIC
  d_ext_noprepack_noopt  c + ORT_DISABLE_ALL
  e_ext_noprepack_noarena  c + enable_cpu_mem_arena=False, enable_mem_pattern=False
  f_ext4k_noprepack      c, every tensor's offset in the data file aligned to 4 KiB
  f_ext64k[_noprepack]   b / c, offsets aligned to 64 KiB
  g_embedded_bytes       a, but InferenceSession(model_bytes) instead of a path
  g_ext_bytes_filesmem   c's .onnx from bytes + add_external_initializers_from_files_in_memory(np.memmap)
  h_memmap_inits[_noprepack]  SessionOptions.add_external_initializers, OrtValues over np.memmap views
  h_memmapcow_inits_noprepack  the same with a copy-on-write (writable) np.memmap
  j_ext_noprepack_fadv   c + fsync + posix_fadvise(DONTNEED) on the data file before the session
  j_ext_noprepack_fadv_rand  j + madvise(MADV_RANDOM) on onnxruntime's mappings of the data file
  j_ext_prepack_fadv[_rand]  the same with prepacking on
  k_split_*              4 KiB-aligned external data, Gather tables (word embedding) in their own
                         <shard>.gather.data; randgather = MADV_RANDOM on that file's mappings only
  l_split_prepack_fadv_randgather_noarena  k with prepacking on + arena and memory pattern off
  i_int8_*               quantize_dynamic(QInt8, per_channel=True), then the same format/settings
  cos = min cosine similarity over the float outputs vs the fp32 shard run with the worker's settings

Needs ``edge[export]`` (torch) only to export the model when ``--build`` is not given.

Measured (x86-64, 2 cores, kernel 6.18, ext4, onnxruntime 1.32, BERT-base/4, seq 128), VmHWM
after 3 runs: stage 0 320 MiB embedded -> 231 external -> 162 external + fadvise(DONTNEED)
(+ MADV_RANDOM on the embedding) -> 156 with the arena off; stage 1 207 -> 160 -> 154. int8:
95 / 93 MiB, cosine >= 0.9997. Alignment of offsets, optimisation level, and loading from
bytes/np.memmap buy nothing (the last two copy everything).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------
# Child: imports numpy + onnxruntime only. argv[1] is a JSON spec.
# ---------------------------------------------------------------------------------------------
_CHILD = r"""
import json, os, statistics, sys, time
import numpy as np
import onnxruntime as ort
from edge.shards.runtime import session_options

spec = json.loads(sys.argv[1])

def status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[k] = round(int(v.split()[0]) / 1024.0, 1)
    return out

def data_file_rss():
    # MiB of the external data file that is mapped and resident in this process, and the
    # number of separate mappings of it (one per tensor when ORT maps tensor by tensor).
    target = spec.get("data_file")
    if not target:
        return None
    targets = {os.path.realpath(target), os.path.realpath(target[:-5] + ".gather.data")}
    rss = 0; maps = 0; cur = None; biggest = 0
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 5 and "-" in parts[0] and ":" in parts[3]:
                cur = parts[5] if len(parts) >= 6 else ""
                if cur in targets:
                    maps += 1
            elif parts and parts[0] == "Rss:" and cur in targets:
                kb = int(parts[1]); rss += kb; biggest = max(biggest, kb)
    return {"mapped_rss": round(rss / 1024.0, 1), "mappings": maps, "largest_mapping_rss": round(biggest / 1024.0, 1)}

floor = status()
if spec.get("fadvise") and spec.get("data_file"):
    # What a worker can do right after it has written a shard it received: flush it, then
    # drop it from the page cache, so later faults read it back in small (order-0) folios.
    for p in (spec["data_file"], spec["data_file"][:-5] + ".gather.data"):
        if os.path.exists(p):
            fd = os.open(p, os.O_RDONLY)
            os.fsync(fd); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); os.close(fd)
feeds = dict(np.load(spec["feeds"]))
so = session_options()
for k, v in spec.get("config", {}).items():
    so.add_session_config_entry(k, v)
if "opt" in spec:
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, spec["opt"])
if spec.get("no_arena"):
    so.enable_cpu_mem_arena = False
    so.enable_mem_pattern = False
if spec.get("verbose"):
    so.log_severity_level = 0
keep = []
if spec.get("memmap_inits"):
    # {name: [offset, shape, dtype]} in spec["data_file"]
    mm = np.memmap(spec["data_file"], dtype=np.uint8, mode=spec.get("memmap_mode", "r"))
    names, vals = [], []
    for name, (off, shape, dt) in spec["memmap_inits"].items():
        n = int(np.prod(shape)) * np.dtype(dt).itemsize
        arr = mm[off:off + n].view(dt).reshape(shape)
        names.append(name); vals.append(ort.OrtValue.ortvalue_from_numpy(arr))
    so.add_external_initializers(names, vals)
    keep += [mm, vals]
if spec.get("files_in_memory"):
    mm = np.memmap(spec["data_file"], dtype=np.uint8, mode="r")
    so.add_external_initializers_from_files_in_memory([os.path.basename(spec["data_file"])], [mm], [mm.size])
    keep.append(mm)
t0 = time.perf_counter()
if spec.get("from_bytes"):
    with open(spec["model"], "rb") as f:
        model = f.read()
    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    del model
else:
    sess = ort.InferenceSession(spec["model"], so, providers=["CPUExecutionProvider"])
load_s = time.perf_counter() - t0
if spec.get("madv_random") and spec.get("data_file"):
    # MADV_RANDOM on onnxruntime's mappings of the data file: no read-around on a fault.
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    target = os.path.realpath(spec["data_file"])
    if spec["madv_random"] == "gather":
        target = target[:-5] + ".gather.data"
    with open("/proc/self/maps") as f:
        for line in f:
            p = line.split()
            if len(p) >= 6 and p[5] == target:
                a, b = (int(x, 16) for x in p[0].split("-"))
                if libc.madvise(a, b - a, 1) != 0:  # MADV_RANDOM
                    raise OSError(ctypes.get_errno(), "madvise")
names = [i.name for i in sess.get_inputs()]
feed = {n: feeds[n] for n in names}
loaded = status(); loaded_map = data_file_rss()
times = []
for _ in range(3):
    t = time.perf_counter(); outs = sess.run(None, feed); times.append(time.perf_counter() - t)
ran = status(); ran_map = data_file_rss()
for _ in range(spec.get("timing_runs", 10)):
    t = time.perf_counter(); outs = sess.run(None, feed); times.append(time.perf_counter() - t)
if spec.get("save_outputs"):
    np.savez(spec["save_outputs"], **{o.name: v for o, v in zip(sess.get_outputs(), outs)})
print(json.dumps({"floor": floor, "loaded": loaded, "ran": ran, "final": status(),
                  "loaded_map": loaded_map, "ran_map": ran_map, "load_s": round(load_s, 2),
                  "first_ms": round(times[0] * 1e3, 1),
                  "median_ms": round(statistics.median(times[3:] or times[1:]) * 1e3, 1)}))
"""


def run_child(spec: dict) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(spec)], capture_output=True, text=True, env=env)
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or [f"rc={p.returncode}"])[-1][:300]}
    return json.loads(p.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# Building the variants (parent; may import onnx)
# ---------------------------------------------------------------------------------------------


def build_plan(work: Path) -> Path:
    from edge.export import export_model
    from edge.build import make_plan
    from edge.planning.cluster import cluster_from_profile

    m = export_model("bert", size="base", seed=0, out=str(work / "bert-base.onnx"))
    cl = cluster_from_profile("rpi4b-2gb", 4)
    make_plan(m, cl.devices, str(work / "build"), bindings={"batch": 1, "sequence": 128})
    return work / "build"


def stage_feeds(shards: list[Path], upto: int, work: Path) -> list[Path]:
    """Run stages 0..upto in order on the example inputs; save each stage's feeds as .npz
    (feeds-N.npz) and its fp32 outputs with the worker's settings (ref-N.npz)."""
    import onnxruntime as ort

    from edge.export import example_inputs
    from edge.shards.runtime import session_options

    env = dict(example_inputs("bert", "base", batch=1, seq=128))
    out = []
    for i in range(upto + 1):
        sess = ort.InferenceSession(str(shards[i]), session_options(), providers=["CPUExecutionProvider"])
        feed = {x.name: env[x.name] for x in sess.get_inputs()}
        p = work / f"feeds-{i}.npz"
        np.savez(p, **feed)
        out.append(p)
        outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))
        np.savez(work / f"ref-{i}.npz", **outs)
        env.update(outs)
        del sess
    return out


def save_external(src: Path, dst: Path, align: int = 0, threshold: int = 1024, split_gather: bool = False) -> dict:
    """Write dst (.onnx) + dst.data. align=0: onnx.save_model's own layout (packed).

    align>0: every tensor >= threshold bytes starts at a multiple of `align` in the data file
    (onnx 1.23 has no alignment option; onnx.save_model keeps a preset offset and pads up to
    64 KiB, so we set location/offset/length ourselves). split_gather: initializers read by a
    Gather (embedding tables) go to dst.gather.data instead, so a worker can madvise that file
    alone. Returns {name: [offset, shape, dtype]}.
    """
    import onnx

    model = onnx.load(str(src))
    data = dst.with_name(dst.name + ".data")
    if align == 0:
        onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=threshold)
        model = onnx.load(str(dst), load_external_data=False)
    else:
        gathered = {n.input[0] for n in model.graph.node if n.op_type == "Gather"} if split_gather else set()
        files = {False: [open(data, "wb"), 0, data.name]}
        if gathered:
            g = dst.with_name(dst.name + ".gather.data")
            files[True] = [open(g, "wb"), 0, g.name]
        for t in model.graph.initializer:
            if not t.HasField("raw_data") or len(t.raw_data) < threshold:
                continue
            slot = files[t.name in gathered]
            f, off, loc = slot
            pad = (-off) % align
            f.write(b"\0" * pad)
            off += pad
            raw = t.raw_data
            f.write(raw)
            del t.external_data[:]
            for k, v in (("location", loc), ("offset", str(off)), ("length", str(len(raw)))):
                e = t.external_data.add()
                e.key, e.value = k, v
            t.data_location = onnx.TensorProto.EXTERNAL
            t.ClearField("raw_data")
            slot[1] = off + len(raw)
        for f, _, _ in files.values():
            f.close()
        onnx.save_model(model, str(dst))
    table = {}
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            kv = {e.key: e.value for e in t.external_data}
            dt = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
            table[t.name] = [int(kv.get("offset", 0)), list(t.dims), np.dtype(dt).str]
    return table


def copy_like_upload(src: Path, dst: Path, chunk: int = 1 << 20) -> None:
    """Copy with plain write() calls in 1 MiB blocks, as edge.worker.cache does with an upload
    (shutil.copyfile uses copy_file_range, which leaves the page cache in another state)."""
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        while block := fi.read(chunk):
            fo.write(block)


def quantize(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = np.nan_to_num(a.astype(np.float64).ravel())
    b = np.nan_to_num(b.astype(np.float64).ravel())
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:  # e.g. the all-zero additive attention mask passed through
        return 1.0 if np.array_equal(a, b) else 0.0
    return float(a @ b / (na * nb))


NOPRE = {"session.disable_prepacking": "1"}

# mode -> (weights variant, child spec overrides)
ADV = {"fadvise": True, "madv_random": True}
MODES: dict[str, tuple[str, dict]] = {
    "a_embedded": ("emb", {}),
    "a_embedded_noprepack": ("emb", {"config": NOPRE}),
    "b_ext": ("ext", {}),
    "c_ext_noprepack": ("ext", {"config": NOPRE}),
    "d_ext_noprepack_basic": ("ext", {"config": NOPRE, "opt": "ORT_ENABLE_BASIC"}),
    "d_ext_noprepack_noopt": ("ext", {"config": NOPRE, "opt": "ORT_DISABLE_ALL"}),
    "e_ext_noprepack_noarena": ("ext", {"config": NOPRE, "no_arena": True}),
    "f_ext4k_noprepack": ("ext4k", {"config": NOPRE}),
    "f_ext64k": ("ext64k", {}),
    "f_ext64k_noprepack": ("ext64k", {"config": NOPRE}),
    "g_embedded_bytes": ("emb", {"from_bytes": True}),
    "g_ext_bytes_filesmem": ("ext", {"from_bytes": True, "files_in_memory": True, "config": NOPRE}),
    "h_memmap_inits": ("ext64k", {"memmap_inits": True}),
    "h_memmap_inits_noprepack": ("ext64k", {"memmap_inits": True, "config": NOPRE}),
    "h_memmapcow_inits_noprepack": ("ext64k", {"memmap_inits": True, "memmap_mode": "c", "config": NOPRE}),
    "j_ext_noprepack_fadv": ("ext", {"config": NOPRE, "fadvise": True}),
    "j_ext_noprepack_fadv_rand": ("ext", {"config": NOPRE, **ADV}),
    "j_ext_prepack_fadv": ("ext", {"fadvise": True}),
    "j_ext_prepack_fadv_rand": ("ext", {**ADV}),
    "k_split_noprepack": ("split", {"config": NOPRE}),
    "k_split_noprepack_fadv_randgather": ("split", {"config": NOPRE, "fadvise": True, "madv_random": "gather"}),
    "k_split_prepack_fadv_randgather": ("split", {"fadvise": True, "madv_random": "gather"}),
    "l_split_prepack_fadv_randgather_noarena": ("split", {"fadvise": True, "madv_random": "gather", "no_arena": True}),
    "i_int8_embedded": ("q_emb", {}),
    "i_int8_ext": ("q_ext", {}),
    "i_int8_ext_noprepack": ("q_ext", {"config": NOPRE}),
    "i_int8_ext_noprepack_fadv_rand": ("q_ext", {"config": NOPRE, **ADV}),
    "i_int8_split_noprepack_fadv_randgather": ("q_split", {"config": NOPRE, "fadvise": True, "madv_random": "gather"}),
    "i_int8_split_prepack_fadv_randgather_noarena": ("q_split", {"fadvise": True, "madv_random": "gather", "no_arena": True}),
}
DEFAULT_MODES = list(MODES)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", type=Path, help="plan directory with shards/stage-N.onnx (default: export + plan)")
    ap.add_argument("--stages", default="0,1")
    ap.add_argument("--modes", default=",".join(DEFAULT_MODES))
    ap.add_argument("--repeat", type=int, default=1, help="fresh processes per (stage, mode); min VmHWM is kept")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    stages = [int(s) for s in args.stages.split(",")]
    modes = args.modes.split(",")

    with tempfile.TemporaryDirectory(prefix="shard-mem-") as tmp:
        work = Path(tmp)
        build = args.build or build_plan(work)
        shards = [build / "shards" / f"stage-{i}.onnx" for i in range(max(stages) + 1)]
        feeds = stage_feeds(shards, max(stages), work)
        rows = []
        for s in stages:
            variants: dict[str, tuple[Path, dict | None]] = {"emb": (shards[s], None)}
            need = {MODES[m][0] for m in modes}

            def get(v: str) -> tuple[Path, dict | None]:
                if v in variants:
                    return variants[v]
                base = shards[s]
                if v.startswith("q_"):
                    q = work / f"s{s}-int8.onnx"
                    if not q.exists():
                        quantize(base, q)
                    base = q
                    variants.setdefault("q_emb", (q, None))
                    if v == "q_emb":
                        return variants[v]
                kind = v.removeprefix("q_")
                align = {"ext": 0, "ext4k": 4096, "ext64k": 65536, "split": 4096}[kind]
                dst = work / f"s{s}-{v}" / f"stage-{s}.onnx"
                dst.parent.mkdir(exist_ok=True)
                variants[v] = (dst, save_external(base, dst, align, split_gather=kind == "split"))
                return variants[v]

            ref = work / f"ref-{s}.npz"
            for m in modes:
                v, over = MODES[m]
                if v not in need:
                    continue
                src, table = get(v)
                # Every child gets a freshly written copy, like a worker that has just received
                # its shard: the page cache then holds what write() left there (on ext4 with
                # kernel >= 6.16, large folios), not what an earlier child faulted in.
                run = work / "run"
                shutil.rmtree(run, ignore_errors=True)
                run.mkdir()
                for f in src.parent.glob(src.name + "*"):
                    copy_like_upload(f, run / f.name)
                path = run / src.name
                spec = {"model": str(path), "feeds": str(feeds[s]), **over}
                if table is not None:
                    spec["data_file"] = str(path.with_name(path.name + ".data"))
                if over.get("memmap_inits"):
                    spec["memmap_inits"] = table
                outp = work / f"s{s}-{m}-out.npz"
                spec["save_outputs"] = str(outp)
                best = None
                for _ in range(args.repeat):
                    r = run_child(spec)
                    if best is None or ("error" not in r and r["ran"]["VmHWM"] < best.get("ran", {}).get("VmHWM", 1e9)):
                        best = r
                r = best
                if "error" not in r:
                    with np.load(ref) as a, np.load(outp) as b:
                        r["cos_min"] = round(min(cosine(a[k], b[k]) for k in a.files if a[k].dtype.kind == "f"), 6)
                r.update(stage=s, mode=m, file_mb=round(sum(p.stat().st_size for p in path.parent.glob(path.name + "*")) / 2**20, 1))
                rows.append(r)
                print(fmt(r), flush=True)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))


HEADER = (f"{'stage':>5} {'mode':<26} {'file':>6} | {'HWM':>6} {'anon':>6} {'file':>6} {'dmap':>6} | "
          f"{'HWM':>6} {'anon':>6} {'file':>6} {'dmap':>6} | {'1st':>6} {'med':>6} {'cos':>8}")


def fmt(r: dict) -> str:
    if "error" in r:
        return f"{r['stage']:>5} {r['mode']:<26} ERROR {r['error']}"
    lm = (r.get("loaded_map") or {}).get("mapped_rss", "-")
    rm = (r.get("ran_map") or {}).get("mapped_rss", "-")
    L, R = r["loaded"], r["ran"]
    return (f"{r['stage']:>5} {r['mode']:<26} {r['file_mb']:>6} | {L['VmHWM']:>6} {L['RssAnon']:>6} {L['RssFile']:>6} {lm:>6} | "
            f"{R['VmHWM']:>6} {R['RssAnon']:>6} {R['RssFile']:>6} {rm:>6} | {r['first_ms']:>6} {r['median_ms']:>6} "
            f"{r.get('cos_min', '-'):>8}")


if __name__ == "__main__":
    print("MiB; left block after load, right block after 3 runs; dmap = resident part of the external data file", flush=True)
    print(HEADER, flush=True)
    main()
