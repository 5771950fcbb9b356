"""The tensor codec: numpy <-> wire, and tensors larger than gRPC's 4 MiB default."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from edge.errors import TensorError
from edge.planning.plan import TensorSpec
from edge.proto import edge_pb2 as pb
from edge.transport.codec import (check_tensors, decode_spec, decode_tensor, decode_tensors,
                                  encode_spec, encode_tensor)

DTYPES = ["float16", "float32", "float64", "int8", "int32", "int64", "uint8", "bool"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 3, 4), (1, 1, 5, 1)])
def test_round_trip(dtype, shape):
    rng = np.random.default_rng(0)
    a = (rng.standard_normal(shape) * 10).astype(dtype)
    wire = pb.Tensor.FromString(encode_tensor("x", a).SerializeToString())
    b = decode_tensor(wire)
    assert b.dtype == a.dtype and b.shape == a.shape
    np.testing.assert_array_equal(a, b)


def test_non_contiguous_and_big_endian():
    a = np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2]
    np.testing.assert_array_equal(decode_tensor(encode_tensor("x", a)), a)
    be = np.arange(5, dtype=">i4")
    np.testing.assert_array_equal(decode_tensor(encode_tensor("x", be)), be.astype("<i4"))


@pytest.mark.parametrize("tensor, message", [
    (pb.Tensor(name="x", dtype="float32", shape=[2, 2], data=b"\0" * 12), "needs 16 bytes, got 12"),
    (pb.Tensor(name="x", dtype="object", shape=[1], data=b"\0" * 8), "unknown dtype 'object'"),
    (pb.Tensor(name="x", dtype="float32", shape=[-1], data=b""), "negative dimension"),
    (pb.Tensor(name="x", dtype="float32", shape=[1 << 30, 1 << 30], data=b""), "more than"),
])
def test_bad_tensors_say_what_was_expected(tensor, message):
    with pytest.raises(TensorError, match=message):
        decode_tensor(tensor)


def test_duplicate_names_rejected():
    t = encode_tensor("x", np.zeros(2, np.float32))
    with pytest.raises(TensorError, match="sent twice"):
        decode_tensors([t, t])


def test_spec_round_trip_and_checks():
    spec = TensorSpec("hidden", "float32", ("batch", "sequence", 768))
    assert decode_spec(encode_spec(spec)) == spec
    unknown = TensorSpec("u", "int64", (None, 2))
    assert decode_spec(encode_spec(unknown)) == unknown
    mask = TensorSpec("mask", "int64", ("batch", "sequence"))
    good = {"hidden": np.zeros((1, 5, 768), np.float32), "mask": np.zeros((1, 5), np.int64)}
    check_tensors(good, [spec, mask], "stage 1")
    with pytest.raises(TensorError, match=r"stage 1 expects hidden float32\[batch,sequence,768\], "
                                          r"got float16\[1,5,768\]"):
        check_tensors({**good, "hidden": good["hidden"].astype(np.float16)}, [spec, mask], "stage 1")
    with pytest.raises(TensorError, match="'sequence' is 5 in hidden but 6 in mask"):
        check_tensors({**good, "mask": np.zeros((1, 6), np.int64)}, [spec, mask], "stage 1")
    with pytest.raises(TensorError, match="unknown tensor"):
        check_tensors({**good, "extra": np.zeros(1)}, [spec, mask], "stage 1")
    with pytest.raises(TensorError, match="missing tensor"):
        check_tensors({"hidden": good["hidden"]}, [spec, mask], "stage 1")


class _Echo(grpc.GenericRpcHandler):
    """A server that decodes and re-encodes an Activation: the codec over a real channel."""

    def service(self, details):
        def echo(request: bytes, context) -> bytes:
            msg = pb.Activation.FromString(request)
            arrays = decode_tensors(msg.tensors)
            out = pb.Activation(request_id=msg.request_id,
                                tensors=[encode_tensor(k, v) for k, v in arrays.items()])
            return out.SerializeToString()

        return grpc.unary_unary_rpc_method_handler(echo)


def test_tensor_over_4_mib_crosses_grpc():
    from edge.transport.channels import create_channel, create_server

    server, port = create_server("127.0.0.1:0")
    server.add_generic_rpc_handlers((_Echo(),))
    server.start()
    try:
        big = np.random.default_rng(1).standard_normal((4, 512, 1024)).astype(np.float32)
        assert big.nbytes > 4 * 2**20 * 1.5
        with create_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/test/Echo")
            req = pb.Activation(request_id="r", tensors=[encode_tensor("big", big)])
            reply = pb.Activation.FromString(call(req.SerializeToString(), timeout=30))
        np.testing.assert_array_equal(decode_tensors(reply.tensors)["big"], big)
    finally:
        server.stop(0)
