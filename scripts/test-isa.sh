#!/usr/bin/env bash
# The ISA variation step (CI runs it after scripts/test.sh, with the .venv that script installed): rerun the tests
# whose numbers depend on the CPU's kernels (pytest -m numerics: INT8/FP16 graphs against FP32, ONNX Runtime
# against PyTorch) as if on other CPUs, so that no threshold rests on the instruction set of the machine CI ran on.
#
#   sse41    torch limited to SSE4.1: ONEDNN_MAX_CPU_ISA=SSE41 (oneDNN: torch's convolutions), with
#            ATEN_CPU_CAPABILITY=default (ATen's own vectorised kernels) and MKL_ENABLE_INSTRUCTIONS=SSE4_2 (MKL:
#            torch's matrix products; MKL has no SSE4.1 level)
#   avx2     torch limited to AVX2, as on an AMD EPYC without AVX-512/VNNI: ONEDNN_MAX_CPU_ISA=AVX2,
#            ATEN_CPU_CAPABILITY=avx2, MKL_ENABLE_INSTRUCTIONS=AVX2
#   ort-noopt  ONNX Runtime without graph optimisations (FAIRDEPLOY_ORT_GRAPH_OPT=disable, read by
#            fairdeploy.runtime.ort_runner.session_options): the graph's own operators instead of the fused
#            Conv+Add+Relu / QLinear kernels, whose rounding differs by instruction set
#
# ONNX Runtime's own kernels (MLAS) ignore ONEDNN_MAX_CPU_ISA and the other two variables: they choose by CPUID
# alone, so the first two runs vary torch only (the PyTorch reference, the trained fixture, calibration forwards);
# the third is the ONNX Runtime variation available without another CPU.
#
# Usage: bash scripts/test-isa.sh [pytest args]   (e.g. -x, or a test file to narrow the run)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
  echo "error: .venv is missing; run bash scripts/test.sh first (it installs fairdeploy with the test extras)" >&2
  exit 2
fi
. .venv/bin/activate
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

VARIANTS=(
  "sse41|ONEDNN_MAX_CPU_ISA=SSE41 ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2"
  "avx2|ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2"
  "ort-noopt|FAIRDEPLOY_ORT_GRAPH_OPT=disable"
)
failed=()
for variant in "${VARIANTS[@]}"; do
  name=${variant%%|*}
  read -r -a vars <<<"${variant#*|}"
  capability=$(env "${vars[@]}" python -c "import torch; print(torch.backends.cpu.get_cpu_capability())")
  echo "== numerics under ${name}: ${vars[*]} (torch's ATen kernels: ${capability}; load $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo n/a))"
  start=$SECONDS
  if env "${vars[@]}" python -m pytest -q -n auto --maxprocesses 2 --dist loadfile -m numerics "$@"; then
    echo "== ${name}: passed in $((SECONDS - start)) s"
  else
    echo "== ${name}: FAILED in $((SECONDS - start)) s"
    failed+=("$name")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "error: the numerics tests failed under: ${failed[*]}" >&2
  exit 1
fi
echo "== the numerics tests passed under every variation (${#VARIANTS[@]})"
