# Sourced at the start of every device-tool command (see docs/benchmarks.md): installs the carried wheels once
# per machine into /root/gpusite and puts them, the repo and nnU-Net's console scripts on the paths.
# .gpu/nn: nnU-Net and its pure-Python dependencies (+ SimpleITK, blosc2); .gpu/kern: mamba-ssm, monai, data;
# .gpu/bench: mamba-ssm, monai, dynamic-network-architectures, BreastMNIST (benchmarks and MedMNIST runs).
export PYTHONNOUSERSITE=1 PYTHONUNBUFFERED=1
for group in nn nn2 kern bench; do
    if [ -d ".gpu/$group" ] && ls .gpu/$group/*.whl >/dev/null 2>&1 && [ ! -f "/root/gpusite/.$group" ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /root/gpusite .gpu/$group/*.whl && touch "/root/gpusite/.$group"
    fi
done
export PYTHONPATH="$PWD:/root/gpusite${PYTHONPATH:+:$PYTHONPATH}"
export PATH="/root/gpusite/bin:$PATH"
python3 - <<'PY'
import importlib.util as u
print("gpusite:", {m: bool(u.find_spec(m)) for m in ("nnunetv2", "SimpleITK", "selective_scan_cuda", "monai")})
PY
