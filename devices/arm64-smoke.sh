#!/bin/sh
# Proof on aarch64: an aarch64 `edge worker` under qemu-user serves one shard of BERT tiny
# over gRPC, and its output must equal x86 onnxruntime's within 1e-4. A smoke test, not a
# benchmark, and not part of CI. Needs root, the Debian archive and PyPI; the first run
# builds an arm64 root with debootstrap (~200 s), later runs reuse it.
#
# Usage: sudo sh devices/arm64-smoke.sh [--cache DIR] [--cleanup]   (see --help)
#   exit 0: equal within 1e-4 on aarch64; 1: not equal; 2: could not run (says why)
set -eu
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m edge.lab.arm64 "$@"
