#!/usr/bin/env bash
# Packaging check: build hvdquant's wheel the way `pip install .` does (from a clean copy of the
# checkout: tracked and untracked-but-not-ignored files, so no stale build/ folder can leak in),
# install it with --no-deps into a throw-away virtual environment that reuses the main .venv's
# packages (torch, numba, Horovod, ...) but not its editable hvdquant, and from a folder outside the
# checkout check that:
#   - the wheel holds exactly hvdquant/ and kernels/ (as hvdquant/kernels/) and nothing else;
#   - hvdquant is imported from the wheel, and every name of hvdquant.__all__ and every module imports;
#   - a DQSG round trip stays within Δ/2, with Numba's cache (cache=True) in the installed package's
#     __pycache__, and again with that folder unwritable (the cache then goes to the user cache), and
#     with no writable cache at all (compiled in memory);
#   - the main job's --help works (module and hvdquant-train console script), and a 2-rank
#     horovodrun --gloo run of it (1 epoch, --max-steps) trains with bit-identical replicas, and so
#     does a tiny language-model run (--job lm).
# Exits non-zero on any failure; the last line is the verdict. Leaves nothing behind (the work
# folder is a mktemp -d, removed at exit; HVDQ_KEEP_WHEEL_WORK=1 keeps it).
#
#   bash launch/check_wheel.sh            # 1-1.5 minutes on 2 cores
# Knobs: HVDQ_WHEEL_STEPS (training steps, default 30, test accuracy ~0.70) with HVDQ_WHEEL_MIN_ACCURACY
# (default 0.3); HVDQ_WHEEL_TRAIN_TIMEOUT (default 300 s); HVDQ_KEEP_WHEEL_WORK=1.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"    # .venv on PATH, Open MPI settings, cd to the checkout
unset PYTHONPATH PYTHONHOME PYTHONSTARTUP PYTHONSAFEPATH
T0=$SECONDS
VPY="$VENV/bin/python"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/hvdquant-wheel.XXXXXX")"
STEP="start"
NOTE=""
BG=""

finish() {
    local rc=$?
    if [ -n "$BG" ]; then kill "$BG" 2>/dev/null || true; wait "$BG" 2>/dev/null || true; fi
    if [ "${HVDQ_KEEP_WHEEL_WORK:-0}" = 1 ]; then
        echo "[wheel] kept $WORK"
    else
        chmod -R u+w "$WORK" 2>/dev/null || true
        rm -rf "$WORK"
    fi
    if [ "$rc" -eq 0 ]; then
        echo "check_wheel: PASS in $((SECONDS - T0)) s ($NOTE)"
    else
        echo "check_wheel: FAIL at '$STEP' (exit $rc) after $((SECONDS - T0)) s"
    fi
    exit "$rc"
}
trap finish EXIT

step() {
    STEP="$1"
    printf '\n[wheel %3d s] %s\n' $((SECONDS - T0)) "$1"
}

# ---------------------------------------------------------------- build
step "copy the checkout"
SRC="$WORK/src"
mkdir -p "$SRC"
if git -C "$HVDQ_ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    # --ignore-failed-read: a tracked file deleted in the working tree is skipped.
    git -C "$HVDQ_ROOT" ls-files -z --cached --others --exclude-standard \
        | tar -C "$HVDQ_ROOT" --null -T - --ignore-failed-read -cf - 2>/dev/null | tar -C "$SRC" -xf -
else
    tar -C "$HVDQ_ROOT" --exclude=./.venv --exclude=./runs --exclude=./build --exclude='*.egg-info' \
        --exclude=__pycache__ -cf - . | tar -C "$SRC" -xf -
fi
[ -f "$SRC/setup.cfg" ] && [ -f "$SRC/hvdquant/__init__.py" ] && [ -f "$SRC/kernels/__init__.py" ]

step "pip wheel --no-deps --no-build-isolation"
# setuptools' deprecation banners (license classifiers, ...) are kept in the log, not on the screen.
if ! "$VPY" -m pip wheel -q --no-deps --no-build-isolation --disable-pip-version-check \
        -w "$WORK/dist" "$SRC" >"$WORK/pip-wheel.log" 2>&1; then
    cat "$WORK/pip-wheel.log"
    exit 1
fi
shopt -s nullglob
wheels=("$WORK"/dist/hvdquant-*.whl)
shopt -u nullglob
[ "${#wheels[@]}" -eq 1 ] || { echo "expected one hvdquant wheel, got: ${wheels[*]:-none}"; exit 1; }
WHEEL="${wheels[0]}"
echo "built $(basename "$WHEEL") ($(stat -c %s "$WHEEL") bytes)"

step "wheel contents against the checkout"
"$VPY" launch/wheel_smoke.py contents "$WHEEL" "$SRC"

