"""The shared file hash and ``host:port`` parser (edge/files.py, edge/transport/address.py)."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest

from edge.errors import ConfigError
from edge.files import file_sha256
from edge.address import AddressError, parse_address
from edge.transport.security import is_loopback


def test_file_sha256_reads_in_blocks(tmp_path):
    data = bytes(range(256)) * 5000
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    assert file_sha256(path, chunk=4096) == hashlib.sha256(data).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert file_sha256(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()


@pytest.mark.parametrize("text, expected", [
    ("10.0.0.2:50051", ("10.0.0.2", 50051)),
    ("pi-2.local:1", ("pi-2.local", 1)),
    ("[::1]:65535", ("[::1]", 65535)),
])
def test_parse_address(text, expected):
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["10.0.0.1", "h:0", "h:99999", ":50051", "a b:1", "[::1:80",
                                  "h:-1", "h:5a", "h:\u0661", "unix:/tmp/x"])
def test_parse_address_refuses(text):
    with pytest.raises(AddressError, match=r"expected host:port \(port 1-65535\), got") as e:
        parse_address(text)
    assert repr(text) in str(e.value)
    assert isinstance(e.value, ConfigError) and isinstance(e.value, ValueError)


def test_listen_addresses_may_use_port_zero():
    assert parse_address("127.0.0.1:0", allow_port_zero=True) == ("127.0.0.1", 0)


@pytest.mark.parametrize("address, loopback", [
    ("127.0.0.1:0", True), ("[::1]:50051", True), ("localhost:1", True), ("localhost", True),
    ("unix:/tmp/s", True), ("10.0.0.2:50051", False), ("0.0.0.0:50051", False),
])
def test_is_loopback(address, loopback):
    assert is_loopback(address) is loopback


def test_helpers_are_stdlib_only():
    # The worker imports both; neither may pull in grpc, numpy or yaml.
    code = ("import sys, edge.files, edge.address; "
            "print(sorted(m for m in ('grpc', 'numpy', 'yaml', 'onnx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
