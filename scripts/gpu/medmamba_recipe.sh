#!/usr/bin/env bash
# Device-tool calls for the `strong` recipe (docs/medmamba.md, "Training recipes"). Runs from a checkout whose
# .carry/med holds this package and .gpu/bench holds breastmnist.npz and the mamba-ssm wheel.
# Usage: bash medmamba_recipe.sh PLAN DEADLINE_S [ablate args]  (PLAN: call1 | final | seeds | ablate); runs still going
# DEADLINE_S seconds after the start are interrupted (their per-epoch history is kept).
# Every run writes to /tmp/runs (checkpoints stay there); $OUT gets bundle.json (configs, histories, metrics,
# summaries of every run, complete or not) and log.txt.
set -o pipefail
plan=$1; deadline=${2:-390}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/bench/mamba_ssm*.whl
export PYTHONPATH=$PWD/.carry/med:/tmp/site PYTHONUNBUFFERED=1
DATA=$PWD/.gpu/bench/breastmnist.npz
# run python from the carried package's folder: `python3 -m` puts the working directory first on sys.path, and
# the checkout's root holds its own (older) nnunet_segmamba
cd .carry/med
R=/tmp/runs; mkdir -p $R $OUT
start=$(date +%s)  # the deadline counts from here
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
python3 -c "import torch, selective_scan_cuda, nnunet_segmamba.classification.recipe as r; print('torch', torch.__version__, 'scan kernel ok', r.__file__)"
run() {  # name, extra args...
  local name=$1; shift
  local left=$(( deadline - ($(date +%s) - start) ))
  [ $left -gt 20 ] || { echo "== $name skipped, $left s left" > $R/$name.log; return; }
  timeout -s INT $left python3 -m nnunet_segmamba.cli classify train --data $DATA --out $R/$name --variant t \
      --image-size 224 --device cuda --quiet "$@" > $R/$name.log 2>&1
  echo "== $name rc=$?" >> $R/$name.log
}
case $plan in
  call1)
    run strong --recipe strong --seeds 0,1,2 &
    (run nobal_s0 --recipe strong --no-balance --seed 0; run noaug_s0 --recipe strong --no-augment --seed 0) &
    wait ;;
  final)
    run strong --recipe strong --seeds 0,1,2 & wait ;;
  seeds)  # the strong recipe on the seeds given as the third argument, e.g. 1,2
    run strong --recipe strong --seeds "$3" & wait ;;
  ablate)
    shift 2; run ablate "$@" & wait ;;
esac
echo "plan $plan wall $(( $(date +%s) - start )) s"
python3 - <<'PY'
import json, os, pathlib
R = pathlib.Path("/tmp/runs"); out = pathlib.Path(os.environ["OUT"])
bundle = {}
for f in sorted(R.rglob("*.json")):
    bundle[str(f.relative_to(R))] = json.loads(f.read_text())
(out / "bundle.json").write_text(json.dumps(bundle))
logs = []
for f in sorted(R.rglob("*.log")) + sorted(R.rglob("summary.txt")):
    lines = [l for l in f.read_text().replace("\r", "\n").splitlines() if l.strip() and "it/s]" not in l]
    logs.append(f"#### {f.relative_to(R)}\n" + "\n".join(lines[-40:]))
(out / "log.txt").write_text("\n\n".join(logs) + "\n")
print("\n\n".join(logs)[-6000:])
PY
