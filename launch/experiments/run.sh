#!/usr/bin/env bash
# The paper reproduction: every method, both models, P ranks under horovodrun, seeds,
# then the statistical claims and docs/RESULTS.md with its plots.
#   bash launch/experiments/run.sh --quick   # P = 2 and 4, seed 0, 150 iterations (under 10 minutes)
#   bash launch/experiments/run.sh --full    # P = 2, 4, 8, seeds 0 1 2, 1500 iterations (hours: see docs/RESULTS.md)
# Override any part: RANKS="2 4" SEEDS="0 1 2" ITERATIONS=1500 MODELS="fc cnn" METHODS=fp32,dqsg-s3 \
#   bash launch/experiments/run.sh
# JSON goes to runs/experiments/ (one file per model, P, seed and length; earlier files are kept, so a
# sweep can be split over several calls); the report reads every file there.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../env.sh"
mode="${1:---quick}"
case "$mode" in
    --quick) : "${RANKS:=2 4}" "${SEEDS:=0}" "${ITERATIONS:=150}" "${EVAL_EVERY:=25}" "${STAT_STEPS:=60}" ;;
    --full)  : "${RANKS:=2 4 8}" "${SEEDS:=0 1 2}" "${ITERATIONS:=1500}" "${EVAL_EVERY:=100}" "${STAT_STEPS:=200}" ;;
    *) echo "usage: $0 --quick|--full" >&2; exit 2 ;;
esac
: "${MODELS:=fc cnn}" "${METHODS:=}"
# Horovod's background thread polls every HOROVOD_CYCLE_TIME ms; with more ranks than cores the
# default 5 ms adds up over the several rounds a payload step takes. 0.2 ms measured ~40% faster.
export HOROVOD_CYCLE_TIME="${HOROVOD_CYCLE_TIME:-0.2}"
start=$SECONDS
for model in $MODELS; do
    for np in $RANKS; do
        for seed in $SEEDS; do
            horovodrun -np "$np" python launch/experiments/paper.py --model "$model" --seed "$seed" \
                --iterations "$ITERATIONS" --eval-every "$EVAL_EVERY" ${METHODS:+--methods "$METHODS"}
        done
    done
done
python launch/experiments/stat_claims.py --steps "$STAT_STEPS" --every 20
python launch/experiments/report.py
echo "experiments done in $((SECONDS - start)) s"
