#!/usr/bin/env bash
# Gradient exchanges on an emulated slow network(a benchmark, not a test; needs root).
#   bash launch/bench_network.sh                      # 100 Mbit/s, 1 Gbit/s, 10 Gbit/s; 1e6, 1e7, 2.5e7
#   LINKS="1gbit" SIZES="2.5e7" ONLY="fp32,fp16,dqsg s=1,powersgd" bash launch/bench_network.sh
#   TTA=0 ...                                         # skip the main job's time-to-accuracy runs (Horovod and DDP)
#   NP=2 OUT=runs/bench_network_np2 ...               # 2 ranks; rows kept apart (no docs regeneration)
# 4 ranks run inside a fresh network namespace whose only interface is its loopback, shaped with
# tc tbf to the link rate. That limit is shared by all traffic of all ranks (a shared medium,
# not one link per rank): absolute times are for R bits/s in total, ratios are what carries over.
# Open MPI is confined to TCP on that loopback (no shared-memory transport), Gloo and
# torch.distributed can only use it. DDP rows (--framework torch): DDP fp32, torch's fp16 and PowerSGD
# hooks, and the hvdquant hook (hvdquant.ddp). Writes runs/bench_network/*.json, then docs/BENCHMARKS.md's
# network section and plot through launch/bench_network_report.py.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
source "$(dirname "${BASH_SOURCE[0]}")/netns.sh"
: "${LINKS:=100mbit 1gbit 10gbit}" "${SIZES:=1e6 1e7 2.5e7}" "${REPEATS:=5}" "${ONLY:=}" "${TTA:=1}" "${NP:=4}"
: "${OUT:=runs/bench_network}"  # another folder: rows kept apart, docs/BENCHMARKS.md's block not regenerated
netns_create hvdq-bench
mpi=(mpirun -np "$NP" "${MPI_ON_LO[@]}" -x PATH -x PYTHONUNBUFFERED -x OMP_NUM_THREADS)
mkdir -p "$OUT"
for link in $LINKS; do
    netns_shape "$link"
    for fw in horovod torch; do
        ip netns exec "$ns" "${mpi[@]}" python launch/bench_network.py --framework "$fw" --label "$link" \
            --sizes $SIZES --repeats "$REPEATS" ${ONLY:+--only "$ONLY"} --out "$OUT"
    done
done
if [ "$TTA" = 1 ]; then  # the main job at 100 Mbit/s: time to accuracy
    netns_shape 100mbit
    for args in "--compression none" "--compression fp16" "--compression dqsg" \
                "--compression ndqsg --reducer allgather"; do
        ip netns exec "$ns" horovodrun --gloo --network-interface lo -np "$NP" \
            python -m hvdquant.examples.train $args --epochs 2 --out runs/bench_network/tta
    done
    # the same job under PyTorch DDP: DDP fp32, torch's fp16 and PowerSGD hooks, the hvdquant hook
    for args in "--compression none" "--compression fp16" "--compression powersgd" "--compression dqsg"; do
        ip netns exec "$ns" env GLOO_SOCKET_IFNAME=lo torchrun --standalone --nproc_per_node "$NP" \
            -m hvdquant.examples.train --framework ddp $args --epochs 2 --out runs/bench_network/tta
    done
fi
if [ "$OUT" = runs/bench_network ]; then python launch/bench_network_report.py; fi
