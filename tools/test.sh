#!/usr/bin/env bash
# Run the whole test suite on a fresh machine: set up (tools/setup.sh), then pytest.
# Extra arguments go to pytest, e.g. `bash tools/test.sh -k dlist -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
exec .venv/bin/python -m pytest "$@"
