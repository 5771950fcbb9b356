"""The torch.distributed.pipelining peer of `edge bench`: the same BERT, split where edge's
plan splits it (``edge.bench.split``), run by one process per stage with gloo on loopback.

Each rank loads only its own stage module, saved by the bench process from the seeded
torch model that ``edge.export`` exported, so neither side pays for the whole model on any
device. A rank runs ``ScheduleGPipe`` (forward only, no loss) and is driven by the bench
over its stdin/stdout, one JSON line per command, so that edge and torch measurements can
alternate within one run:

    {"op": "run", "inputs": "x.npz", "microbatches": M, "repeat": K, "save": "out.npz"}
    {"op": "memory"}            -> VmHWM / VmRSS now, after imports and after loading
    {"op": "stop"}

Run as ``python -m edge.bench.torch_peer --rank R --world N --master HOST:PORT --stage F``.
This module imports torch; only the bench (which exports with torch anyway) loads it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from edge.bench.split import LayerSplit
from edge.errors import EdgeError
from edge.export import build_model
from edge.export.specs import get_spec
from edge.worker.launch import module_command

__all__ = ["BertStage", "PeerError", "TorchPeer", "save_stages", "run_stages"]

log = logging.getLogger(__name__)

_OUTPUTS = ("last_hidden_state", "pooler_output")


class PeerError(EdgeError):
    """A torch rank failed or did not answer; the message carries its log."""


class BertStage(torch.nn.Module):
    """A contiguous piece of a transformers ``BertModel``: embeddings (first stage), encoder
    layers ``[a, b)`` and the pooler (last stage).

    ``forward(x, attention_mask)`` takes token ids (first stage) or the hidden state, plus
    the 2-D mask, and returns ``(hidden, attention_mask)``, or the model's outputs
    ``(last_hidden_state, pooler_output)`` on the last stage. The 2-D mask travels instead
    of the 4-D one that the ONNX cuts carry: each stage expands it itself (it is cheap), so
    torch never sends more than edge.

    Args:
        bert: the model to take the modules from (shared, not copied).
        split: which part.
    """

    def __init__(self, bert: torch.nn.Module, split: LayerSplit):
        super().__init__()
        self.config = bert.config
        a, b = split.layers
        self.embeddings = bert.embeddings if split.embeddings else None
        self.layers = torch.nn.ModuleList(bert.encoder.layer[a:b])
        self.pooler = bert.pooler if split.pooler else None

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor):
        from transformers.masking_utils import create_bidirectional_mask  # heavy: ranks only

        hidden = self.embeddings(input_ids=x) if self.embeddings is not None else x
        mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden,
                                         attention_mask=attention_mask)
        for layer in self.layers:
            hidden = layer(hidden, mask)
        if self.pooler is not None:
            return hidden, self.pooler(hidden)
        return hidden, attention_mask


def save_stages(size: str, seed: int, splits: Sequence[LayerSplit], out_dir: Path) -> list[Path]:
    """Build the seeded BERT exactly as ``edge.export`` does and save one stage per file:
    its tensors as safetensors (nothing is pickled) and what it holds as JSON beside it.

    Args:
        size: BERT size (``tiny``, ``small``, ``base``).
        seed: the export's weight seed.
        splits: the ranks' parts (``edge.bench.split.layer_splits``).
        out_dir: where ``stage-<k>.safetensors`` and ``stage-<k>.json`` go.

    Returns:
        The files, by stage.
    """
    bert = build_model("bert", size, seed).model  # the wrapper's transformers BertModel
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for split in splits:
        path = out_dir / f"stage-{split.stage}.safetensors"
        stage = BertStage(bert, split)
        # Buffers too: BERT's position ids are a non-persistent buffer, left out of
        # state_dict(), and a stage built on the meta device needs them.
        tensors = {**dict(stage.named_parameters()), **dict(stage.named_buffers())}
        save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, path)
        path.with_suffix(".json").write_text(json.dumps(
            {"size": size, "seed": seed, "split": dataclasses.asdict(split)}))
        paths.append(path)
    return paths


def load_stage(path: Path) -> "BertStage":
    """A stage saved by ``save_stages``: built on the meta device (no memory for the parts
    of BERT it does not hold), then given its own tensors from the file."""
    from transformers import BertConfig, BertModel  # heavy: only the ranks load it

    meta = json.loads(Path(path).with_suffix(".json").read_text())
    split = meta["split"]
    split = LayerSplit(**{**split, "layers": tuple(split["layers"])})
    cfg = BertConfig(**get_spec("bert", meta["size"]).config, attn_implementation="eager")
    with torch.device("meta"):
        stage = BertStage(BertModel(cfg, add_pooling_layer=True), split)
    expected = {**dict(stage.named_parameters()), **dict(stage.named_buffers())}
    tensors = load_file(str(path))
    if set(tensors) != set(expected):
        raise EdgeError(f"{path}: expected tensors {sorted(set(expected) - set(tensors))} "
                        f"missing, {sorted(set(tensors) - set(expected))} unexpected")
    for name, t in tensors.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = stage.get_submodule(owner_name) if owner_name else stage
        if leaf in owner._parameters:
            owner._parameters[leaf] = torch.nn.Parameter(t, requires_grad=False)
        else:
            owner._buffers[leaf] = t
    return stage.eval()


def run_stages(paths: Sequence[Path], inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Chain saved stages in this process (no pipelining): the peer's math, for tests.

    Args:
        paths: ``save_stages`` output.
        inputs: ``input_ids`` and ``attention_mask``.
    """
    x = (torch.from_numpy(inputs["input_ids"]), torch.from_numpy(inputs["attention_mask"]))
    with torch.no_grad():
        for path in paths:
            x = load_stage(path)(*x)
    return {name: t.numpy() for name, t in zip(_OUTPUTS, x)}


