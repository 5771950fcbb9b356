"""Typed errors. Each one says what was expected and what came."""

from __future__ import annotations

__all__ = [
    "EdgeError",
    "ConfigError",
    "GraphError",
    "PlanError",
    "NoFitError",
    "TensorError",
    "SecurityError",
    "MissingPackageError",
]


class EdgeError(Exception):
    """Base class for every error edge raises on purpose."""


class ConfigError(EdgeError):
    """A file the user wrote (cluster.yaml, a device profile, plan.json) is malformed.

    The message names the file and the field.
    """


class GraphError(EdgeError):
    """An ONNX model cannot be analysed or cut (wrong opset, unknown shapes, bad file)."""


class PlanError(EdgeError):
    """The planner cannot produce a plan."""


class NoFitError(PlanError):
    """No contiguous split of the model fits the devices' memory.

    Attributes:
        needs: per device name, the smallest memory (MiB) its stage would need in the
            plan that came closest to fitting.
        has: per device name, the memory (MiB) the device may use.
        min_memory_mb: the smallest per-device memory that would make some plan fit,
            if every device had that much.
    """

    def __init__(self, message: str, needs: dict[str, float], has: dict[str, float],
                 min_memory_mb: float):
        super().__init__(message)
        self.needs = needs
        self.has = has
        self.min_memory_mb = min_memory_mb


class TensorError(EdgeError):
    """A tensor does not match what a stage or model expects (name, dtype or shape)."""


class SecurityError(EdgeError):
    """A connection would be unprotected, or a certificate bundle or token is missing or
    malformed. The message says what to pass instead (``--certs DIR``, ``--insecure``)."""


class MissingPackageError(EdgeError):
    """An optional package (an extra of pyproject.toml) is not installed. The message
    is the pip command that installs it (see ``edge._extras``).

    Attributes:
        package: the missing top-level module, e.g. ``torch``.
        extra: the extra that provides it, e.g. ``export``.
    """

    def __init__(self, message: str, package: str, extra: str):
        super().__init__(message)
        self.package = package
        self.extra = extra
