"""edge from Python: plan, serve and call, as ``edge plan``, ``edge coordinator`` and
``edge infer`` do, in your own process.

    import edge
    plan = edge.plan("bert.onnx", "cluster.yaml", out="build/")
    with edge.serve("build/") as pipe:
        outputs = pipe({"input_ids": ids, "attention_mask": mask})
        print(pipe.address)
    with edge.Client("HOST:50050") as client:
        outputs = client(inputs)
        print(client.generate("Hello", max_tokens=32).text)   # a plan with --context
    with edge.DirectClient("HOST:50050") as client:   # requests skip the coordinator
        outputs = client(inputs)

The defaults are the command line's: sizes ``batch=1, sequence=128`` for the dims a model
names so, every mode (fp32, fp32-lean, int8) allowed, plaintext on loopback unless
``certs=`` names a bundle.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from edge.build import load_sample, make_plan, plan_dims
from edge.planning.generation import GenerationRequest
from edge.coordinator.client import InferClient
from edge.coordinator.direct import DirectClient as _Direct
from edge.coordinator.pipeline import Pipeline
from edge.coordinator.server import start_coordinator
from edge.errors import ConfigError
from edge.planning.cluster import Cluster, load_cluster
from edge.planning.plan import Plan, load_plan, plan_file
from edge.spec import MODES
from edge.transport.channels import Deadlines, Security
from edge.transport.codec import decode_tensors

__all__ = ["plan", "serve", "Served", "Client", "DirectClient"]


def _security(certs: str | os.PathLike[str] | None, insecure: bool) -> Security:
    return Security.from_options(str(certs) if certs else None, insecure)


def plan(model: str | os.PathLike[str], cluster: str | os.PathLike[str] | Cluster,
         out: str | os.PathLike[str], *, dims: Mapping[str, int] | None = None,
         sample: str | os.PathLike[str] | Mapping[str, np.ndarray] | None = None,
         modes: Sequence[str] | None = None, int8_min_cosine: float | None = None,
         context: int | None = None, sequences: int | None = None,
         prefill: int | None = None, generate: bool = False,
         kv_dtype: str | None = None, finer_cuts: bool = False,
         block_cuts: bool = True) -> Plan:
    """Plan ``model`` over a cluster and write ``out/plan.json`` and its shards.

    Args:
        model: the ``.onnx`` file.
        cluster: a cluster.yaml, or a :class:`edge.planning.cluster.Cluster`.
        out: the folder to write to.
        dims: sizes of the model's symbolic dims (``{"sequence": 256}``); dims named
            ``batch`` and ``sequence`` that are not given default to 1 and 128.
        sample: a real input (an ``.npz`` path or arrays by input name): it sets every
            dim, and shapes and int8 accuracy are measured on it.
        modes: the modes stages may run in, in order of preference (default all:
            ``fp32``, ``fp32-lean``, ``int8``).
        int8_min_cosine: the least cosine an int8 stage may keep with fp32 (default 0.99).
        context, sequences, prefill: for a decoder with KV caches, the tokens per sequence
            the caches hold, the sequences held at once and the longest prompt
            (``edge.planning.generation``; defaults: the model's positions up to 2048, 1,
            min(context, 128)). Any of them, or ``generate=True``, plans the model for
            generation; a model without caches refuses them.
        generate: plan for generation with the defaults.
        kv_dtype: how the stages store the KV caches, "fp32" (default) or "fp16" (half the
            memory; refused, with the cosine, unless the logits keep 0.99 with fp32 caches).
        finer_cuts: as ``edge plan --finer-cuts`` (``edge.build.make_plan``).
        block_cuts: False as ``edge plan --whole-blocks`` (``edge.build.make_plan``).

    Returns:
        The plan, as written to ``out/plan.json``.

    Raises:
        ConfigError: a bad cluster file, sample or mode. NoFitError (a PlanError): the
        devices cannot hold the model; it says what each would need.
    """
    devices = cluster if isinstance(cluster, Cluster) else load_cluster(cluster)
    if modes is not None:
        bad = [m for m in modes if m not in MODES]
        if bad or not modes:
            raise ConfigError(f"modes: expected some of {', '.join(MODES)}, got {list(modes)}")
    arrays = (load_sample(str(sample)) if isinstance(sample, (str, os.PathLike))
              else None if sample is None else dict(sample))
    return make_plan(model, devices.devices, out,
                     bindings=plan_dims(model, dict(dims or {}), arrays),
                     standby=devices.standby, modes=tuple(modes) if modes else None,
                     sample=arrays, int8_min_cosine=int8_min_cosine,
                     generation=GenerationRequest(context, sequences, prefill, generate,
                                                  kv_dtype), finer_cuts=finer_cuts,
                     block_cuts=block_cuts)


class Served:
    """A plan served from this process: the coordinator's pipeline and its Infer server.

    Call it with a dict of numpy arrays to run one request; other machines reach it at
    :attr:`address` with :class:`Client` or ``edge infer``. Close it (or leave its
    ``with`` block) to stop the server; the workers keep running.

    Attributes:
        pipeline: the :class:`edge.coordinator.pipeline.Pipeline` (status, recoveries).
        plan: the plan it serves (after a failover, the one it serves now).
        address: ``host:port`` of its Infer server.
    """

    def __init__(self, pipeline: Pipeline, server, address: str):
        self.pipeline = pipeline
        self._server = server
        self.address = address

    @property
    def plan(self) -> Plan:
        return self.pipeline.plan

    def __call__(self, inputs: Mapping[str, np.ndarray],
                 timeout: float | None = None) -> dict[str, np.ndarray]:
        """Run one request; returns the model's outputs by name.

        Raises:
            InferError: with the gRPC status code a client would get (``.code``).
        """
        return decode_tensors(self.pipeline.infer(inputs, timeout=timeout).outputs)

    def close(self, grace: float = 5.0) -> None:
        """Stop serving: calls in flight get ``grace`` seconds, then the pipeline closes."""
        self._server.stop(grace).wait()
        self.pipeline.close()

    def __enter__(self) -> "Served":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def serve(plan_path: str | os.PathLike[str], *, listen: str = "127.0.0.1:0",
          certs: str | os.PathLike[str] | None = None, insecure: bool = False,
          model: str | os.PathLike[str] | None = None, failover: bool = True,
          max_in_flight: int = 64, take_over: bool = False,
          ready_timeout: float = 60.0, max_batch: int | None = None) -> Served:
    """Deploy a plan onto its workers and serve it, as ``edge coordinator`` does.

    Waits for every worker, uploads the shards their caches lack, wires the chain, then
    serves Infer on ``listen``. A device that fails is handled as by ``edge coordinator``.

    Args:
        plan_path: ``plan.json`` or the folder ``edge.plan`` wrote it to.
        listen: where the Infer server listens (port 0: any free port; see ``address``).
        certs: a bundle folder (``edge certs issue``): mutual TLS to the workers and for
            clients. Without one, plaintext, allowed on loopback only.
        insecure: plaintext off loopback (a LAN you trust).
        model: the source ``.onnx`` to re-plan from after a loss (default: the one the
            plan names).
        failover: move a lost device's stage to the devices that remain.
        max_in_flight: requests accepted at once; past it, RESOURCE_EXHAUSTED.
        take_over: configure workers that another live coordinator owns.
        ready_timeout: seconds to wait for each worker to be healthy.
        max_batch: generation: decode steps of different sequences run as one batch at
            most (default: the plan's sequences; 1: each alone).

    Returns:
        A :class:`Served`: call it, read its ``address``, close it.
    """
    security = _security(certs, insecure)
    security.require_safe(listen, "listen on")
    path = plan_file(plan_path)
    pipeline = Pipeline(load_plan(path), Path(path).parent,
                        deadlines=Deadlines(ready=ready_timeout), security=security,
                        failover=failover, max_in_flight=max_in_flight,
                        model=Path(model) if model else None, take_over=take_over)
    try:
        pipeline.start()
        server, port = start_coordinator(pipeline, listen, max_batch)
    except BaseException:
        pipeline.close()
        raise
    host = listen.rsplit(":", 1)[0]
    return Served(pipeline, server, f"{host}:{port}")


class Client(InferClient):
    """A client of a coordinator (``edge coordinator`` or :func:`serve`), as ``edge infer``.

    Call it with a dict of numpy arrays; it returns the outputs by name. Refusals that
    a retry can cure (a restart, a recovery, full queues) are retried for ``retry_for``
    seconds; others raise ``grpc.RpcError`` with the status code.

    Args:
        address: the coordinator's ``host:port``.
        certs: a bundle folder, when the coordinator runs with ``--certs`` (a client-role
            bundle is enough).
        insecure: plaintext to a coordinator off loopback.
        timeout: seconds one request may take.
        retry_for: seconds to keep retrying.
    """

    def __init__(self, address: str, *, certs: str | os.PathLike[str] | None = None,
                 insecure: bool = False, timeout: float = 120.0, retry_for: float = 15.0):
        super().__init__(address, timeout=timeout, security=_security(certs, insecure),
                         retry_for=retry_for)

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.infer(inputs)

    def generate(self, prompt: str, *, chat: bool = False, max_tokens: int = 0,
                 temperature: float = 0.0, top_p: float = 0.0, top_k: int = 0, seed: int = 0,
                 stop: Sequence[str] = (), stream: bool = False):
        """Generate text from a prompt, on a coordinator serving a decoder with KV caches.

        Args:
            prompt: the text; the coordinator tokenizes it with the model's tokenizer.
            chat: wrap it as one user message in the model's chat template.
            max_tokens: tokens to generate at most (0: up to the plan's context).
            temperature: 0 (default) draws the most likely token each time.
            top_p, top_k: draw among the most likely tokens (0: all).
            seed: fixes the draws when ``temperature`` > 0 (0: the coordinator picks one).
            stop: strings that end the text (not included).
            stream: yield the text as it comes, piece by piece.

        Returns:
            With ``stream``, an iterator of text pieces; else the whole
            :class:`~edge.coordinator.client.Completion` (``.text``, ``.tokens``,
            ``.finish_reason``, ``.ttft_ms``, ``.tokens_per_s``).

        Raises:
            grpc.RpcError: FAILED_PRECONDITION for a plan not made for generation,
                INVALID_ARGUMENT for an empty prompt or one beyond the plan's context.
        """
        kw = dict(chat=chat, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                  top_k=top_k, seed=seed, stop=stop)
        if stream:
            return (r.text for r in self.generate_raw(prompt, **kw) if r.text)
        return self.generate_all(prompt, **kw)

    def __enter__(self) -> "Client":
        return self


class DirectClient(_Direct):
    """A client that sends each request straight to the pipeline's first stage and hears
    its result from the last; the coordinator only tells it where they are, and again
    after a failover (when it sends what was in flight again). It takes the coordinator's
    work off the coordinator's board; it needs a network path to the first and last
    workers. Inference only: generation goes through :class:`Client`.

    Args:
        address: the coordinator's ``host:port``.
        certs: a bundle folder (a client-role bundle is enough).
        insecure: plaintext off loopback.
        timeout: seconds one request may take, resends included.
    """

    def __init__(self, address: str, *, certs: str | os.PathLike[str] | None = None,
                 insecure: bool = False, timeout: float = 120.0):
        super().__init__(address, security=_security(certs, insecure), timeout=timeout)

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.infer(inputs)
