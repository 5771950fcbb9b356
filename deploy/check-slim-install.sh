#!/bin/sh
# Prove the worker's base install: build a wheel of this clone, install it (no extras) into a
# fresh venv from PyPI, check that none of torch, onnx, cryptography, matplotlib, rich came
# with it, say its size, start `edge worker` from it and ask its gRPC health service.
#
# Usage: sh deploy/check-slim-install.sh [WORKDIR]   (default: a temporary folder, removed)
# Needs python3 (3.10+) with venv, and PyPI. Changes nothing outside WORKDIR.
set -eu
HERE=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
WORK=${1:-}
if [ -z "$WORK" ]; then WORK=$(mktemp -d); trap 'kill "$PID" 2>/dev/null || true; rm -rf "$WORK"' EXIT
else mkdir -p "$WORK"; trap 'kill "$PID" 2>/dev/null || true' EXIT; fi
PID=
fail() { echo "check-slim-install.sh: $*" >&2; exit 1; }

# Built from a copy: pip would leave build/ and *.egg-info in the clone.
mkdir -p "$WORK/src"
cp -r "$HERE/pyproject.toml" "$HERE/README.md" "$HERE/edge" "$HERE/devices" "$WORK/src/"
"$PYTHON" -m pip wheel -q --no-deps -w "$WORK/wheel" "$WORK/src"
"$PYTHON" -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install -q "$WORK"/wheel/edge_runtime-*.whl
"$WORK/venv/bin/pip" list --format=freeze 2>/dev/null > "$WORK/pip-list.txt"
for heavy in torch onnx cryptography matplotlib rich; do
  ! grep -iq "^$heavy==" "$WORK/pip-list.txt" || fail "the base install pulled $heavy"
done
echo "base install: $(tr '\n' ' ' < "$WORK/pip-list.txt")"
SITE=$(echo "$WORK"/venv/lib/python3*/site-packages)
ALL=$(du -sb "$WORK/venv" | cut -f1)
TOOLS=$(du -sbc "$SITE"/pip "$SITE"/pip-* "$SITE"/setuptools "$SITE"/setuptools-* \
  "$SITE"/pkg_resources "$SITE"/_distutils_hack 2>/dev/null | tail -1 | cut -f1)
echo "venv: $((ALL / 1048576)) MiB, $(((ALL - TOOLS) / 1048576)) MiB without pip and setuptools ($(uname -m))"

"$WORK/venv/bin/edge" --help > /dev/null
"$WORK/venv/bin/edge" devices > /dev/null
"$WORK/venv/bin/edge" worker --listen 127.0.0.1:0 --device rpi4b-2gb --cache-dir "$WORK/cache" \
  --port-file "$WORK/port" > "$WORK/worker.log" 2>&1 &
PID=$!
i=0
while [ ! -s "$WORK/port" ]; do
  kill -0 "$PID" 2>/dev/null || fail "edge worker exited: $(cat "$WORK/worker.log")"
  i=$((i + 1)); [ "$i" -lt 300 ] || fail "edge worker did not listen within 30 s"
  sleep 0.1
done
"$WORK/venv/bin/python" - "$(cat "$WORK/port")" <<'PY'
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

with grpc.insecure_channel(f"127.0.0.1:{sys.argv[1]}") as channel:
    reply = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service="edge.v1.Worker"), timeout=10)
assert reply.status == health_pb2.HealthCheckResponse.SERVING, reply
print(f"edge worker from the base install serves on port {sys.argv[1]} (health: SERVING)")
PY
