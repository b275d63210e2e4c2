#!/usr/bin/env bash
# One entry point for developers and CI: creates the virtual environment on first use (and again whenever
# setup.cfg or the pins change), then runs the demo or the tests.
#
#   bash scripts/dev.sh demo [demo options]   # the end-to-end demo on a synthetic BraTS-like dataset
#   bash scripts/dev.sh test [pytest options] # the test suite (CPU only)
#   bash scripts/dev.sh setup                 # only (re)create the environment
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${NNUNET_SEGMAMBA_VENV:-$root/.venv}
python=${PYTHON:-python3}

stamp_wanted=$(cat "$root/setup.cfg" "$root/constraints-cpu.txt" | sha256sum | cut -c1-16)
stamp_file="$venv/.nnunet_segmamba_stamp"

setup() {
    if [ -x "$venv/bin/python" ] && [ "$(cat "$stamp_file" 2>/dev/null)" = "$stamp_wanted" ]; then
        return 0
    fi
    echo "[dev.sh] creating the environment in $venv (about 2 minutes) ..."
    "$python" -m venv --clear "$venv"  # --clear: nothing of an older environment stays behind
    # torch first, pinned together with its torchvision (constraints-cpu.txt says why)
    "$venv/bin/python" -m pip install -q -c "$root/constraints-cpu.txt" torch torchvision
    "$venv/bin/python" -m pip install -q -c "$root/constraints-cpu.txt" -e "$root[test]"
    echo "$stamp_wanted" > "$stamp_file"
    echo "[dev.sh] environment ready"
}

cmd=${1:-test}
shift || true
case "$cmd" in
    setup) setup ;;
    test)
        setup
        cd "$root"
        exec "$venv/bin/python" -m pytest -q "$@"
        ;;
    demo)
        setup
        exec "$venv/bin/nnunet-segmamba" demo "$@"
        ;;
    *)
        echo "usage: bash scripts/dev.sh {demo|test|setup} [args]" >&2
        exit 2
        ;;
esac
