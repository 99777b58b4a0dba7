#!/usr/bin/env bash
# The main jobs: data-parallel training with gradient compression. --job cnn (the quick default): a
# small CNN on Fashion-MNIST; --job lm: a byte-level GPT on the Python standard library's source files.
#   bash launch/train.sh                                  # horovodrun, 2 ranks, DQSG s=1, d=512, 2 epochs
#   bash launch/train.sh --job lm                         # the language model, 3000 steps (~10 min at P=2)
#   bash launch/train.sh --job lm --compression qsgd --levels 1 --steps 1000   # any flag of either job
#   bash launch/train.sh --compression none|fp16|dqsg --levels 3 --bucket-size 256 --epochs 3
#   NP=4 bash launch/train.sh --op sum                    # more ranks, Horovod op=Sum
#   bash launch/train.sh --framework ddp                  # PyTorch DDP under torchrun (no Horovod): hvdquant hook
#   bash launch/train.sh --framework ddp --compression none|fp16|powersgd   # DDP fp32, torch's fp16 / PowerSGD hooks
#   LAUNCHER=mpirun bash launch/train.sh --framework ddp --compression qsgd --reducer scatter_reduce
# Writes runs/train-<compression>.json (DDP: runs/train-ddp-<compression>.json; lm: runs/train-lm-...). Extra horovodrun flags:
# HOROVODRUN_FLAGS="--gloo"; extra torchrun flags: TORCHRUN_FLAGS.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
framework=horovod
prev=
for arg in "$@"; do
    case "$arg" in
        --framework=*) framework=${arg#--framework=} ;;
        *) [ "$prev" = --framework ] && framework=$arg ;;
    esac
    prev=$arg
done
job=(python -m hvdquant.examples.train "$@")
if [ "$framework" = ddp ]; then
    if [ "${LAUNCHER:-torchrun}" = mpirun ]; then
        exec mpirun -n "${NP:-2}" -x PATH -x OMP_NUM_THREADS -x PYTHONUNBUFFERED "${job[@]}"
    fi
    # shellcheck disable=SC2086
    exec torchrun --standalone --nproc_per_node "${NP:-2}" ${TORCHRUN_FLAGS:-} -m hvdquant.examples.train "$@"
fi
# shellcheck disable=SC2086
exec horovodrun -np "${NP:-2}" ${HOROVODRUN_FLAGS:-} "${job[@]}"
