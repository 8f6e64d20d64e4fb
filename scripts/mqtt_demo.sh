#!/usr/bin/env bash
# A whole MQTT deployment on this machine: a Mosquitto broker started from the
# shipped config on a free port (tools/mosquitto.py), the aggregator (`sparsefedpp
# serve`) and N device agents (`sparsefedpp client`) as separate processes, on real
# Fashion-MNIST split as the simulation splits it (or a CIFAR-10 folder as $1).
# Logs, device state and metrics land in runs/mqtt-demo/.
# Usage: bash scripts/mqtt_demo.sh [DATA] [DEVICES] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${1:-fashion-mnist}"; N="${2:-5}"; ROUNDS="${3:-3}"
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
pkgs=()
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || pkgs+=(mosquitto)
[ "$DATA" != fashion-mnist ] || [ -d /usr/share/datasets/fashion-mnist ] || pkgs+=(dataset-fashion-mnist)
python3 -c "import venv, ensurepip" 2>/dev/null || pkgs+=(python3-venv)
if [ ${#pkgs[@]} -gt 0 ]; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${pkgs[@]}"
fi
[ -x .venv/bin/sparsefedpp ] || { python3 -m venv .venv && .venv/bin/pip install -q -e .; }
OUT=runs/mqtt-demo; rm -rf "$OUT"; mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; }
trap cleanup EXIT
# The broker: the shipped deploy/mosquitto config, anonymous, on a free port, with its
# database in $OUT/broker (tools/mosquitto.py); it prints its URL once it is ready.
.venv/bin/python -m sparsefedpp.tools.mosquitto "$OUT/broker" > "$OUT/broker.url" \
    2> "$OUT/mosquitto.stderr" & pids+=($!)
for _ in $(seq 600); do
    [ -s "$OUT/broker.url" ] || ! kill -0 "${pids[0]}" 2>/dev/null && break
    sleep 0.1
done
[ -s "$OUT/broker.url" ] || { cat "$OUT/mosquitto.stderr" >&2; echo "error: the broker did not start" >&2; exit 1; }
URL=$(head -n1 "$OUT/broker.url")
.venv/bin/sparsefedpp partition --data "$DATA" --clients "$N" --limit $((N * 400)) --out "$OUT/shards"
devices=$(python3 -c "print(', '.join(f'\"{k}\"' for k in range($N)))")
cat > "$OUT/fed.toml" <<TOML
[federation]
method = "sparsefedpp"
sparsity = 0.9
model = "resnet8"
data = "$DATA"
rounds = $ROUNDS
per_round = $N
min_clients = $(( (N * 4 + 4) / 5 ))
lr = 0.2
lr_end = 0.05
test_limit = 2000
eval_sparsities = [0.95, 0.99]

[deployment]
devices = [$devices]
state_dir = "$OUT/aggregator"
round_timeout = 300
device_grace = 60
TOML
for k in $(seq 0 $((N - 1))); do
    NUMBA_NUM_THREADS=1 .venv/bin/sparsefedpp client --broker "$URL" \
        --id "$k" --data "$OUT/shards/client-$k.npz" --state "$OUT/device-$k" \
        --exit-when-finished --quiet > "$OUT/device-$k.log" 2>&1 & pids+=($!)
done
echo "broker on $URL, $N devices; aggregator log follows (metrics: $OUT/aggregator/metrics.jsonl)" >&2
.venv/bin/sparsefedpp serve --broker "$URL" --config "$OUT/fed.toml"
