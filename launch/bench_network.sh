#!/usr/bin/env bash
# Gradient exchanges on an emulated slow network(a benchmark, not a test; needs root).
#   bash launch/bench_network.sh                      # 100 Mbit/s, 1 Gbit/s, 10 Gbit/s; 1e6, 1e7, 2.5e7
#   LINKS="1gbit" SIZES="2.5e7" ONLY="fp32,fp16,dqsg s=1,powersgd" bash launch/bench_network.sh
#   TTA=0 ...                                         # skip the main job's time-to-accuracy runs
# 4 ranks run inside a fresh network namespace whose only interface is its loopback, shaped with
# tc tbf to the link rate. That limit is shared by all traffic of all ranks (a shared medium,
# not one link per rank): absolute times are for R bits/s in total, ratios are what carries over.
# Open MPI is confined to TCP on that loopback (no shared-memory transport), Gloo and
# torch.distributed can only use it. Writes runs/bench_network/*.json, then docs/BENCHMARKS.md's
# network section and plot through launch/bench_network_report.py.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
: "${LINKS:=100mbit 1gbit 10gbit}" "${SIZES:=1e6 1e7 2.5e7}" "${REPEATS:=5}" "${ONLY:=}" "${TTA:=1}" "${NP:=4}"
if [ "$(id -u)" != 0 ]; then echo "bench_network.sh needs root (ip netns, tc)" >&2; exit 1; fi
ns="hvdq-bench-$$"
ip netns add "$ns"
trap 'ip netns del "$ns" 2>/dev/null || true' EXIT
ip netns exec "$ns" ip link set lo up
mpi=(mpirun -np "$NP" --mca btl self,tcp --mca btl_tcp_if_include lo --mca oob_tcp_if_include lo
     -x PATH -x PYTHONUNBUFFERED -x OMP_NUM_THREADS)
mkdir -p runs/bench_network
for link in $LINKS; do
    rate_bps=$(python -c "import sys; s=sys.argv[1]; u={'mbit':1e6,'gbit':1e9}; print(int(float(s[:-4])*u[s[-4:]]))" "$link")
    burst=$(( rate_bps / 8 / 100 > 262144 ? rate_bps / 8 / 100 : 262144 ))   # 10 ms of traffic, at least 256 KiB
    ip netns exec "$ns" tc qdisc replace dev lo root tbf rate "$link" burst "$burst" limit $(( 4 * burst ))
    echo "== $link: $(ip netns exec "$ns" tc qdisc show dev lo)"
    for fw in horovod torch; do
        ip netns exec "$ns" "${mpi[@]}" python launch/bench_network.py --framework "$fw" --label "$link" \
            --sizes $SIZES --repeats "$REPEATS" ${ONLY:+--only "$ONLY"}
    done
done
if [ "$TTA" = 1 ]; then  # the main job at 100 Mbit/s: time to accuracy
    ip netns exec "$ns" tc qdisc replace dev lo root tbf rate 100mbit burst 262144 limit 1048576
    for args in "--compression none" "--compression fp16" "--compression dqsg" \
                "--compression ndqsg --reducer allgather"; do
        ip netns exec "$ns" horovodrun --gloo --network-interface lo -np "$NP" \
            python -m hvdquant.examples.train_fashion_mnist $args --epochs 2 --out runs/bench_network/tta
    done
fi
python launch/bench_network_report.py
