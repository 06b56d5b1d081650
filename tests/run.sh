#!/usr/bin/env bash
# The test command of the README: install the project with its export, server, cluster, live and dev extras, then run
# the suite (arguments go to pytest). Safe to run again: pip skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
# Debian packages the tests use: ffmpeg reads the containers libsndfile cannot (M4A/AAC/Opus/
# video); libportaudio2 is the microphone library of `mdl-edge live --mic`; espeak-ng speaks the toy world the trained test model hears; chromium and its driver
# load the server's page in a headless browser. Their tests skip without them.
missing=""
command -v ffmpeg >/dev/null 2>&1 || missing="$missing ffmpeg"
command -v espeak-ng >/dev/null 2>&1 || missing="$missing espeak-ng"
command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
command -v chromedriver >/dev/null 2>&1 || missing="$missing chromium-driver"
# PortAudio: `mdl-edge live --mic` (sounddevice) reads the microphone through it
ldconfig -p 2>/dev/null | grep -q libportaudio.so.2 || missing="$missing libportaudio2"
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null) \
      || echo "tests/run.sh: could not install$missing; their tests will be skipped" >&2
  else
    echo "tests/run.sh: not found:$missing (apt-get install$missing); their tests will be skipped" >&2
  fi
fi
# llama-cpp-python builds from source; its multimodal library (libmtmd) is not used here: skip it
export CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}"
python3 -m pip install --quiet --disable-pip-version-check -e ".[export,server,cluster,live,dev]"
# The independent encoder check compares against the `dasheng` package. Its declared
# dependencies include torchaudio, whose PyPI build does not import beside torch 2.13 here (and
# would pull another torch), so it is installed without them; the test supplies a stand-in for
# the torchaudio import and feeds log-mel directly.
python3 -m pip install --quiet --disable-pip-version-check --no-deps "dasheng==0.0.9"
exec python3 -m pytest "$@"
