#!/usr/bin/env bash
# Everything vitfast checks on a GPU, in one command for the GPU machine (nothing downloadable there):
#
#   benchmarks/gpu_suite.sh [OUT_DIR]        # default OUT_DIR: ./gpu-results
#
# Steps: install this checkout without the network (plus any wheels carried in .whl/, such as
# open_clip, which the GPU image lacks), print the GPU, the GPU parity tests (pytest -m gpu),
# `python -m vitfast check`, one compute-sanitizer memcheck pass over a small optimized forward, the
# rest of the test suite on CUDA (bf16 included), a kernel-by-kernel profile of ViT-B with the
# registers, spills and shared memory of each kernel config that ran, the kernel
# benchmarks (pytest-benchmark) and `python -m vitfast bench` over ViT-B/S/L at batch 1, 32 and 256,
# with ViT-B's training step (forward + backward under bf16 autocast, fp32 parameters) at batch 128
# right after ViT-B's inference rows, in the same result files and under the same --budget.
# The whole run stays under 9 minutes: each step has a timeout, capped by what the overall budget
# (VITFAST_SUITE_BUDGET seconds, default 520) leaves, and the steps before the bench leave it
# BENCH_RESERVE seconds. A step past its timeout gets SIGINT first, so pytest still prints what
# failed so far. The test steps run on pytest-xdist workers where it is installed (the image has
# it): compiling each kernel variant is what takes the time there, one process compiles serially.
# torch.compile runs in mode "default" (VITFAST_COMPILE_MODE to change it): max-autotune over three
# models does not fit the budget.
#
# VITFAST_SUITE_STEPS="gpu-tests check tests" (say) runs only the steps named, besides the setup
# (gpu-info, versions, install, wheels): one session's GPU time does not fit the whole test suite and
# the bench together (2026-11-27, H100: about a fifth of the tests ran in 110 s on 12 workers).
# The tests step takes whatever the budget leaves it. Each failing test's report goes to
# OUT_DIR/failures.log the moment it fails, so a step cut short still names its failures.
#
# OUT_DIR receives at most eight files (what the device tool returns): suite.log (every step's
# output, then a summary of exit codes), failures.log, kernels.json, kernels-rope-glu.json,
# shapes.json (the gemm-sites and attention-shapes steps, one section each), and the bench's
# <gpu>-<date>.json/.csv/.png.
# A failing step does not stop the suite; the exit status is non-zero when any step failed.
set -uo pipefail

out="${1:-gpu-results}"
mkdir -p "$out" && out="$(cd "$out" && pwd)"
cd "$(dirname "$0")/.." || exit 1
log="$out/suite.log"
: >"$log"
budget="${VITFAST_SUITE_BUDGET:-520}"
bench_reserve=195
compile_mode="${VITFAST_COMPILE_MODE:-default}"
py="${PYTHON:-$(command -v python || command -v python3)}"
unset TRITON_INTERPRET  # compiled kernels on the GPU; the interpreter is for CPU machines only
# One Triton cache for every step: torch.compile (the bench's timm-compile row) points TRITON_CACHE_DIR
# at its own folder when it is unset, and the vitfast rows after it then missed what warm_cache.py
# had compiled (first calls of 35-58 s on 2026-11-27).
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-${HOME:-/root}/.triton/cache}"
export VITFAST_FAILURE_LOG="$out/failures.log"  # read by tests/conftest.py
: >"$VITFAST_FAILURE_LOG"
selected="${VITFAST_SUITE_STEPS:-all}"
chosen() { [[ $selected == all || " $selected " == *" $1 "* || $1 =~ ^(gpu-info|versions|install|wheels)$ ]]; }
chosen bench || bench_reserve=0
steps="gpu-tests check memcheck warm profile gemm-sites attention-shapes kernel-benchmarks kernel-benchmarks-rope-glu tests bench"
for s in $selected; do  # a misspelt name would otherwise run nothing and pass
    [[ $s == all || " $steps " == *" $s "* ]] || { echo "VITFAST_SUITE_STEPS: no step '$s' (steps: $steps)"; exit 2; }
