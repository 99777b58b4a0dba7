#!/usr/bin/env bash
# The main job: horovodrun training of a small CNN on Fashion-MNIST with gradient compression.
#   bash launch/train.sh                                  # 2 ranks, DQSG s=1, d=512, 2 epochs
#   bash launch/train.sh --compression none|fp16|dqsg --levels 3 --bucket-size 256 --epochs 3
#   NP=4 bash launch/train.sh --op sum                    # more ranks, Horovod op=Sum
# Writes runs/train-<compression>.json. Extra horovodrun flags: HOROVODRUN_FLAGS="--gloo".
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
# shellcheck disable=SC2086
exec horovodrun -np "${NP:-2}" ${HOROVODRUN_FLAGS:-} python -m hvdquant.examples.train_fashion_mnist "$@"
