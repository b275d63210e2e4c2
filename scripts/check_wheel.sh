#!/usr/bin/env bash
# The install a user makes, checked: build a wheel from this checkout, install it without -e into a fresh virtual
# environment (dependencies resolved from the wheel's metadata, torch pinned as in constraints-cpu.txt), then,
# from a folder outside the checkout, run `nnunet-segmamba doctor` and nnU-Net's own trainer lookup through
# `nnunet-segmamba env`. Exit code 0 when all of that works.
#
#   bash scripts/check_wheel.sh [WORK_DIR]      # WORK_DIR (default: a new temporary folder) is removed after
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}
work=${1:-$(mktemp -d)}
mkdir -p "$work"
trap 'rm -rf "$work"' EXIT

echo "[check_wheel] building the wheel ..."
# from a copy of the tracked files: setuptools would leave build/ and *.egg-info in the checkout
mkdir -p "$work/src"
(cd "$root" && git ls-files -z | xargs -0 cp --parents -t "$work/src")
"$python" -m pip wheel -q --no-deps -w "$work/dist" "$work/src" 2> >(grep -v "^WARNING: Location" >&2)
wheel=$(ls "$work"/dist/nnunet_segmamba-*.whl)
echo "[check_wheel] $(basename "$wheel"); installing into a fresh environment (about 2 minutes) ..."
"$python" -m venv "$work/venv"
# pip warns about the index locations of a machine-wide pip.conf that do not exist here; only errors matter
"$work/venv/bin/python" -m pip install -q -c "$root/constraints-cpu.txt" torch torchvision 2> >(grep -v "^WARNING: Location" >&2)
"$work/venv/bin/python" -m pip install -q -c "$root/constraints-cpu.txt" "$wheel" 2> >(grep -v "^WARNING: Location" >&2)

cd "$work"  # nothing of the checkout on sys.path from here on
bin="$work/venv/bin"
"$bin/python" - "$root" <<'PY'
import sys
from pathlib import Path
import nnunet_segmamba
location = Path(nnunet_segmamba.__file__).resolve()
assert Path(sys.argv[1]).resolve() not in location.parents, f"imported from the checkout: {location}"
print(f"[check_wheel] nnunet_segmamba imported from {location.parent}")
PY
"$bin/nnunet-segmamba" doctor
eval "$("$bin/nnunet-segmamba" env)"
"$bin/python" - <<'PY'
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
import contextlib, io
for name in ("nnUNetTrainerSegMamba", "nnUNetTrainerSegMambaCE_5epochs", "nnUNetTrainerMedMamba"):
    with contextlib.redirect_stdout(io.StringIO()):  # the lookup narrates every folder it searches
        cls = recursive_find_trainer_class_by_name(name)
    assert cls.__name__ == name, cls
print("[check_wheel] nnU-Net's trainer lookup finds the SegMamba trainers in the installed package")
PY
echo "[check_wheel] ok"