done
start=$SECONDS
names=()
codes=()

say() { echo "$*" | tee -a "$log"; }

# step NAME LIMIT_S CMD...: run CMD under a timeout that the remaining budget caps, output logged.
step() {
    local name=$1 limit=$2
    shift 2
    if ! chosen "$name"; then
        names+=("$name")
        codes+=("-")
        return
    fi
    local left=$((budget - (SECONDS - start)))
    [[ $name == bench ]] || left=$((left - bench_reserve))
    ((limit > left)) && limit=$left
    if ((limit < 10)); then
        say "== $name: not run, the suite's time budget is spent"
        names+=("$name")
        codes+=(124)
        return
    fi
    say "== [$((SECONDS - start)) s] $name (timeout ${limit} s): $*"
    timeout --signal=INT --kill-after=20 "$limit" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    ((rc == 124 || rc == 137)) && say "== $name: timed out"
    say "== $name: exit $rc at $((SECONDS - start)) s"
    names+=("$name")
    codes+=("$rc")
}

step gpu-info 30 nvidia-smi
step versions 60 "$py" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"

# The editable install needs only setuptools, which the image has; it maps kernels/ to vitfast.kernels.
step install 120 "$py" -m pip install --no-deps --no-build-isolation -e .
if ! "$py" -c "import vitfast.kernels" >>"$log" 2>&1; then
    # A plain PYTHONPATH cannot map kernels/ to vitfast.kernels, so a link inside the package does.
    say "== install: vitfast.kernels does not import; falling back to PYTHONPATH=$PWD with vitfast/kernels -> ../kernels"
    [[ -e vitfast/kernels ]] || ln -s ../kernels vitfast/kernels
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    "$py" -c "import vitfast.kernels" >>"$log" 2>&1
    codes[${#codes[@]} - 1]=$?
fi

# Packages the image lacks (open_clip, for its tests) travel as wheels in .whl/ (the device tool's
# README says how to fetch them), installed into a folder of their own; being on PYTHONPATH, they win
# over the image's copy of the same package, so carry only what the image lacks.
if compgen -G ".whl/*.whl" >/dev/null; then
    step wheels 60 "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target /tmp/vitfast-wheels .whl/*.whl
    export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}/tmp/vitfast-wheels"
fi

# Each kernel launches the one config its rule picks (kernels/_configs.py): a new test shape costs one
# compile per kernel variant, no autotuning. No -x: one GPU run should show every failure it can.
workers=()
"$py" -c "import xdist" 2>/dev/null && workers=(-n "${VITFAST_TEST_WORKERS:-15}")
step gpu-tests 90 "$py" -m pytest -q -m gpu "${workers[@]}" tests
step check 60 "$py" -m vitfast check

sanitizer="$(command -v compute-sanitizer || true)"
for dir in /usr/local/cuda/bin /usr/local/cuda-*/bin; do
    [[ -z $sanitizer && -x $dir/compute-sanitizer ]] && sanitizer="$dir/compute-sanitizer"
done
if [[ -n $sanitizer ]]; then
    # Without PyTorch's caching allocator an out-of-bounds access cannot hide inside a pooled block.
    step memcheck 40 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool memcheck --error-exitcode 1 \
        "$py" benchmarks/memcheck_forward.py
elif chosen memcheck; then
    say "== memcheck: skipped, compute-sanitizer is neither on PATH nor in /usr/local/cuda*/bin"
    names+=("memcheck (skipped)")
    codes+=(0)
fi

# warm_cache.py compiles the kernels of ViT-B's forward at each batch size on every core at once
# (vitfast.compile_ahead) into the disk cache, so the profile and the bench do not wait for them.
step warm 40 "$py" benchmarks/warm_cache.py --model vit_base --batch 1 64 256

# Which kernels the time goes to, vitfast against the reference eager, and the registers, spills and
# shared memory of each config that ran (for benchmarks/NOTES.md).
step profile 45 "$py" benchmarks/profile_vit.py --batch 64 --baseline --rows 15 --kernel-stats

# Each ViT-B and ViT-L GEMM site at batch 1, 32 and 256: every config of the descriptor kernel, the pointer
# kernel, cuBLAS alone and cuBLAS plus the epilogue's kernel (issue 31). 120 s within the whole suite (the
# rows it reaches are kept); selected on its own (VITFAST_SUITE_STEPS=gemm-sites) it gets 300 s.
gemm_limit=120
[[ $selected == gemm-sites ]] && gemm_limit=300
step gemm-sites "$gemm_limit" "$py" benchmarks/gemm_sites.py --json "$out/shapes.json" --section gemm_sites \
    --budget $((gemm_limit - 40))

# Each ViT attention shape (ViT-S/B/L, ViT-L/14, ViT-B/16 at 384, EVA02-B with RoPE, SigLIP-So400m) at
# batch 1, 32 and 256: the resident-K/V forward's candidates, the general kernel and SDPA's flash, cuDNN
# and memory-efficient backends, beside the traffic bound (issue 32). 90 s within the whole suite;
# selected on its own (VITFAST_SUITE_STEPS=attention-shapes) it gets 180 s.
attention_limit=90
[[ $selected == attention-shapes ]] && attention_limit=180
step attention-shapes "$attention_limit" "$py" benchmarks/attention_shapes.py --json "$out/shapes.json" \
    --section attention_shapes --budget $((attention_limit - 30))

# pytest exits 5 when it collects nothing; that is no failure of the suite (a -k selection may empty it).
# The benchmarks of the rotary attention, short-query attention and gated GEMM (issue 16) run in a step
# of their own: pytest-benchmark writes its JSON only at the end, so a step cut short by its timeout
# would otherwise lose the older kernels' results too.
new_kernels=(benchmarks/test_bench_attention_rope.py benchmarks/test_bench_attention_cross.py
             benchmarks/test_bench_gated_linear.py)
step kernel-benchmarks 90 bash -c '"$1" -m pytest benchmarks/ -q --benchmark-json="$2" --benchmark-max-time=0.25 \
    "${@:3}"; rc=$?; if ((rc == 5)); then echo "no kernel benchmarks collected"; exit 0; fi; exit $rc' \
    _ "$py" "$out/kernels.json" "${new_kernels[@]/#/--ignore=}"
step kernel-benchmarks-rope-glu 60 "$py" -m pytest -q --benchmark-json="$out/kernels-rope-glu.json" \
    --benchmark-max-time=0.25 "${new_kernels[@]}"

# The rest of the test suite, last before the bench: it takes whatever the budget leaves (the whole
# suite needs more than one session's GPU time alongside the other steps; select it on its own).
step tests 600 "$py" -m pytest -q -m "not gpu" "${workers[@]}" --maxfail=150 tests

# The training row (issue 13's target: ViT-B bf16 batch 128) comes after ViT-B's inference rows and before
# ViT-S/L's, so that the budget, which ViT-S/L already outrun, spends itself on ViT-B first; a row the
# budget leaves out is recorded as skipped, and each row's results are written as soon as it ends.
left=$((budget - (SECONDS - start)))
step bench "$left" "$py" -m vitfast bench --model vit_base vit_small vit_large --batch 1 32 256 \
    --train-batch 128 --train-model vit_base \
    --compile-mode "$compile_mode" --budget $((left > 90 ? left - 60 : 30)) --out "$out"

say "== summary after $((SECONDS - start)) s (step: exit code; - not selected by VITFAST_SUITE_STEPS)"
failed=0
for i in "${!names[@]}"; do
    say "$(printf '  %-18s %s' "${names[$i]}" "${codes[$i]}")"
    [[ ${codes[i]} == 0 || ${codes[i]} == - ]] || failed=1
done
say "== files in $out:"
ls -l "$out" | tee -a "$log"
exit "$failed"
