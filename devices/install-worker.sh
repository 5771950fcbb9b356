#!/bin/sh
# Install an edge worker on Raspberry Pi OS / Debian (arm64) as a systemd service.
# Worker only: no torch, just edge's core dependencies (numpy, onnx, onnxruntime, grpcio,
# grpcio-health-checking, protobuf, psutil, pyyaml, rich).
#
# Usage: sudo CERTS=~/edge-certs sh install-worker.sh PROFILE [PIP_SPEC]
#   PROFILE   a profile in this folder, e.g. rpi4b-2gb, rpi5-8gb, rpi-zero-2w
#   PIP_SPEC  what to pip install (default: edge); e.g. a wheel path or git+https://... URL
#   CERTS     this board's bundle, made on the machine with the cluster CA by
#             `edge certs issue NAME --host BOARD_IP` and copied here (scp -rp); it goes
#             to /opt/edge/certs. Already there from an earlier run: CERTS may be left out.
set -eu

PROFILE=${1:?usage: sudo CERTS=BUNDLE_DIR sh install-worker.sh PROFILE [PIP_SPEC]}
SPEC=${2:-edge}
HERE=$(cd "$(dirname "$0")" && pwd)
PREFIX=/opt/edge

[ "$(id -u)" -eq 0 ] || { echo "run as root (sudo)" >&2; exit 1; }
if [ -n "${CERTS:-}" ]; then
  for f in ca.crt node.crt node.key token; do
    [ -f "$CERTS/$f" ] || { echo "CERTS=$CERTS: expected a bundle of \`edge certs issue NAME\` with ca.crt, node.crt, node.key, token; $f is missing" >&2; exit 1; }
  done
elif [ ! -f "$PREFIX/certs/node.crt" ]; then
  echo "no certificate bundle: on the machine with the cluster CA run \`edge certs issue NAME --host BOARD_IP\`, copy DIR/NAME here (scp -rp), then: sudo CERTS=PATH sh $0 $PROFILE" >&2
  exit 1
fi
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
if [ -n "${CERTS:-}" ]; then
  rm -rf "$PREFIX/certs" && mkdir -p "$PREFIX/certs"
  cp "$CERTS"/ca.crt "$CERTS"/node.crt "$CERTS"/node.key "$CERTS"/token "$PREFIX/certs/"
fi
chown -R edge:edge "$PREFIX"
chmod 700 "$PREFIX/certs" && chmod 600 "$PREFIX/certs/node.key" "$PREFIX/certs/token"

sed "s/^Environment=EDGE_DEVICE=.*/Environment=EDGE_DEVICE=$PROFILE/" \
  "$HERE/edge-worker.service" > /etc/systemd/system/edge-worker.service
systemctl daemon-reload
systemctl enable --now edge-worker
echo "edge worker ($PROFILE) listening on port 50051 (mutual TLS, bundle $PREFIX/certs); logs: journalctl -u edge-worker -f"
