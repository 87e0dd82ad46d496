#!/usr/bin/env bash
# The test command of the README: installs everything (scripts/install.sh), then runs the suite.
# Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/install.sh"
cd "$root"
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pytest tests -q "$@"
