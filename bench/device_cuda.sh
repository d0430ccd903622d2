#!/usr/bin/env bash
# The CUDA table of bench/RESULTS.md, on a GPU machine whose Python has torch but not this
# project's other dependencies (the workplace's lent device: see bench/RESULTS.md, "CUDA").
#
#   bash bench/device_cuda.sh [tests|bench|all] [METHODS...]     (default: all, every method)
#
# 1. installs wheels carried in .whl/ (pydantic & co.; the lent machine cannot reach PyPI);
# 2. runs the merge-core and evaluation tests, which run on CUDA there (device `auto`), conformance
#    included when SUBMERGE_GOLDEN_DIR points at a copy of ../shared/golden;
# 3. writes the 12-block × 8-expert synthetic checkpoints (with ESM calibration) and times one merge
#    per method on CUDA, each in its own process (bench/timed_merge.py).
# Output goes to stdout and, when $OUT is set, to $OUT/device_cuda.log.
#
# What travels with it, prepared here once (both folders git-ignored through .git/info/exclude):
#   printf '/.whl/\n/.dev_golden/\n' >> .git/info/exclude
#   .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl pydantic pydantic_core annotated-types \
#     typing-inspection typing_extensions scipy-openblas32    # the versions .venv has
#   cp -r ../shared/golden .dev_golden
# then, through the device tool with carry [".whl", ".dev_golden"]:
#   SUBMERGE_GOLDEN_DIR=$PWD/.dev_golden bash bench/device_cuda.sh all
set -uo pipefail
what=${1:-all}
case $what in tests|bench|all) ;; *) echo "first argument: tests, bench or all (got '$what')" >&2; exit 2;; esac
shift || true
cd "$(dirname "$0")/.."
log=${OUT:-/tmp}/device_cuda.log
exec > >(tee "$log") 2>&1
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

methods=("$@")
[ ${#methods[@]} -eq 0 ] && methods=(weight_average task_arithmetic ties tsv_m iso_c iso_cts esm)

if [ "$what" != bench ]; then
  echo "== merge-core and evaluation tests (device auto = CUDA here)"
  python3 -m pytest -q -p no:cacheprovider tests/test_conformance.py tests/test_methods_reference.py \
    tests/test_methods_baselines.py tests/test_engine.py tests/test_finite_checks.py \
    tests/test_diagnostics.py tests/test_bad_inputs.py tests/test_lapack.py tests/test_alpha.py \
    tests/test_evaluators.py tests/test_eval_models.py tests/test_eval_data.py
fi
[ "$what" = tests ] && exit 0

echo "== synthetic checkpoints"
t0=$(date +%s)
python3 bench/make_synthetic.py --blocks 12 --experts 8 --calibration > /dev/null || exit 1
echo "written in $(( $(date +%s) - t0 )) s"
data=bench/.cache/synthetic/vitb16_b12_s0

echo "== CUDA, diagnostics off"
for m in "${methods[@]}"; do python3 bench/timed_merge.py "$data" "$m" off cuda; done
echo "== CUDA, diagnostics sampled (the default)"
for m in tsv_m iso_c iso_cts; do python3 bench/timed_merge.py "$data" "$m" sampled cuda; done
