#!/usr/bin/env bash
# The main job on an embedded default: a local store in ./demo, the sample
# Maildir shipped in tests/data imported into it, status and verify; then a
# second store kept in step with it, as a replica would be.
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

echo "== a replica: an offline diff file applied to a second store, then two-way sync"
$MODSYNC init --store demo/replica
TOKEN=$($MODSYNC state --store demo/replica --user demo)
$MODSYNC diff --user demo --since "$TOKEN" --out demo/demo.diff
$MODSYNC apply --store demo/replica demo/demo.diff
printf 'Subject: written on the replica\r\n\r\nhello\r\n' | \
    $MODSYNC save --store demo/replica --user demo --mailbox INBOX
$MODSYNC flags add --user demo --mailbox INBOX --uid 1 '$Demo'
$MODSYNC sync --peer demo/replica
$MODSYNC status --user demo
$MODSYNC status --store demo/replica --user demo
echo "demo stores left in ./demo; try: MODSYNC_STORE=demo/store $MODSYNC --help"
