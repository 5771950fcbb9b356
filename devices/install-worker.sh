#!/bin/sh
# Install an edge worker on Raspberry Pi OS / Debian (arm64) as a systemd service.
# Worker only: no torch, just edge's core dependencies (numpy, onnx, onnxruntime, grpcio,
# grpcio-health-checking, protobuf, psutil, pyyaml, rich).
#
# Usage: sudo sh install-worker.sh PROFILE [PIP_SPEC]
#   PROFILE   a profile in this folder, e.g. rpi4b-2gb, rpi5-8gb, rpi-zero-2w
#   PIP_SPEC  what to pip install (default: edge); e.g. a wheel path or git+https://... URL
set -eu

PROFILE=${1:?usage: sudo sh install-worker.sh PROFILE [PIP_SPEC]}
SPEC=${2:-edge}
HERE=$(cd "$(dirname "$0")" && pwd)
PREFIX=/opt/edge

[ "$(id -u)" -eq 0 ] || { echo "run as root (sudo)" >&2; exit 1; }
[ -f "$HERE/$PROFILE.yaml" ] || { echo "unknown profile $PROFILE; known:" $(cd "$HERE" && ls *.yaml | sed 's/\.yaml$//') >&2; exit 1; }
case "$(uname -m)" in
  aarch64|x86_64) ;;
  *) echo "$(uname -m): onnxruntime has no wheels for it; install a 64-bit OS" >&2; exit 1 ;;
esac

apt-get update
apt-get install -y --no-install-recommends python3 python3-venv python3-pip

id edge >/dev/null 2>&1 || useradd --system --home-dir "$PREFIX" --shell /usr/sbin/nologin edge
mkdir -p "$PREFIX/devices"
cp "$HERE"/*.yaml "$PREFIX/devices/"
[ -d "$PREFIX/venv" ] || python3 -m venv "$PREFIX/venv"
"$PREFIX/venv/bin/pip" install --upgrade pip
# Plain install: core dependencies only. Never the [export] extra (torch) on a worker.
"$PREFIX/venv/bin/pip" install "$SPEC"
chown -R edge:edge "$PREFIX"

sed "s/^Environment=EDGE_DEVICE=.*/Environment=EDGE_DEVICE=$PROFILE/" \
  "$HERE/edge-worker.service" > /etc/systemd/system/edge-worker.service
systemctl daemon-reload
systemctl enable --now edge-worker
echo "edge worker ($PROFILE) listening on port 50051; logs: journalctl -u edge-worker -f"
