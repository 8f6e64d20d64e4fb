#!/usr/bin/env bash
# Reproduce the seed paper's Fig. 1 at a scale this 2-core machine can do:
# ResNet-8 on CIFAR-10, 100 clients, 10 per round, LDA alpha 1.0, 1 local epoch,
# batch 16, lr 0.5 -> 0.01 (exponential), weight decay 1e-3, no augmentation.
# SparseFedPP, ZeroFL and Top-k at 90/95/99/99.9 % sparsity, and dense FedAvg.
# Usage: bash scripts/fig1_sweep.sh CIFAR_DIR [ROUNDS] [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?usage: bash scripts/fig1_sweep.sh path/to/cifar-10-batches-py [ROUNDS] [OUT]}
ROUNDS=${2:-30}
OUT=${3:-runs/fig1}
SFPP=.venv/bin/sparsefedpp
common=(--model resnet8 --data "$DATA" --clients 100 --per-round 10 --rounds "$ROUNDS"
        --lda-alpha 1.0 --epochs 1 --batch-size 16 --lr 0.5 --lr-end 0.01
        --weight-decay 1e-3 --eval-every 5 --encoding csr --seed 0)
start=$(date +%s)
$SFPP simulate --method fedavg --sparsity 0 "${common[@]}" --out "$OUT/fedavg-0"
for s in 0.9 0.95 0.99 0.999; do
    for m in sparsefedpp zerofl topk; do
        extra=()
        [ "$m" = zerofl ] && extra=(--mask-ratio 0)
        $SFPP simulate --method "$m" --sparsity "$s" "${common[@]}" "${extra[@]}" \
            --out "$OUT/$m-$s"
    done
done
echo "sweep wall time: $(( $(date +%s) - start )) s"
$SFPP report "$OUT"/*/ --plots docs/figures
