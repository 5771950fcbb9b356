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
