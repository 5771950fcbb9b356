"""edge: split neural networks across small boards and run them as a gRPC pipeline.

The package has two halves that meet only at the plan file:

- planning (pure, offline): :mod:`edge.planning` analyses an ONNX graph and chooses the
  split, :mod:`edge.shards` writes one ``.onnx`` per stage;
- running: :mod:`edge.worker` serves a stage on a device, :mod:`edge.coordinator` deploys
  the shards and serves requests, both over :mod:`edge.transport`.
"""

__version__ = "0.1.0"
# The name pip knows it by (pyproject.toml): "edge" on PyPI is an unrelated package.
DISTRIBUTION = "edge-runtime"

__all__ = ["plan", "serve", "Served", "Client", "DirectClient", "__version__", "DISTRIBUTION"]


def __getattr__(name: str):
    # The Python API (edge.api) loads the planner (onnx) and the coordinator; a worker on a
    # Pi imports `edge` for its version only and must not pay for them, so it is loaded on
    # first use.
    if name in ("plan", "serve", "Served", "Client", "DirectClient"):
        from edge import api

        return getattr(api, name)
    raise AttributeError(f"module 'edge' has no attribute {name!r}")
