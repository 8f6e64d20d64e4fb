#!/usr/bin/env bash
# Set up and run the main job on a fresh Debian machine: installs Debian's
# Fashion-MNIST and a venv with sparsefedpp, then simulates a small federation
# (SparseFedPP at 90 % sparsity, 20 clients, 5 per round, 10 rounds, ResNet-8) on
# it: a line per round, metrics in runs/demo-*/metrics.jsonl.
# Pass a CIFAR-10 "python version" folder as $1 to federate ResNet-8 on that.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
pkgs=()
[ -d /usr/share/datasets/fashion-mnist ] || pkgs+=(dataset-fashion-mnist)
python3 -c "import venv, ensurepip" 2>/dev/null || pkgs+=(python3-venv)
if [ ${#pkgs[@]} -gt 0 ]; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${pkgs[@]}"
fi
[ -x .venv/bin/sparsefedpp ] || { python3 -m venv .venv && .venv/bin/pip install -q -e .; }
common=(--method sparsefedpp --sparsity 0.9 --clients 20 --per-round 5 --rounds 10
        --lda-alpha 1.0 --lr 0.2 --lr-end 0.02 --eval-sparsities 0.95 0.99)
if [ $# -ge 1 ]; then
    exec .venv/bin/sparsefedpp simulate "${common[@]}" --model resnet8 --data "$1" \
        --limit 20000 --out runs/demo-cifar10
fi
exec .venv/bin/sparsefedpp simulate "${common[@]}" --model resnet8 \
    --data fashion-mnist --limit 20000 --out runs/demo-fashion-mnist
