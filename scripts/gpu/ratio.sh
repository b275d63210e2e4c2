#!/usr/bin/env bash
# The training-step target's ratio in one command: SegMamba as the trainers run it against nnU-Net's compiled
# ResEnc-M as its trainer runs it, each in a process of its own, since the two trainers set cuDNN's search apart
# (ours times every algorithm, `cudnn_benchmark_limit = 0`; nnU-Net's torch's first 10) and cuDNN keeps its choices
# for a process's lifetime.
#
#   bash scripts/gpu/ratio.sh [OUT]
#
# Run from the repository root on a CUDA machine (about 5 minutes on a fresh H100: the compile, then the search's
# two minutes in SegMamba's first step). OUT (default runs/gpu/ratio) receives segmamba.json, peer.json, their logs
# and ratio.json (both medians and their ratio), and the ratio is printed.
#
# Environment: NETWORK (default the trainers' network, segmamba_cl_recompute_compiled_cg[triton]), LIMIT (its
# cuDNN limit, default 0 as the trainers), PEER (default resenc_m_compiled), ARGS (the benchmark's options for
# both; default the 128^3 step: --no-inference --warmup 3 --iters 10), DEVICE (default cuda), WHEELS and SITE as
# in scripts/gpu/setup.sh.
set -o pipefail
source scripts/gpu/setup.sh -- $WHEELS >/dev/null
OUT=${1:-${OUT:-runs/gpu/ratio}}; mkdir -p "$OUT"
NETWORK=${NETWORK:-segmamba_cl_recompute_compiled_cg[triton]}
PEER=${PEER:-resenc_m_compiled}
ARGS=${ARGS:---no-inference --warmup 3 --iters 10}
bench() {  # name, networks, extra options...
    local name=$1 networks=$2; shift 2
    if ! python3 -m nnunet_segmamba.cli benchmark --device "${DEVICE:-cuda}" $ARGS "$@" --networks "$networks" \
            --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1; then
        echo "ratio.sh: the $name run failed, see $OUT/$name.log" >&2
        exit 1
    fi
    grep "ms/step" "$OUT/$name.log"
}
bench segmamba "$NETWORK" --cudnn-benchmark-limit "${LIMIT:-0}"
bench peer "$PEER"
python3 - "$OUT" "$NETWORK" "$PEER" <<'PY'
import json, pathlib, sys

out, network, peer = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
steps = {}
for name, key in (("segmamba", network), ("peer", peer)):
    report = json.loads((out / f"{name}.json").read_text())
    train = report["networks"][key]["train"]
    if not isinstance(train, dict) or "ms_median" not in train:
        sys.exit(f"ratio.sh: {key} has no training step time in {out / name}.json: {train}")
    steps[key] = {"ms_median": train["ms_median"], "ms_min": train["ms_min"], "ms_max": train["ms_max"],
                  "cudnn_benchmark_limit": report["settings"]["cudnn_benchmark_limit"], "gpu": report["gpu"]}
ratio = steps[network]["ms_median"] / steps[peer]["ms_median"]
(out / "ratio.json").write_text(json.dumps({"steps": steps, "ratio": ratio}, indent=2) + "\n")
print(f"{network} {steps[network]['ms_median']:.1f} ms / {peer} {steps[peer]['ms_median']:.1f} ms = {ratio:.2f}x "
      f"(target: 2x, {2 * steps[peer]['ms_median']:.1f} ms)")
PY