# ---------------------------------------------------------------------- the driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TorchPeer:
    """N torch ranks on loopback, one process each; stopped on exit.

    Args:
        stage_files: ``save_stages`` output, one per rank.
        workdir: logs and exchanged ``.npz`` files go here.
        timeout: seconds to wait for any one answer.
    """

    def __init__(self, stage_files: Sequence[Path], workdir: Path, timeout: float = 600.0):
        self.stage_files = [Path(p) for p in stage_files]
        self.workdir = Path(workdir)
        self.timeout = timeout
        self.processes: list[subprocess.Popen] = []
        self._replies: queue.Queue = queue.Queue()  # (rank, line or None at EOF)
        self._calls = 0

    @property
    def world(self) -> int:
        return len(self.stage_files)

    def __enter__(self) -> "TorchPeer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        """Start every rank and wait until each has joined the group and loaded its stage."""
        self.launch()
        self.wait_ready()

    def wait_ready(self) -> None:
        """Wait until every rank launched by ``launch`` has joined and loaded its stage."""
        try:
            self._collect("ready")
        except BaseException:
            self.stop()
            raise

    def launch(self) -> None:
        """Start every rank; returns at once (see ``wait_ready``)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        master = f"127.0.0.1:{_free_port()}"
        # OpenMP threads that spin while idle steal the cores of the other ranks on one
        # machine: tiny BERT steps took 100-250 ms instead of 2 ms. Passive waiting is what
        # edge's workers do too (onnxruntime's allow_spinning=0); on one Pi per rank
        # neither setting matters.
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
        try:
            for rank, path in enumerate(self.stage_files):
                log_file = open(self.workdir / f"rank-{rank}.log", "ab")
                p = subprocess.Popen(
                    module_command("edge.bench.torch_peer", "--rank", str(rank),
                                   "--world", str(self.world), "--master", master,
                                   "--stage", str(path)),
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file,
                    text=True, bufsize=1, env=env)
                log_file.close()
                self.processes.append(p)
                threading.Thread(target=_pump, args=(p.stdout, rank, self._replies),
                                 daemon=True, name=f"torch-rank-{rank}").start()
        except BaseException:
            self.stop()
            raise

    def _collect(self, what: str) -> list[dict]:
        """One reply from every rank; the first failure, from any rank, raises at once
        (the others are usually blocked in a collective waiting for the failed one)."""
        replies: dict[int, dict] = {}
        end = time.monotonic() + self.timeout
        while len(replies) < self.world:
            try:
                rank, line = self._replies.get(timeout=max(0.0, end - time.monotonic()))
            except queue.Empty:
                late = [r for r in range(self.world) if r not in replies]
                raise PeerError(f"torch rank(s) {late} did not answer {what} within "
                                f"{self.timeout:.0f} s; log of rank {late[0]}:\n"
                                f"{self._tail(late[0])}") from None
            if line is None:
                raise PeerError(f"torch rank {rank} exited (code "
                                f"{self.processes[rank].poll()}) during {what}; log:\n"
                                f"{self._tail(rank)}")
            reply = json.loads(line)
            if "error" in reply:
                raise PeerError(f"torch rank {rank} failed {what}: {reply['error']}")
            replies[rank] = reply
        return [replies[r] for r in range(self.world)]

    def _tail(self, rank: int, lines: int = 20) -> str:
        try:
            text = (self.workdir / f"rank-{rank}.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def _command(self, cmd: dict) -> list[dict]:
        line = json.dumps(cmd) + "\n"
        for p in self.processes:
            p.stdin.write(line)
            p.stdin.flush()
        return self._collect(cmd["op"])

    def run(self, inputs: dict[str, np.ndarray], microbatches: int = 1, repeat: int = 1,
            want_outputs: bool = False) -> tuple[list[float], dict[str, np.ndarray] | None]:
        """Run ``repeat`` pipeline steps over ``inputs`` split into ``microbatches``.

        Args:
            inputs: ``input_ids`` and ``attention_mask`` with ``microbatches`` rows.
            microbatches: GPipe microbatches per step (one row each).
            repeat: steps.
            want_outputs: also return the last step's outputs.

        Returns:
            Per step, ms from rank 0 starting to the last rank holding the outputs; and
            the outputs or None.
        """
        self._calls += 1
        src = self.workdir / f"in-{self._calls}.npz"
        np.savez(src, **inputs)
        dst = self.workdir / f"out-{self._calls}.npz" if want_outputs else None
        replies = self._command({"op": "run", "inputs": str(src), "microbatches": microbatches,
                                 "repeat": repeat, "save": str(dst) if dst else None})
        src.unlink(missing_ok=True)
        starts, ends = replies[0]["starts"], replies[-1]["ends"]
        ms = [(e - s) * 1e3 for s, e in zip(starts, ends)]
        outputs = None
        if dst is not None:
            with np.load(dst) as f:
                outputs = {k: f[k] for k in f.files}
            dst.unlink(missing_ok=True)
        return ms, outputs

    def memory(self) -> list[dict]:
        """Per rank: ``peak_rss`` (VmHWM), ``rss``, ``rss_after_imports``,
        ``rss_after_load`` in bytes, and ``threads`` (torch intra-op threads)."""
        return self._command({"op": "memory"})

    def stop(self) -> None:
        for p in self.processes:
            if p.poll() is None:
                try:
                    p.stdin.write(json.dumps({"op": "stop"}) + "\n")
                    p.stdin.flush()
                except (BrokenPipeError, ValueError, OSError):
                    pass
        for p in self.processes:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.processes = []
        self._replies = queue.Queue()


def _pump(stream, rank: int, q: queue.Queue) -> None:
    for line in stream:
        q.put((rank, line))
    q.put((rank, None))


# ---------------------------------------------------------------------- a rank


def _status_bytes(*keys: str) -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k = line.split(":", 1)[0]
            if k in keys:
                out[k] = int(line.split()[1]) * 1024
    return out


def _rank_main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="one rank of edge bench's torch peer")
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--master", required=True, help="HOST:PORT of rank 0's store")
    ap.add_argument("--stage", required=True, help="this rank's stage (save_stages)")
    args = ap.parse_args(argv)

    # Replies go to the real stdout; anything libraries print goes to the log (stderr).
    reply_out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def reply(obj: Any) -> None:
        reply_out.write(json.dumps(obj) + "\n")

    # Here, not at the top: the rank measures its memory after these imports.
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe
    import transformers.models.bert.modeling_bert  # noqa: F401  (imported before the mark)

    after_imports = _status_bytes("VmRSS")["VmRSS"]
    dist.init_process_group("gloo", init_method=f"tcp://{args.master}", rank=args.rank,
                            world_size=args.world)
    module = load_stage(Path(args.stage))
    after_load = _status_bytes("VmRSS")["VmRSS"]
    first, last = args.rank == 0, args.rank == args.world - 1
    schedules: dict[int, Any] = {}
    reply({"ready": True})
    try:
        for line in sys.stdin:
            cmd = json.loads(line)
            op = cmd["op"]
            if op == "stop":
                break
            if op == "memory":
                s = _status_bytes("VmHWM", "VmRSS")
                reply({"peak_rss": s["VmHWM"], "rss": s["VmRSS"],
                       "rss_after_imports": after_imports, "rss_after_load": after_load,
                       "threads": torch.get_num_threads()})
                continue
            if op != "run":
                reply({"error": f"unknown op {op!r}; expected run, memory or stop"})
                continue
            m = int(cmd["microbatches"])
            if m not in schedules:
                # A stage object per microbatch count: its buffers are sized for one.
                stage = PipelineStage(module, args.rank, args.world, torch.device("cpu"))
                schedules[m] = ScheduleGPipe(stage, n_microbatches=m)
            schedule = schedules[m]
            feed = ()
            if first:
                with np.load(cmd["inputs"]) as f:
                    feed = (torch.from_numpy(f["input_ids"]),
                            torch.from_numpy(f["attention_mask"]))
            starts, ends, out = [], [], None
            with torch.no_grad():
                for _ in range(int(cmd["repeat"])):
                    dist.barrier()
                    starts.append(time.time())  # one clock: every rank is on this host
                    out = schedule.step(*feed)
                    ends.append(time.time())
            if last and cmd.get("save"):
                np.savez(cmd["save"], **{k: t.numpy() for k, t in zip(_OUTPUTS, out)})
            reply({"starts": starts, "ends": ends})
    except Exception as e:  # the driver reads this instead of waiting for a timeout
        logging.exception("rank %d failed", args.rank)
        reply({"error": f"{type(e).__name__}: {e}"})
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # Nothing is left to write: skip the interpreter's teardown of torch (seconds).
    reply_out.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(_rank_main())
