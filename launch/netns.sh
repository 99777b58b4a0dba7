# Sourced by the network benchmarks (bench_network.sh, bench_step.sh): a fresh network namespace
# whose only interface is its loopback, shaped with tc tbf to a link rate, and the Open MPI flags
# that keep MPI on that loopback (TCP only: shared memory would bypass the shaping). Needs root.
#   netns_create PREFIX    # sets $ns, deletes it on exit
#   netns_shape LINK       # "unlimited" (no qdisc) or <n>mbit / <n>gbit, shared by all traffic
#   "${MPI_ON_LO[@]}"      # mpirun flags
#   bench_command SCRIPT VAR...   # "VAR="value" ... bash SCRIPT" for the variables the caller set
if [ "$(id -u)" != 0 ]; then echo "$(basename "$0") needs root (ip netns, tc)" >&2; exit 1; fi
MPI_ON_LO=(--mca btl self,tcp --mca btl_tcp_if_include lo --mca oob_tcp_if_include lo)

netns_create() {
    ns="$1-$$"
    ip netns add "$ns"
    trap 'ip netns del "$ns" 2>/dev/null || true' EXIT
    ip netns exec "$ns" ip link set lo up
}

netns_shape() {
    local link=$1 rate_bps burst
    if [ "$link" = unlimited ]; then
        ip netns exec "$ns" tc qdisc del dev lo root 2>/dev/null || true
    else
        rate_bps=$(python -c "import sys; s=sys.argv[1]; u={'mbit':1e6,'gbit':1e9}; print(int(float(s[:-4])*u[s[-4:]]))" "$link")
        burst=$(( rate_bps / 8 / 100 > 262144 ? rate_bps / 8 / 100 : 262144 ))   # 10 ms of traffic, at least 256 KiB
        ip netns exec "$ns" tc qdisc replace dev lo root tbf rate "$link" burst "$burst" limit $(( 4 * burst ))
    fi
    echo "== $link: $(ip netns exec "$ns" tc qdisc show dev lo)"
}

bench_command() {  # the exact command, with the overrides given, for the records
    local script=$1 v prefix=""
    shift
    for v in "$@"; do
        if [ -n "${!v+x}" ]; then prefix+="$v=\"${!v}\" "; fi
    done
    echo "${prefix}bash $script"
}
