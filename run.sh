#!/usr/bin/env bash
# The two set-up commands of the README, on a fresh Debian machine as root:
#   ./run.sh demo   install everything (apt packages included) and run the main job on the tiny default
#   ./run.sh test   install what the tests need and run the fast test suite
# Other targets of the Makefile work too (./run.sh lint, ./run.sh clean).
set -euo pipefail
cd "$(dirname "$0")"

need=()
command -v make >/dev/null 2>&1 || need+=(make)
python3 -m venv --help >/dev/null 2>&1 || need+=(python3-venv)
python3 -m ensurepip --version >/dev/null 2>&1 || need+=(python3-pip)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "run.sh: please install ${need[*]} (needs root)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends python3 "${need[@]}"
fi
exec make "${@:-test}"
