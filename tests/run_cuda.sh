#!/usr/bin/env bash
# The CUDA checks, for a GPU machine whose Python already has torch, transformers and the
# project's other dependencies (no network needed): builds and installs the project without
# resolving dependencies, then runs every `cuda`-marked test, the real-size one included.
# Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation --no-index .
exec python3 -m pytest tests/test_cuda.py -m cuda -p no:cacheprovider -rs "$@"
