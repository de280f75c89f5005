# Sourced by the device-tool scripts (device_ab.sh, device_route.sh) on the lent machine: the
# carried wheels (.whl/) and this tree as it installs (pagemesh.services, pagemesh.kernels, ...)
# go on PYTHONPATH, and the device and versions are written to $OUT/device.txt.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --target /tmp/pm . || exit 1
rm -rf build
export PYTHONPATH=/tmp/pm:/tmp/site
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/device.txt"
