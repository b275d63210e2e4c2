#!/usr/bin/env bash
# A/B of a training step: the working tree against other versions of the package, in one call on one machine.
#
#   bash scripts/gpu/step_ab.sh VERSION [VERSION ...]
#
# VERSION is a git revision (its nnunet_segmamba/ and benchmarks/ are extracted with `git archive`) or a directory
# that holds a copy of nnunet_segmamba/ (for a machine without the repository's history: make it elsewhere with
# `mkdir -p DIR && git archive REV nnunet_segmamba benchmarks | tar -x -C DIR`). Each version runs
# `nnunet-segmamba benchmark` from its own directory: Python puts the current directory first on sys.path, ahead
# of PYTHONPATH, so a copy named only on PYTHONPATH would still import the working tree's package. The versions
# alternate within each round, so that a drift of the machine's speed shows up as rounds that disagree rather than
# as a difference between versions. Prints one line per run and a table of the medians; writes step_ab.json (the
# table) and one benchmark JSON and log per run into OUT.
#
# Environment: NETWORKS (default the trainers' network at the hippocampus patch,
# segmamba_cl_keep_compiled_cg[triton]: below 2^21 voxels per batch they recompute neither the Mamba branches nor
# the conv blocks), ARGS (the benchmark's options; default the hippocampus patch: batch 7, 1 x 48 x 64 x 48 -> 3,
# 5 + 20 steps, no inference), DEVICE (default cuda), ROUNDS (default 2), OUT (default runs/gpu/step_ab), WHEELS and
# SITE as in scripts/gpu/setup.sh.
set -o pipefail
source scripts/gpu/setup.sh -- $WHEELS >/dev/null
OUT=${OUT:-runs/gpu/step_ab}; mkdir -p "$OUT"; res=$(cd "$OUT" && pwd)
trees=$res/trees; rm -rf "$trees"; mkdir -p "$trees"
NETWORKS=${NETWORKS:-segmamba_cl_keep_compiled_cg[triton]}
ARGS=${ARGS:---no-inference --warmup 5 --iters 20 --batch 7 --patch 48,64,48 --in-channels 1 --out-channels 3}
names=(tree); dirs=("$PWD")
for version in "$@"; do
    name=$(basename "$version" | tr -c 'A-Za-z0-9._\n-' '_')
    if [ -d "$version/nnunet_segmamba" ]; then
        dir=$(cd "$version" && pwd)
    else
        dir=$trees/$name; mkdir -p "$dir"
        if ! git archive "$version" nnunet_segmamba benchmarks 2>/dev/null | tar -x -C "$dir"; then
            echo "step_ab.sh: $version is neither a directory holding nnunet_segmamba/ nor a git revision here" >&2
            exit 2
        fi
    fi
    names+=("$name"); dirs+=("$dir")
done
for round in $(seq "${ROUNDS:-2}"); do
    for i in "${!names[@]}"; do
        run=step_${names[$i]}_$round
        if (cd "${dirs[$i]}" && python3 -m nnunet_segmamba.cli benchmark --device "${DEVICE:-cuda}" $ARGS \
                --networks "$NETWORKS" --out "$res/$run.json" > "$res/$run.log" 2>&1); then
            grep "ms/step" "$res/$run.log" | sed "s/^/${names[$i]}, round $round: /"
        else
            echo "step_ab.sh: ${names[$i]} failed in round $round, see $res/$run.log" >&2
        fi
    done
done
python3 - "$res" "${ROUNDS:-2}" "${names[@]}" <<'PY'
import json, pathlib, sys

res, rounds, names = pathlib.Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
table = {}
for name in names:
    # this call's runs only, in round order: a glob would also match another version whose name extends this one
    # and files left in OUT by an earlier call
    for path in (res / f"step_{name}_{r}.json" for r in range(1, rounds + 1)):
        if not path.is_file():  # the run failed (reported above)
            continue
        for network, result in json.loads(path.read_text())["networks"].items():
            ms = (result.get("train") or {}).get("ms_median")
            table.setdefault(network, {}).setdefault(name, []).append(ms)
print("\n| network | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
for network, by_version in table.items():
    cells = [" / ".join(f"{ms:.2f}" if ms is not None else "-" for ms in by_version.get(name, [])) for name in names]
    print(f"| {network} | " + " | ".join(cells) + " |")
print("\nms per step, median of the timed steps, one entry per round")
(res / "step_ab.json").write_text(json.dumps({"versions": names, "train_ms_median": table}, indent=2))
PY
