#!/usr/bin/env bash
# Where a main job's time goes: rank 0 of a training run under cProfile, the other ranks as they are
# (a profiling aid, not a benchmark: cProfile slows Python-heavy code on rank 0, so compare methods
# by their shares, not by wall-clock).
#   NP=4 bash launch/profile_train.sh --job lm --steps 60 --eval-every 60 --compression dqsg --levels 3
#   NP=4 bash launch/profile_train.sh --job lm --steps 60 --eval-every 60 --compression fp16
# Every argument goes to python -m hvdquant.examples.train (Horovod or DDP, as its flags say).
# Variables: NP (4), OUT (runs/profile), TOP (40 functions printed). Writes OUT/train_rank0.prof and
# OUT/train_rank0.txt (the functions with the most cumulative time, then the most own time).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
: "${NP:=4}" "${OUT:=runs/profile}" "${TOP:=40}"
mkdir -p "$OUT"
export MASTER_ADDR=127.0.0.1 MASTER_PORT="${MASTER_PORT:-29650}"
mpirun -np "$NP" --oversubscribe -x PATH -x PYTHONUNBUFFERED -x MASTER_ADDR -x MASTER_PORT bash -c '
    out=$1; shift
    if [ "${OMPI_COMM_WORLD_RANK:-0}" = 0 ]; then
        exec python -m cProfile -o "$out/train_rank0.prof" -m hvdquant.examples.train --out "$out" "$@"
    fi
    exec python -m hvdquant.examples.train --out "$out" "$@"' profile "$OUT" "$@"
python - "$OUT/train_rank0.prof" "$TOP" <<'PY' | tee "$OUT/train_rank0.txt"
import pstats, sys
stats = pstats.Stats(sys.argv[1])
stats.sort_stats("cumulative").print_stats(int(sys.argv[2]))
stats.sort_stats("tottime").print_stats(int(sys.argv[2]))
PY