# ---------------------------------------------------------------- throw-away venv
step "throw-away venv reusing .venv's packages"
TV="$WORK/venv"
"$VPY" -m venv --without-pip "$TV"
TPY="$TV/bin/python"
site_of() { "$1" -c 'import sysconfig; print(sysconfig.get_path("purelib"))'; }
MAIN_SITE="$(site_of "$VPY")"
TV_SITE="$(site_of "$TPY")"
# A .pth line that names a folder appends it to sys.path; .pth files inside that folder are not
# processed, so the editable hvdquant finder (started by .venv's __editable__.hvdquant-*.pth) stays
# off. The other packages' start-up lines (numba-cuda's numba.cuda redirector, setuptools' distutils
# shim) are copied so those packages behave as in .venv; hvdquant's are not.
{
    echo "$MAIN_SITE"
    for pth in "$MAIN_SITE"/*.pth; do
        case "$(basename "$pth")" in *hvdquant*) continue ;; esac
        grep -E '^import[[:space:]]' "$pth" | grep -v -i hvdquant || true
    done
} >"$TV_SITE/00-hvdquant-check-main-venv.pth"
sed 's/^/    /' "$TV_SITE/00-hvdquant-check-main-venv.pth"

step "pip install --no-deps the wheel"
# --ignore-installed: never touch the editable hvdquant that pip sees in .venv's site-packages.
main_hvdquant() { ls -la --time-style=full-iso "$MAIN_SITE" | grep -i hvdquant || true; }
before="$(main_hvdquant)"
"$TPY" -m pip install -q --no-deps --no-index --ignore-installed --disable-pip-version-check "$WHEEL"
[ "$(main_hvdquant)" = "$before" ] || { echo "pip changed the main venv's hvdquant install"; exit 1; }

# ---------------------------------------------------------------- checks, from outside the checkout
RUN="$WORK/run"
mkdir -p "$RUN" "$WORK/home"
cp launch/wheel_smoke.py "$RUN/"
cd "$RUN"
# A fresh HOME: the user-wide Numba cache (~/.cache/numba) starts empty and nothing is left behind.
export HOME="$WORK/home"
unset XDG_CACHE_HOME NUMBA_CACHE_DIR NUMBA_ENABLE_CUDASIM

# Numba compiles the kernels on first use (~15-25 s on 2 cores), once per cache location tested, so the
# first compile runs in the background, overlapping the import-bound checks (imports, --help).
step "DQSG round trip with the installed package's cache folder unwritable (in the background)"
# As root, permissions do not stop writes, so the package's __pycache__ becomes a plain file: Numba
# cannot create its cache there (nor Python its .pyc files) and falls back to ~/.cache/numba.
KDIR="$TV_SITE/hvdquant/kernels"
rm -rf "$KDIR/__pycache__"
touch "$KDIR/__pycache__"
chmod a-w "$KDIR"
"$TPY" wheel_smoke.py roundtrip --cache user >"$WORK/roundtrip-user.log" 2>&1 &
BG=$!

step "imports: hvdquant from the wheel, __all__, every module"
"$TPY" wheel_smoke.py imports --venv "$TV" --main-site "$MAIN_SITE" --checkout "$HVDQ_ROOT"

step "main job --help (module and console script)"
for cmd in "$TPY -m hvdquant.examples.train" "$TV/bin/hvdquant-train"; do
    $cmd --help >"$WORK/help.txt"
    grep -q -- '--max-steps' "$WORK/help.txt" || { cat "$WORK/help.txt"; echo "$cmd --help: no --max-steps"; exit 1; }
done
echo "--help ok (python -m hvdquant.examples.train and hvdquant-train)"

step "DQSG round trip with the installed package's cache folder unwritable (result)"
rc=0
wait "$BG" || rc=$?
BG=""
cat "$WORK/roundtrip-user.log"
[ "$rc" -eq 0 ]

step "DQSG round trip with no writable Numba cache anywhere"
mv "$HOME/.cache/numba" "$WORK/numba-user-cache"
touch "$HOME/.cache/numba"
"$TPY" wheel_smoke.py roundtrip --cache none
rm -f "$HOME/.cache/numba"
mv "$WORK/numba-user-cache" "$HOME/.cache/numba"
chmod u+w "$KDIR"
rm -f "$KDIR/__pycache__"

step "DQSG round trip, Numba cache in the installed package (written, then loaded)"
"$TPY" wheel_smoke.py roundtrip --cache intree
"$TPY" wheel_smoke.py roundtrip --cache intree --hit   # the training ranks below load it too

step "main job: horovodrun -np 2 --gloo, 1 epoch, ${HVDQ_WHEEL_STEPS:=30} steps"
# horovodrun itself runs on the throw-away venv's Python too; each rank runs the wheel's module.
timeout --kill-after=20 "${HVDQ_WHEEL_TRAIN_TIMEOUT:-300}" \
    "$TPY" "$VENV/bin/horovodrun" -np 2 --gloo \
    "$TPY" -m hvdquant.examples.train --epochs 1 --max-steps "$HVDQ_WHEEL_STEPS" \
    --out "$WORK/out"
"$TPY" wheel_smoke.py summary "$WORK/out/train-dqsg.json" --ranks 2 --min-accuracy "${HVDQ_WHEEL_MIN_ACCURACY:-0.3}" \
    | tee "$WORK/train.txt"

step "language-model job: horovodrun -np 2 --gloo, a tiny model for 20 steps"
timeout --kill-after=20 "${HVDQ_WHEEL_TRAIN_TIMEOUT:-300}" \
    "$TPY" "$VENV/bin/horovodrun" -np 2 --gloo \
    "$TPY" -m hvdquant.examples.train --job lm --steps 20 --eval-every 10 --layers 1 --width 64 --heads 2 \
    --context 64 --eval-windows 16 --out "$WORK/out"
"$TPY" wheel_smoke.py summary "$WORK/out/train-lm-dqsg.json" --ranks 2 --max-loss 4.5

NOTE="$(basename "$WHEEL"): contents, imports, DQSG round trip, Numba cache in-tree, user-wide and none, --help, 2-rank training (CNN and LM jobs)"
NOTE="$NOTE: $(sed -n 's/^training ok: 2 ranks, //p' "$WORK/train.txt" | cut -d, -f1)"
STEP="done"
