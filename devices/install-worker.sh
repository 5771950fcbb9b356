#!/bin/sh
# Install an edge worker on Raspberry Pi OS / Debian (arm64) as a systemd service.
# Worker only: edge-runtime's base install (numpy, onnxruntime, grpcio, grpcio-health-checking,
# protobuf, psutil, pyyaml, prometheus-client, zeroconf), never torch, onnx or an extra.
#
# Usage: sudo CERTS=~/edge-certs sh install-worker.sh PROFILE [--from PATH|URL]
#   PROFILE   a profile in this folder, e.g. rpi4b-2gb, rpi5-8gb, rpi-zero-2w
#   --from    what to install edge-runtime from: a clone of the repository, a wheel
#             (edge_runtime-*.whl) or a pip URL (git+https://...). Default: the clone this
#             script is in. edge-runtime is not on PyPI yet, and "edge" on PyPI is an
#             unrelated package: this script never installs either name from an index.
#   CERTS     this board's bundle, made on the machine with the cluster CA by
#             `edge certs issue NAME --host BOARD_IP` and copied here (scp -rp); it goes
#             to /etc/edge/certs. Already there from an earlier run: CERTS may be left out.
#
# Layout: /opt/edge (the venv and profiles) belongs to root; the worker runs as a dynamic
# user (deploy/systemd/edge-worker.service, hardened) that cannot change its own code and
# gets the bundle, root's only in /etc/edge/certs, as systemd credentials. Its settings are
# /etc/edge/worker.env, its memory limit the profile's budget (a drop-in), its shard cache
# systemd's state directory /var/lib/edge/cache. Running it again upgrades edge-runtime and
# restarts the worker.
set -eu
umask 022

USAGE="usage: sudo CERTS=BUNDLE_DIR sh install-worker.sh PROFILE [--from PATH|URL]"
HERE=$(cd "$(dirname "$0")" && pwd)
PREFIX=/opt/edge
ETC=/etc/edge
STATE=/var/lib/edge
UNIT=edge-worker

fail() { echo "install-worker.sh: $*" >&2; exit 1; }

PROFILE=
SPEC=
while [ $# -gt 0 ]; do
  case "$1" in
    --from) [ $# -ge 2 ] || fail "--from needs a PATH or URL; $USAGE"; SPEC=$2; shift 2 ;;
    --from=*) SPEC=${1#--from=}; shift ;;
    -h|--help) echo "$USAGE"; exit 0 ;;
    -*) fail "unknown option $1; $USAGE" ;;
    *) [ -z "$PROFILE" ] || fail "one PROFILE only, got $PROFILE and $1; $USAGE"
       PROFILE=$1; shift ;;
  esac
done
[ -n "$PROFILE" ] || fail "$USAGE"

# Everything is checked before anything on this machine changes.
[ -f "$HERE/$PROFILE.yaml" ] || fail "unknown profile $PROFILE; known: $(cd "$HERE" && ls *.yaml | sed 's/\.yaml$//' | tr '\n' ' ')"

if [ -z "$SPEC" ]; then
  # The clone this script is in (devices/ is at its top).
  if [ -f "$HERE/../pyproject.toml" ] && grep -q '^name = "edge-runtime"' "$HERE/../pyproject.toml"; then
    SPEC=$(cd "$HERE/.." && pwd)
  else
    fail "$HERE is not in a clone of edge, and edge-runtime is not on PyPI yet: pass --from with a clone, a wheel (edge_runtime-*.whl) or a URL (git+https://...)"
  fi
fi
# A bare name or requirement would come from an index: "edge" there is someone else's
# package, and edge-runtime is not published yet.
if [ ! -e "$SPEC" ] && printf '%s' "$SPEC" | grep -Eqi '^(edge|edge[-_.]runtime)[[:space:]]*([=<>~!;[].*)?$'; then
  fail "--from $SPEC would install from PyPI, where \"edge\" is an unrelated package and edge-runtime is not published yet; pass a clone, a wheel or a git+https:// URL"
fi
if [ -d "$SPEC" ]; then
  [ -f "$SPEC/pyproject.toml" ] && grep -q '^name = "edge-runtime"' "$SPEC/pyproject.toml" \
    || fail "--from $SPEC: expected a clone of edge (a pyproject.toml naming edge-runtime)"
elif [ -e "$SPEC" ]; then
  case "$SPEC" in
    *.whl) ;;
    *) fail "--from $SPEC: expected a folder (a clone), a .whl or a URL" ;;
  esac
else
  case "$SPEC" in
    *://*) ;;
    *) fail "--from $SPEC: no such file or folder" ;;
  esac
fi

# The unit and its settings: beside this script (a copy), or deploy/systemd in the clone.
UNIT_DIR=$HERE
[ -f "$UNIT_DIR/edge-worker.service" ] || UNIT_DIR=$HERE/../deploy/systemd
[ -f "$UNIT_DIR/edge-worker.service" ] && [ -f "$UNIT_DIR/edge-worker.env" ] \
  || fail "expected edge-worker.service and edge-worker.env beside this script or in ../deploy/systemd"
