# Environment for the scripts in scripts/gpu/, on any machine with a CUDA GPU and a Python that has torch.
#
#   source scripts/gpu/setup.sh [--] [WHEEL_DIR ...]
#
# Run from the repository root. Installs every wheel of all WHEEL_DIRs in one go (offline: --no-index --no-deps)
# into $SITE, once per set of wheel files, then puts the repository and $SITE first on PYTHONPATH and $SITE/bin on
# PATH, and prints which optional pieces import. Use wheel folders where the machine cannot reach a package
# index (nnunetv2 and its dependencies, mamba-ssm, monai built for that machine's Python, torch and CUDA); with
# no WHEEL_DIR it only sets the paths, for an environment where `pip install ".[cuda,test]"` already ran.
#
#   SITE   install target for the wheels (default: ${TMPDIR:-/tmp}/nnunet-segmamba-site)
#
# The other scripts call it as `source scripts/gpu/setup.sh -- $WHEELS`, so `WHEELS="DIR1 DIR2" bash
# scripts/gpu/<script>.sh ...` installs those folders first.
[ "${1:-}" = "--" ] && shift
SITE=${SITE:-${TMPDIR:-/tmp}/nnunet-segmamba-site}
export PYTHONNOUSERSITE=1 PYTHONUNBUFFERED=1
wheels=()
for wheel_dir in "$@"; do
    if ! ls "$wheel_dir"/*.whl >/dev/null 2>&1; then
        echo "setup.sh: no wheels in $wheel_dir" >&2
        continue
    fi
    wheels+=("$wheel_dir"/*.whl)
done
# All folders in one pip call: `pip install --target --upgrade` replaces every top-level folder a later call also
# writes, bin/ among them, so a second call would drop the first one's commands (nnUNetv2_train, ...).
if [ ${#wheels[@]} -gt 0 ]; then
    stamp="$SITE/.installed-$(printf '%s\n' "${wheels[@]}" | xargs -n1 basename | sort | sha256sum | cut -c1-16)"
    if [ ! -f "$stamp" ]; then
        mkdir -p "$SITE"
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" "${wheels[@]}" && touch "$stamp"
    fi
fi
export PYTHONPATH="$PWD${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$SITE/bin:$PATH"
python3 - <<'PY'
import importlib.util as u
print("importable:", {m: bool(u.find_spec(m)) for m in
                      ("torch", "triton", "nnunetv2", "SimpleITK", "monai", "selective_scan_cuda", "causal_conv1d")})
PY
