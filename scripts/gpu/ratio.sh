#!/usr/bin/env bash
# The training-step target's ratio in one command: SegMamba as the trainers run it against nnU-Net's compiled
# ResEnc-M as its trainer runs it, each in a process of its own, since the two trainers set cuDNN's search apart
# (ours times every algorithm, `cudnn_benchmark_limit = 0`; nnU-Net's torch's first 10) and cuDNN keeps its choices
# for a process's lifetime. The peer runs before and after SegMamba (a process each): its median has moved by
# 1.8 ms between consecutive calls on one machine, and the two runs show how far it moves within the call. The
# ratio is SegMamba's median over the mean of the peer's two medians.
#
#   bash scripts/gpu/ratio.sh [OUT]
#
# Run from the repository root on a CUDA machine (about 5 minutes on a fresh H100: the compile, then the search's
# two minutes in SegMamba's first step; the peer's second run takes under a minute). OUT (default runs/gpu/ratio)
# receives peer_before.json, segmamba.json, peer.json (the run after), their logs and ratio.json (the medians and
# the ratio), and the ratio is printed.
#
# Environment: NETWORK (default the trainers' network, segmamba_cl_recompute_compiled_cg[triton]), LIMIT (its
# cuDNN limit, default 0 as the trainers), PEER (default resenc_m_compiled), PEER_BEFORE (default 1; 0 runs the
# peer after SegMamba only), ARGS (the benchmark's options for all runs; default the 128^3 step: --no-inference
# --warmup 3 --iters 10), DEVICE (default cuda), WHEELS and SITE as in scripts/gpu/setup.sh.
set -o pipefail
source scripts/gpu/setup.sh -- $WHEELS >/dev/null
OUT=${1:-${OUT:-runs/gpu/ratio}}; mkdir -p "$OUT"
NETWORK=${NETWORK:-segmamba_cl_recompute_compiled_cg[triton]}
PEER=${PEER:-resenc_m_compiled}
ARGS=${ARGS:---no-inference --warmup 3 --iters 10}
rm -f "$OUT/peer_before.json" "$OUT/peer_before.log"
bench() {  # name, networks, extra options...
    local name=$1 networks=$2; shift 2
    if ! python3 -m nnunet_segmamba.cli benchmark --device "${DEVICE:-cuda}" $ARGS "$@" --networks "$networks" \
            --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1; then
        echo "ratio.sh: the $name run failed, see $OUT/$name.log" >&2
        exit 1
    fi
    grep "ms/step" "$OUT/$name.log" | sed "s/^/$name: /"
}
[ "${PEER_BEFORE:-1}" = 0 ] || bench peer_before "$PEER"
bench segmamba "$NETWORK" --cudnn-benchmark-limit "${LIMIT:-0}"
bench peer "$PEER"
python3 - "$OUT" "$NETWORK" "$PEER" <<'PY'
import json, pathlib, sys

out, network, peer = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
runs = {}
for name, key in (("peer_before", peer), ("segmamba", network), ("peer", peer)):
    path = out / f"{name}.json"
    if not path.exists():
        continue
    report = json.loads(path.read_text())
    train = report["networks"][key]["train"]
    if not isinstance(train, dict) or "ms_median" not in train:
        sys.exit(f"ratio.sh: {key} has no training step time in {path}: {train}")
    runs[name] = {"network": key, "ms_median": train["ms_median"], "ms_min": train["ms_min"],
                  "ms_max": train["ms_max"], "cudnn_benchmark_limit": report["settings"]["cudnn_benchmark_limit"],
                  "gpu": report["gpu"]}
peer_ms = {name: runs[name]["ms_median"] for name in ("peer_before", "peer") if name in runs}
step = runs["segmamba"]["ms_median"]
peer_mean = sum(peer_ms.values()) / len(peer_ms)
ratio = step / peer_mean
ratio_each = {name: step / ms for name, ms in peer_ms.items()}
(out / "ratio.json").write_text(json.dumps({"runs": runs, "peer_ms_mean": peer_mean, "ratio": ratio,
                                            "ratio_each": ratio_each}, indent=2) + "\n")
each = " / ".join(f"{ms:.1f}" for ms in peer_ms.values())
print(f"{network} {step:.1f} ms / {peer} {peer_mean:.1f} ms (runs: {each}) = {ratio:.3f}x "
      f"(each: {', '.join(f'{r:.3f}x' for r in ratio_each.values())}; target: 2x, {2 * peer_mean:.1f} ms)")
PY
