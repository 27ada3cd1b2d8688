#!/usr/bin/env bash
# Set up a fresh machine for modsync: a virtualenv with modsync and its test
# dependencies in .venv, plus (when run as root) the Debian packages the
# interop tests start as real peers.  Safe to run again: it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'

# Real peers for interop tests and benchmarks, from Debian's packages.
#   dovecot-core: doveadm reads and writes Maildirs (tests/test_dovecot_interop.py)
#   restic: the backup benchmark's peer (tools/benchmarks/backup.py)
#   cyrus-*, sasl2-bin, libsasl2-*: a real Cyrus IMAP 3.6 master and replica
#     (tests/csync, tools/benchmarks/cyrus.py); policy-rc.d keeps apt from
#     starting the system's own daemons, the tests start their own
DEB_PACKAGES="dovecot-core restic cyrus-imapd cyrus-common cyrus-replication sasl2-bin libsasl2-modules libsasl2-modules-db"
if [ "${MODSYNC_SKIP_APT:-}" != "1" ] && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    missing=""
    for p in $DEB_PACKAGES; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
    done
    if [ -n "$missing" ]; then
        echo "installing Debian packages:$missing" >&2
        made_policy=""
        if [ ! -e /usr/sbin/policy-rc.d ]; then
            printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
            made_policy=1
        fi
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
        [ -n "$made_policy" ] && rm -f /usr/sbin/policy-rc.d
    fi
fi
