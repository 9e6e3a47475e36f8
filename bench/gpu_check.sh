#!/usr/bin/env bash
# Every GPU measurement orch still lacks, in one run (planned for ≤ 8 minutes on one H100), written as one
# markdown file: training cost at fp32 / bf16 / bf16 + compile with MFU (FM, LSD, MeanFlow on the CIFAR-10 UNet
# and DiT-B/2, bench/studies/gpu_check.yaml), sampling and Inception throughput, the JVP back-ends' step cost on
# DiT-B/2 at 256 tokens, and a one-process NCCL data-parallel smoke. Synthetic data and random-weight Inception:
# nothing to download.
#
#   bench/gpu_check.sh [--cpu] [REPORT_FILE]     (--cpu: the same steps at toy sizes, to check the script)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(test -x .venv/bin/python && echo .venv/bin/python || echo python)}
if [[ ${1:-} == --cpu ]]; then cpu=1; shift; else cpu=0; fi
out=${1:-gpu_check.md}

if ((cpu)); then  # no compile variant: compiling six trials on a CPU takes longer than the whole GPU check
  device=cpu profile=(--profile cpu --variants fp32,bf16 --fid-images 16 --peak-tflops 1) steps=2 warmup=1
  jvp=(--size S --depth 1 --hidden 32 --heads 2 --batch 4 --tokens 16 --steps 2)
else
  device=cuda profile=(--fid-images 2000) steps=30 warmup=5
  jvp=(--size B --batch 64 --tokens 256 --steps 10 --jvp-kernel)
fi

section() {  # a heading, the command, and its output as a code block; a failure is recorded, the rest still runs
  local title=$1; shift
  echo "running: $*" >&2
  { echo "## $title"; echo; echo '```'; echo "\$ $*"; "$@" 2>&1 || echo "FAILED: exit $?"; echo '```'; echo; } >> "$out"
}

{
  echo "# orch GPU check"
  echo
  echo "$(date -u +%Y-%m-%d), $("$PYTHON" -c 'import torch; d = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"; print(f"{d}, torch {torch.__version__}, CUDA {torch.version.cuda}")')"
  echo
} > "$out"
section "Training cost, sampling and Inception throughput (fp32, bf16, bf16 + compile)" \
  "$PYTHON" bench/gpu_efficiency.py bench/studies/gpu_check.yaml "${profile[@]}" --device "$device" \
  --steps "$steps" --warmup "$warmup" --synthetic --random-inception
section "JVP back-ends on DiT (time and memory relative to flow matching)" \
  "$PYTHON" bench/jvp_cost.py --device "$device" "${jvp[@]}"
section "Data-parallel smoke (torchrun, one process)" \
  "$PYTHON" -m torch.distributed.run --nproc_per_node 1 bench/nccl_smoke.py --device "$device" --steps "$steps"
echo "wrote $out" >&2