# The unit's MemoryMax= is the profile's worker budget.
BUDGET=$(sed -n 's/^memory_budget_mb:[[:space:]]*\([0-9][0-9]*\).*/\1/p' "$HERE/$PROFILE.yaml")
[ -n "$BUDGET" ] || fail "$HERE/$PROFILE.yaml: expected memory_budget_mb: MIB"

if [ -n "${CERTS:-}" ]; then
  for f in ca.crt node.crt node.key token; do
    [ -f "$CERTS/$f" ] || fail "CERTS=$CERTS: expected a bundle of \`edge certs issue NAME\` with ca.crt, node.crt, node.key, token; $f is missing"
  done
elif [ ! -f "$ETC/certs/node.crt" ]; then
  fail "no certificate bundle: on the machine with the cluster CA run \`edge certs issue NAME --host BOARD_IP\`, copy DIR/NAME here (scp -rp), then: sudo CERTS=PATH sh $0 $PROFILE"
fi
case "$(uname -m)" in
  aarch64|x86_64) ;;
  *) fail "$(uname -m): onnxruntime has no wheels for it; install a 64-bit OS" ;;
esac
[ "$(id -u)" -eq 0 ] || fail "run as root (sudo)"

apt-get update
apt-get install -y --no-install-recommends python3 python3-venv python3-pip

# Root owns /opt/edge: a worker that is broken into cannot rewrite what it runs.
mkdir -p "$PREFIX/devices"
chown root:root "$PREFIX" "$PREFIX/devices"
chmod 755 "$PREFIX" "$PREFIX/devices"
cp "$HERE"/*.yaml "$PREFIX/devices/"
chmod 644 "$PREFIX"/devices/*.yaml
[ -d "$PREFIX/venv" ] || python3 -m venv "$PREFIX/venv"
"$PREFIX/venv/bin/pip" install --upgrade pip
# Plain install: core dependencies only. Never the [export] extra (torch) on a worker.
if [ -d "$SPEC" ]; then
  # Built from a copy: pip builds in the source tree, and root's build/ and *.egg-info
  # would be left in the user's clone.
  SRC=$(mktemp -d)
  trap 'rm -rf "$SRC"' EXIT
  cp -r "$SPEC/pyproject.toml" "$SPEC/README.md" "$SPEC/edge" "$SPEC/devices" "$SRC/"
  "$PREFIX/venv/bin/pip" install --upgrade "$SRC"
else
  "$PREFIX/venv/bin/pip" install --upgrade "$SPEC"
fi
chown -R root:root "$PREFIX/venv"

mkdir -p "$ETC"
chmod 755 "$ETC"
if [ -n "${CERTS:-}" ]; then
  rm -rf "$ETC/certs" && mkdir -p "$ETC/certs"
  cp "$CERTS"/ca.crt "$CERTS"/node.crt "$CERTS"/node.key "$CERTS"/token "$ETC/certs/"
fi
# Root's only: systemd reads them and hands them to the worker (LoadCredential=).
chown -R root:root "$ETC/certs"
chmod 700 "$ETC/certs"
chmod 600 "$ETC"/certs/*
# The settings: a second run keeps the owner's edits and changes the profile only.
[ -f "$ETC/worker.env" ] || install -m 644 "$UNIT_DIR/edge-worker.env" "$ETC/worker.env"
sed -i "s/^EDGE_DEVICE=.*/EDGE_DEVICE=$PROFILE/" "$ETC/worker.env"

install -m 644 "$UNIT_DIR/edge-worker.service" /etc/systemd/system/$UNIT.service
mkdir -p /etc/systemd/system/$UNIT.service.d
printf '[Service]\n# %s: memory_budget_mb\nMemoryMax=%sM\n' "$PROFILE" "$BUDGET" \
  > /etc/systemd/system/$UNIT.service.d/memory.conf
systemctl daemon-reload
systemctl enable "$UNIT"
# restart, not start: on a second run the worker must pick up the new code and profile.
systemctl reset-failed "$UNIT" 2>/dev/null || true
systemctl restart "$UNIT"

# A worker that crashes at start is "active" for a moment: wait, then check that it is
# still active and has not been restarted.
sleep 5
if systemctl is-active --quiet "$UNIT" \
    && [ "$(systemctl show -p NRestarts --value "$UNIT" 2>/dev/null || echo 0)" = 0 ]; then
  echo "edge worker ($PROFILE) listening on port 50051 (mutual TLS, bundle $ETC/certs, MemoryMax ${BUDGET}M, cache $STATE/cache); logs: journalctl -u $UNIT -f"
else
  echo "install-worker.sh: the edge worker did not start ($(systemctl is-active "$UNIT" || true)); its log:" >&2
  journalctl -u "$UNIT" -n 30 --no-pager >&2 || true
  exit 1
fi
