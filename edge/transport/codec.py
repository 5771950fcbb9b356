"""The one place that converts between the wire (protobuf) and the domain (numpy, specs).

No RPC handler builds messages by hand: they call these functions.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from edge.errors import TensorError
from edge.spec import Dim, TensorSpec
from edge.proto import edge_pb2 as pb

__all__ = [
    "PROTOCOL_VERSION",
    "SUPPORTED_DTYPES",
    "encode_tensor",
    "decode_tensor",
    "encode_tensors",
    "decode_tensors",
    "stack_rows",
    "split_rows",
    "encode_activation",
    "encode_spec",
    "decode_spec",
    "decode_specs",
    "check_tensors",
]

# The wire protocol's version, sent in every StageConfig. Bump it whenever a message's
# meaning changes so that a worker refuses a coordinator of another version instead of
# misreading it.
PROTOCOL_VERSION = 1

# dtype names that may travel. Object and string arrays never do: nothing is unpickled.
SUPPORTED_DTYPES = frozenset({
    "float16", "float32", "float64", "bfloat16",
    "int8", "int16", "int32", "int64",
    "uint8", "uint16", "uint32", "uint64",
    "bool",
})

# Refuse absurd shapes before multiplying them out: a 1e12-element tensor is an attack or a bug.
_MAX_ELEMENTS = 1 << 34


def encode_tensor(name: str, array: np.ndarray) -> pb.Tensor:
    """Numpy array to a wire tensor (little-endian, C order).

    Args:
        name: the tensor's name in the graph.
        array: any numeric or bool array.
    """
    array = np.asarray(array)
    dtype = array.dtype.name
    if dtype not in SUPPORTED_DTYPES:
        raise TensorError(f"tensor {name!r}: dtype {dtype} cannot travel; "
                          f"expected one of {', '.join(sorted(SUPPORTED_DTYPES))}")
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    data = np.ascontiguousarray(array).tobytes()
    return pb.Tensor(name=name, dtype=dtype, shape=array.shape, data=data)


def decode_tensor(t: pb.Tensor) -> np.ndarray:
    """Wire tensor to a numpy array over one copy of its bytes (read-only).

    Raises:
        TensorError: the dtype is unknown, or the byte length disagrees with dtype × shape.
    """
    if t.dtype not in SUPPORTED_DTYPES:
        raise TensorError(f"tensor {t.name!r}: unknown dtype {t.dtype!r}; "
                          f"expected one of {', '.join(sorted(SUPPORTED_DTYPES))}")
    shape = tuple(t.shape)
    if any(d < 0 for d in shape):
        raise TensorError(f"tensor {t.name!r}: negative dimension in shape {list(shape)}; "
                          "expected sizes >= 0")
    count = bound = 1
    for d in shape:
        count *= d
        # Also without the zeros: numpy refuses a shape like [0, 2**62] outright.
        bound *= max(d, 1)
        if bound > _MAX_ELEMENTS:
            raise TensorError(f"tensor {t.name!r}: shape {list(shape)} has more than "
                              f"{_MAX_ELEMENTS} elements (or would without its zeros); "
                              "expected a smaller tensor")
    dtype = _np_dtype(t.dtype)
    expected = count * dtype.itemsize
    data = t.data  # each read of a bytes field copies it out of the message: read once
    if len(data) != expected:
        raise TensorError(
            f"tensor {t.name!r}: {t.dtype}{list(shape)} needs {expected} bytes, "
            f"got {len(data)}")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def encode_tensors(arrays: Mapping[str, np.ndarray]) -> list[pb.Tensor]:
    return [encode_tensor(name, a) for name, a in arrays.items()]


def _wire_array(name: str, array: np.ndarray) -> np.ndarray:
    """The array as it travels: a supported dtype, little-endian, C order."""
    array = np.asarray(array)
    if array.dtype.name not in SUPPORTED_DTYPES:
        raise TensorError(f"tensor {name!r}: dtype {array.dtype.name} cannot travel; "
                          f"expected one of {', '.join(sorted(SUPPORTED_DTYPES))}")
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    # not np.ascontiguousarray: it turns a 0-d array into shape (1,)
    return array if array.flags.c_contiguous else array.copy(order="C")


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


# Wire-format keys (field number << 3 | 2, length-delimited) of Activation.tensors and
# Tensor.data, taken from the generated descriptors so a renumbered field cannot drift.
_TENSORS_KEY = _varint(pb.Activation.DESCRIPTOR.fields_by_name["tensors"].number << 3 | 2)
_DATA_KEY = _varint(pb.Tensor.DESCRIPTOR.fields_by_name["data"].number << 3 | 2)


def encode_activation(request_id: str, epoch: int, arrays: Mapping[str, np.ndarray],
                      timings: Iterable[pb.StageTiming]
                      | Callable[[], Iterable[pb.StageTiming]] = (),
                      step: pb.Step | None = None,
                      tokens: Iterable[int] = (),
                      rows: Iterable[pb.Step] = (), reply_to: str = "") -> bytes:
    """A serialized ``Activation`` holding ``arrays``, with each tensor's bytes copied once.

    Building ``pb.Tensor`` messages copies every activation three times before gRPC sees
    it (``tobytes``, into the message, serializing it); a live worker held those copies for
    every request in flight. Here the small fields go through protobuf and the tensor
    bytes are joined straight into the one output buffer (protobuf parses concatenated
    messages as one, so the result is an ordinary ``Activation``).

    Args:
        request_id: the request's id.
        epoch: the pipeline epoch it travels under.
        arrays: tensors by name (as :func:`encode_tensor` takes them).
        timings: the stage timings, or a function that returns them once the tensors are
            encoded (so that a timing can include the encoding).
        step: the generation step it belongs to, if any.
        tokens: the tokens drawn (a step's result).
        rows: the decode steps of a batch, by row.
        reply_to: the direct client that sent the request ("": the coordinator).
    """
    parts: list = []
    for name, a in arrays.items():
        a = _wire_array(name, a)
        head = pb.Tensor(name=name, dtype=a.dtype.name, shape=a.shape).SerializeToString()
        size = a.nbytes
        head += _DATA_KEY + _varint(size)
        parts += [_TENSORS_KEY, _varint(len(head) + size), head]
        if size:
            parts.append(a.reshape(-1).view(np.uint8).data)
    if callable(timings):
        timings = timings()
    parts.append(pb.Activation(request_id=request_id, epoch=epoch, timings=list(timings),
                               step=step, tokens=[int(t) for t in tokens],
                               rows=list(rows), reply_to=reply_to).SerializeToString())
    return b"".join(parts)


def decode_tensors(tensors: Iterable[pb.Tensor]) -> dict[str, np.ndarray]:
    """Wire tensors to a name → array dict. Duplicate names are an error."""
    out: dict[str, np.ndarray] = {}
    for t in tensors:
        if t.name in out:
            raise TensorError(f"tensor {t.name!r} sent twice; expected each tensor once")
        out[t.name] = decode_tensor(t)
    return out


def stack_rows(requests: Sequence[Sequence[pb.Tensor]]) -> list[pb.Tensor]:
    """Several requests' wire tensors as one batch: each tensor's rows (its first
    dimension) one request after another, without decoding them.

    Args:
        requests: each request's tensors, with the same names, dtypes and sizes past the
            first dimension (``stack_rows`` does not check; the batcher keys on them).
    """
    out = []
    for i, t in enumerate(requests[0]):
        parts = [r[i] for r in requests]
        shape = [sum(p.shape[0] for p in parts), *t.shape[1:]]
        out.append(pb.Tensor(name=t.name, dtype=t.dtype, shape=shape,
                             data=b"".join(p.data for p in parts)))
    return out


def split_rows(tensors: Sequence[pb.Tensor], counts: Sequence[int]) -> list[list[pb.Tensor]]:
    """A batch's wire tensors back into each request's: ``counts[i]`` rows (of the first
    dimension) for request i, in order.

    Raises:
        TensorError: a tensor has no first dimension of ``sum(counts)`` rows, or its bytes
            do not divide into them.
    """
    total = sum(counts)
    out: list[list[pb.Tensor]] = [[] for _ in counts]
    for t in tensors:
        data = t.data  # each read of a bytes field copies it: read once
        if not t.shape or t.shape[0] != total or len(data) % max(total, 1):
            raise TensorError(f"tensor {t.name!r}: {t.dtype}{list(t.shape)} cannot be split "
                              f"into {len(counts)} requests; expected a first dimension of "
                              f"{total} rows ({len(data)} bytes)")
        row = len(data) // total if total else 0
        start = 0
        for i, n in enumerate(counts):
            out[i].append(pb.Tensor(name=t.name, dtype=t.dtype, shape=[n, *t.shape[1:]],
                                    data=data[start * row:(start + n) * row]))
            start += n
    return out


def _np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        try:
            import ml_dtypes  # optional: only where bfloat16 models are used

            return np.dtype(ml_dtypes.bfloat16)
        except ImportError:  # pragma: no cover
            raise TensorError("bfloat16 tensors need the ml_dtypes package") from None
    return np.dtype(name)


def encode_spec(spec: TensorSpec) -> pb.TensorSpec:
    dims = []
    for d in spec.shape:
        if d is None:
            dims.append(pb.Dim())
        elif isinstance(d, str):
            dims.append(pb.Dim(symbol=d))
        else:
            dims.append(pb.Dim(size=int(d)))
    return pb.TensorSpec(name=spec.name, dtype=spec.dtype, shape=dims)


def decode_spec(msg: pb.TensorSpec) -> TensorSpec:
    """Wire spec to a TensorSpec.

    Raises:
        TensorError: no name, a dtype that cannot travel, or a negative dimension.
    """
    if not msg.name:
        raise TensorError(f"tensor spec without a name; expected a name, dtype and shape "
                          f"(got dtype {msg.dtype!r})")
    if msg.dtype not in SUPPORTED_DTYPES:
        raise TensorError(f"tensor spec {msg.name!r}: unknown dtype {msg.dtype!r}; "
                          f"expected one of {', '.join(sorted(SUPPORTED_DTYPES))}")
    shape: list[Dim] = []
    for d in msg.shape:
        kind = d.WhichOneof("value")
        if kind == "size" and d.size < 0:
            raise TensorError(f"tensor spec {msg.name!r}: negative dimension {d.size}; "
                              "expected a size >= 0, a symbol or nothing (unknown)")
        shape.append(d.size if kind == "size" else d.symbol if kind == "symbol" else None)
    return TensorSpec(name=msg.name, dtype=msg.dtype, shape=tuple(shape))


def decode_specs(msgs: Iterable[pb.TensorSpec], what: str) -> tuple[TensorSpec, ...]:
    """Wire specs to TensorSpecs, each name once.

    Args:
        msgs: the specs.
        what: what they are, for the message ("inputs").

    Raises:
        TensorError: as :func:`decode_spec`, or a name given twice.
    """
    specs = tuple(decode_spec(m) for m in msgs)
    seen: set[str] = set()
    for s in specs:
        if s.name in seen:
            raise TensorError(f"{what}: tensor {s.name!r} listed twice; expected each name once")
        seen.add(s.name)
    return specs


def check_tensors(arrays: Mapping[str, np.ndarray], specs: Sequence[TensorSpec],
                  where: str) -> None:
    """Check that ``arrays`` holds exactly the tensors ``specs`` describe.

    Fixed dims must match; a symbolic dim must take one value across all tensors
    (``sequence`` is the same in ``input_ids`` and ``attention_mask``); unknown dims match
    anything.

    Args:
        arrays: what came.
        specs: what is expected.
        where: who expects it, for the message ("stage 2", "model").

    Raises:
        TensorError: naming the tensor, what was expected and what came.
    """
    expected = {s.name for s in specs}
    unknown = sorted(set(arrays) - expected)
    if unknown:
        raise TensorError(f"{where} got unknown tensor(s) {', '.join(unknown)}; "
                          f"expected {', '.join(s.describe() for s in specs)}")
    missing = [s for s in specs if s.name not in arrays]
    if missing:
        raise TensorError(f"{where} is missing tensor(s) "
                          f"{', '.join(s.describe() for s in missing)}")
    symbols: dict[str, tuple[int, str]] = {}
    for spec in specs:
        a = arrays[spec.name]
        got = f"{a.dtype.name}[{','.join(map(str, a.shape))}]"
        if a.dtype.name != spec.dtype or a.ndim != len(spec.shape):
            raise TensorError(f"{where} expects {spec.describe()}, got {got}")
        for d, size in zip(spec.shape, a.shape):
            if isinstance(d, int) and d != size:
                raise TensorError(f"{where} expects {spec.describe()}, got {got}")
            if isinstance(d, str):
                seen = symbols.setdefault(d, (size, spec.name))
                if seen[0] != size:
                    raise TensorError(
                        f"{where}: dimension {d!r} is {seen[0]} in {seen[1]} but {size} in "
                        f"{spec.name} ({got})")
