"""Where edge's cuts fall in a BERT's encoder layers, so the torch peer splits the same
model at the same points. Pure: reads ONNX graphs without their weights, imports no torch.

The planner cuts between ONNX nodes, which can be inside an encoder layer (stage 0 of
BERT-base over four Pis ends at 2.97 layers, just before the end of layer 2).
torch.distributed.pipelining splits between modules, so each cut is placed at its
position measured in layers -- the share of every layer's nodes that lie before it --
and rounded to the nearest layer boundary.
"""

from __future__ import annotations

import ast
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import onnx

from edge.errors import EdgeError

__all__ = ["LayerSplit", "SplitError", "node_layers", "layer_splits"]

# The dynamo exporter records each node's module path; encoder layer i is "...layer.<i>".
_SCOPES_KEY = "pkg.torch.onnx.name_scopes"
_LAYER_RE = re.compile(r"(?:^|\.)encoder\.layer\.(\d+)$")


class SplitError(EdgeError):
    """A plan cannot be mapped onto encoder layers (not a dynamo-exported BERT)."""


@dataclass(frozen=True)
class LayerSplit:
    """What one torch rank holds, and how far that is from edge's stage.

    Attributes:
        stage: the stage (and rank) index.
        layers: ``[start, end)`` encoder layers the rank holds.
        embeddings: it holds the embeddings (the first stage).
        pooler: it holds the pooler (the last stage).
        cut_at: where edge's cut at the end of this stage falls, in layers from the start
            (2.67: two thirds into layer 2); the number of layers for the last stage.
    """

    stage: int
    layers: tuple[int, int]
    embeddings: bool
    pooler: bool
    cut_at: float

    @property
    def rounded(self) -> bool:
        """edge's cut is inside a layer, so the rank's boundary was rounded."""
        return abs(self.cut_at - self.layers[1]) > 1e-9

    def describe(self) -> str:
        """``embeddings + layers 0–2 + pooler`` in the style of ``edge demo``'s holds."""
        a, b = self.layers
        parts = ["embeddings"] if self.embeddings else []
        if b > a:
            parts.append(f"layer {a}" if b - a == 1 else f"layers {a}–{b - 1}")
        if self.pooler:
            parts.append("pooler")
        return " + ".join(parts) or "nothing (passes activations on)"

    def to_dict(self) -> dict:
        return {"stage": self.stage, "layers": list(self.layers), "holds": self.describe(),
                "edge_cut_at_layers": round(self.cut_at, 3), "rounded": self.rounded}


def node_layers(model_path: str | Path) -> dict[str, int]:
    """ONNX node name -> encoder layer index, from the exporter's name scopes.

    Nodes outside the encoder layers (embeddings, mask, pooler) are absent.

    Args:
        model_path: a BERT exported by ``edge.export`` (the dynamo exporter).
    """
    model = onnx.load(str(model_path), load_external_data=False)
    out: dict[str, int] = {}
    for node in model.graph.node:
        for prop in node.metadata_props:
            if prop.key != _SCOPES_KEY:
                continue
            try:
                scopes = ast.literal_eval(prop.value)  # a Python list, outermost first
            except (ValueError, SyntaxError):
                continue
            layers = [int(m.group(1)) for s in scopes if isinstance(s, str)
                      for m in [_LAYER_RE.search(s)] if m]
            if layers:
                out[node.name] = layers[-1]
    return out


def layer_splits(plan, plan_dir: str | Path, model_path: str | Path) -> list[LayerSplit]:
    """Map each of a plan's stages onto whole encoder layers.

    A cut's position is the sum, over layers, of the share of each layer's nodes in the
    stages before it (by node count); it is rounded to the nearest integer, halves up.

    Args:
        plan: an ``edge.planning.plan.Plan`` of a BERT from ``edge.export``.
        plan_dir: the folder its ``shards/`` are in (the shards name their nodes).
        model_path: the source ``.onnx`` (its nodes carry the layer scopes).

    Raises:
        SplitError: no node could be placed in a layer.
    """
    layer_of = node_layers(model_path)
    if not layer_of:
        raise SplitError(f"{model_path}: no node carries an encoder-layer scope "
                         f"({_SCOPES_KEY} = [... 'encoder.layer.N' ...]); expected a BERT "
                         "exported by edge.export (the dynamo exporter)")
    counts: list[Counter] = []
    for stage in plan.stages:
        shard = onnx.load(str(Path(plan_dir) / stage.shard), load_external_data=False)
        counts.append(Counter(layer_of[n.name] for n in shard.graph.node if n.name in layer_of))
    total: Counter = sum(counts, Counter())
    num_layers = max(layer_of.values()) + 1
    splits, done, start = [], Counter(), 0
    last = len(plan.stages) - 1
    for k, c in enumerate(counts):
        done.update(c)
        cut_at = (float(num_layers) if k == last
                  else sum(done[layer] / total[layer] for layer in total))
        end = num_layers if k == last else min(num_layers, max(start, math.floor(cut_at + 0.5)))
        splits.append(LayerSplit(stage=k, layers=(start, end), embeddings=k == 0,
                                 pooler=k == last, cut_at=cut_at))
        start = end
    return splits
