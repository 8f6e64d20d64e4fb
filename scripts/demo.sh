#!/usr/bin/env bash
# Set up and run the main job on a fresh Debian machine: installs Debian's
# Fashion-MNIST, a venv with sparsefedpp, then trains the small CNN on it.
# Pass a CIFAR-10 "python version" folder as $1 to train ResNet-8 on that instead.
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
if [ $# -ge 1 ]; then
    exec .venv/bin/sparsefedpp train --model resnet8 --data "$1" --epochs 1 \
        --out runs/demo-cifar10
fi
exec .venv/bin/sparsefedpp train --model cnn --width 0.5 --data fashion-mnist \
    --epochs 1 --limit 20000 --out runs/demo-fashion-mnist
