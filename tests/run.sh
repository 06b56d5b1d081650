#!/usr/bin/env bash
# The test command of the README: install the project with its export and dev extras, then run
# the suite (arguments go to pytest). Safe to run again: pip skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -e ".[export,dev]"
# The independent encoder check compares against the `dasheng` package. Its declared
# dependencies include torchaudio, whose PyPI build does not import beside torch 2.13 here (and
# would pull another torch), so it is installed without them; the test supplies a stand-in for
# the torchaudio import and feeds log-mel directly.
python3 -m pip install --quiet --disable-pip-version-check --no-deps "dasheng==0.0.9"
exec python3 -m pytest "$@"
