#!/usr/bin/env bash
# The GPU checks in one file (about 9 minutes at most): the CUDA tests, benchmarks/update.py and
# benchmarks/gpu.py. Run from the repository root on the GPU box:
#
#   bash benchmarks/gpu_device_run.sh
#
# The box needs torch with CUDA, pytest, numpy, scipy, pandas, matplotlib, scikit-learn, statsmodels, tqdm,
# safetensors, xarray and h5py. Where it lacks the other dependencies (pyro-ppl, arviz, nibabel, nilearn,
# monai, pydantic; zlib-ng for the fast gzip of data/gz.py) and cannot reach a package index, build wheels
# of them (and of their own dependencies the box lacks) on a machine with network access, for the box's
# Python version and platform, e.g.
#   pip download -d .whl --only-binary=:all: --python-version 3.X --platform manylinux2014_x86_64 --no-deps PKG...
# and copy the .whl folder into the repository root on the box: this script installs them from there.
# Logs and the benchmark JSON go under $OUT (/tmp/gpu_out when unset): env.txt, tests.log, update.log,
# bench.log, gpu.json.
# Budget: install ~10 s, tests <= 180 s (148 s on a loaded 2-core CPU machine with cuda -> cpu), benchmark
# <= 340 s (its sections stop themselves at ~320 s).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
# The checkout's own code, not the inva_pyro wheel (which may predate the checkout): presets come from models/.
rm -rf /tmp/site/inva_pyro /tmp/site/inva_pyro-*.dist-info
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{
  nvidia-smi -L
  python3 -c "import sys, torch, pyro; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| available', torch.cuda.is_available(), '| pyro', pyro.__version__)"
  python3 -c "import importlib.util, inva_pyro, os; print('inva_pyro from', os.path.dirname(inva_pyro.__file__), '| gzip by', 'zlib-ng' if importlib.util.find_spec('zlib_ng') else 'zlib')"
} 2>&1 | tee "$OUT/env.txt"
# GPU_TESTS / GPU_SECTIONS / GPU_BUDGET_SCALE narrow a rerun (defaults: everything).
timeout 180 python3 -m pytest -q -p no:cacheprovider ${GPU_TESTS:-tests/test_device.py tests/test_graphs.py tests/test_gpu.py} 2>&1 | tee "$OUT/tests.log"
echo "tests exit: ${PIPESTATUS[0]}" | tee -a "$OUT/tests.log"
# the update alone (clipping and guard in fused AdamW against the passes before): a few seconds
timeout 60 python3 benchmarks/update.py --device cuda --features 65536,230000 2>&1 | tee "$OUT/update.log"
timeout 340 python3 benchmarks/gpu.py --device cuda --budget-scale ${GPU_BUDGET_SCALE:-0.7} --sections ${GPU_SECTIONS:-demo_fit,svi_step,stream_epoch,predictive} --tmp /tmp --out "$OUT/gpu.json" 2>&1 | tee "$OUT/bench.log"
echo "benchmark exit: ${PIPESTATUS[0]}" | tee -a "$OUT/bench.log"
