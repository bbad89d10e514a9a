#!/usr/bin/env bash
# Install fairdeploy into .venv and run the main job on the built-in synthetic demo data:
# synthesise -> train -> compress as far as every group allows (FairPrune beside its magnitude control) and SNNL
# steps -> ONNX FP32/FP16/INT8 -> re-validate every artifact -> report.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
fairdeploy demo --out "${1:-demo-run}"
