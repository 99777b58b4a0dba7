#!/usr/bin/env bash
# Time to quality (a benchmark, not a test; needs root): the language-model job (--job lm) trained by
# every method of launch/bench_quality.py at P ranks, on an unlimited and a tc-shaped loopback, for
# several seeds; then the report (a table and a figure in docs/RESULTS.md).
#   bash launch/bench_quality.sh                       # everything: 22 methods x 2 links x 3 seeds x STEPS
#   METHODS=hvd-fp32,hvd-fp16,dqsg-s3,ddp-powersgd-r2 LINKS=1gbit SEEDS=0 STEPS=600 bash launch/bench_quality.sh
# Variables: METHODS (comma list, default all: `python launch/bench_quality.py methods`), LINKS
# ("unlimited 1gbit"; any <n>mbit/<n>gbit), SEEDS ("0 1 2"), NP (4), STEPS (3000), EVAL_EVERY (250),
# JOB_TIMEOUT (s per run, 3600), RESUME (1: keep a run whose summary exists), REPORT (1), OUT
# (runs/bench_quality). A run at the defaults takes 15-25 min at P = 4 on a 2-core machine, so the whole
# grid is a day there; split it with METHODS/LINKS/SEEDS (RESUME keeps what is done) and report once.
# The ranks run in a fresh network namespace whose only interface is its loopback (launch/netns.sh);
# Open MPI is confined to TCP on it, gloo can only use it. Every rank is started by mpirun, Horovod's
# and DDP's alike. Writes OUT/<link>/seed<s>/train-<method>.json and OUT/meta.json.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
source "$(dirname "${BASH_SOURCE[0]}")/netns.sh"
command=$(bench_command launch/bench_quality.sh METHODS LINKS SEEDS NP STEPS EVAL_EVERY)
: "${METHODS:=}" "${LINKS:=unlimited 1gbit}" "${SEEDS:=0 1 2}" "${NP:=4}" "${STEPS:=3000}" "${EVAL_EVERY:=250}"
: "${JOB_TIMEOUT:=3600}" "${RESUME:=1}" "${REPORT:=1}" "${OUT:=runs/bench_quality}"
mapfile -t methods < <(python launch/bench_quality.py methods --only "$METHODS")
mkdir -p "$OUT"
python - "$OUT/meta.json" "$command" <<'PY'  # the commands that wrote OUT (a split grid has several)
import datetime, json, os, pathlib, platform, sys
path, command = pathlib.Path(sys.argv[1]), sys.argv[2]
meta = json.loads(path.read_text()) if path.is_file() else {"commands": [], "dates": []}
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
meta["machine"] = f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"
for key, value in (("commands", command), ("dates", datetime.date.today().isoformat())):
    if value not in meta[key]:
        meta[key].append(value)
path.write_text(json.dumps(meta))
PY
netns_create hvdq-quality
export MASTER_ADDR=127.0.0.1
port=29700
failed=()
total=$(( ${#methods[@]} * $(wc -w <<<"$LINKS") * $(wc -w <<<"$SEEDS") ))
done_runs=0
start=$SECONDS
for link in $LINKS; do
    netns_shape "$link"
    for seed in $SEEDS; do
        for m in "${methods[@]}"; do
            done_runs=$((done_runs + 1))
            dir="$OUT/$link/seed$seed"
            if [ "$RESUME" = 1 ] && [ -f "$dir/train-$m.json" ]; then
                echo "-- [$done_runs/$total] $m $link seed $seed: kept ($dir/train-$m.json)"
                continue
            fi
            read -ra flags <<<"$(python launch/bench_quality.py flags "$m")"
            port=$((port + 1))   # a fresh rendezvous port per run
            t=$SECONDS
            if ! MASTER_PORT=$port timeout --kill-after=30 "$JOB_TIMEOUT" ip netns exec "$ns" \
                mpirun -np "$NP" "${MPI_ON_LO[@]}" -x PATH -x PYTHONUNBUFFERED -x MASTER_ADDR -x MASTER_PORT \
                    python -m hvdquant.examples.train --job lm "${flags[@]}" --seed "$seed" --steps "$STEPS" \
                    --eval-every "$EVAL_EVERY" --run-name "$m" --out "$dir"; then
                failed+=("$m $link seed $seed")
                echo "!! $m $link seed $seed failed or timed out" >&2
            fi
            echo "-- [$done_runs/$total] $m $link seed $seed: $((SECONDS - t)) s (total $((SECONDS - start)) s)"
        done
    done
done
if [ "$REPORT" = 1 ]; then
    python launch/bench_quality.py report --runs "$OUT"
fi
if [ "${#failed[@]}" -gt 0 ]; then
    printf '!! failed: %s\n' "${failed[@]}" >&2
    exit 1
fi
