#!/usr/bin/env bash
# Training-step benchmark (a benchmark, not a test; needs root): time per step (forward, backward,
# gradient exchange, optimizer step) of three models under Horovod fp32/fp16, hvdquant DQSG s=1
# (stock allreduce path; payload path over allgather and scatter-reduce), and DDP (gloo) plain and
# with PowerSGD, on an unlimited and a tc-shaped loopback.
#   bash launch/bench_step.sh     # everything: 18 min on the shared 2-core machine (2026-11-30), 29 min
#                                 # under heavy load from other jobs; mostly hvdquant's ResNet-18 steps at P=4
#   MODELS=mlp4x256 RANKS=2 LINKS="unlimited 1gbit" bash launch/bench_step.sh     # a quick subset
#   METHODS=fp16,stock,scatter_reduce STEPS=20 WARMUP=5 bash launch/bench_step.sh
# Variables: MODELS (mlp4x256 mlp20x512 resnet18), RANKS (2 4), LINKS (unlimited 1gbit 10gbit; any
# <n>mbit/<n>gbit), METHODS (comma list of fp32,fp16,stock,allgather,scatter_reduce,ddp,powersgd,ddp-dqsg;
# empty = all), STEPS (10 timed), WARMUP (3), BATCH (0 = per-model default), PROFILE (1: cProfile
# rank 0 of the stock method for resnet18 at P=2 on unlimited), JOB_TIMEOUT (s per mpirun job, 1200),
# REPORT (1: regenerate docs/BENCHMARKS.md's block and docs/bench_step.png at the end).
# The ranks run in a fresh network namespace whose only interface is its loopback; "unlimited" leaves
# it unshaped, the others shape it with tc tbf (the rate is shared by all ranks' traffic, as in
# launch/bench_network.sh). Open MPI is confined to TCP on that loopback; gloo can only use it.
# One mpirun job per (model, P, link) runs every selected method in turn (Horovod and DDP in the same
# ranks). OMP_NUM_THREADS and NUMBA_NUM_THREADS are unset: we measure as a user's job would run.
# Writes runs/bench_step/step_<model>_P<P>_<link>.json, profile_*.txt; then launch/bench_step_report.py.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
unset OMP_NUM_THREADS NUMBA_NUM_THREADS   # env.sh sets OMP_NUM_THREADS=1; a user's job would not
source "$(dirname "${BASH_SOURCE[0]}")/netns.sh"
command="$(bench_command launch/bench_step.sh MODELS RANKS LINKS METHODS STEPS WARMUP BATCH PROFILE)${*:+ $*}"
: "${MODELS:=mlp4x256 mlp20x512 resnet18}" "${RANKS:=2 4}" "${LINKS:=unlimited 1gbit 10gbit}" "${METHODS:=}"
: "${STEPS:=10}" "${WARMUP:=3}" "${BATCH:=0}" "${PROFILE:=1}" "${JOB_TIMEOUT:=1200}" "${REPORT:=1}"
netns_create hvdq-step
mkdir -p runs/bench_step
export MASTER_ADDR=127.0.0.1
port=29600
failed=()
start=$SECONDS
for link in $LINKS; do
    netns_shape "$link"
    for model in $MODELS; do
        for np in $RANKS; do
            port=$((port + 1))   # a fresh rendezvous port per job (the last one may linger in TIME_WAIT)
            prof=()
            if [ "$PROFILE" = 1 ] && [ "$model" = resnet18 ] && [ "$np" = 2 ] && [ "$link" = unlimited ]; then
                prof=(--profile)
            fi
            t=$SECONDS
            if ! MASTER_PORT=$port timeout --kill-after=30 "$JOB_TIMEOUT" ip netns exec "$ns" \
                mpirun -np "$np" "${MPI_ON_LO[@]}" \
                    -x PATH -x PYTHONUNBUFFERED -x MASTER_ADDR -x MASTER_PORT \
                    python launch/bench_step.py --model "$model" --link "$link" --steps "$STEPS" \
                    --warmup "$WARMUP" --batch "$BATCH" ${METHODS:+--methods "$METHODS"} "${prof[@]}" \
                    --command "$command"; then
                failed+=("$model P=$np $link")
                echo "!! job $model P=$np $link failed or timed out" >&2
            fi
            echo "-- $model P=$np $link: $((SECONDS - t)) s"
        done
    done
done
echo "bench_step: jobs done in $((SECONDS - start)) s"
if [ "$REPORT" = 1 ]; then
    python launch/bench_step_report.py
fi
if [ "${#failed[@]}" -gt 0 ]; then
    printf '!! failed: %s\n' "${failed[@]}" >&2
    exit 1
fi
