#!/usr/bin/env bash
# The main job on an embedded default: a local store in ./demo, the sample
# Maildir shipped in tests/data imported into it, then status and verify.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
MODSYNC=.venv/bin/modsync
rm -rf demo && mkdir -p demo
export MODSYNC_STORE=demo/store
$MODSYNC init
# git keeps neither empty folders nor file times: put back new/, tmp/ and the
# messages' dates (the files' mtimes) before importing.
.venv/bin/python tools/corpus.py restore tests/data/sample-maildir
$MODSYNC import --user demo --maildir tests/data/sample-maildir
$MODSYNC mailbox list --user demo
$MODSYNC status --user demo
$MODSYNC verify
echo "demo store left in ./demo/store; try: MODSYNC_STORE=demo/store $MODSYNC --help"
