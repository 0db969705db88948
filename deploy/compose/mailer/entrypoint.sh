#!/bin/sh
# Starts OpenDKIM and Postfix in the foreground; stops both on SIGTERM.
set -eu
KEYS=/var/lib/keyroll/dkim

# OpenDKIM reads its tables at start: wait for keyroll-sidecar's first delivery.
i=0
until [ -e "$KEYS/KeyTable" ]; do
  i=$((i + 1))
  if [ "$i" -gt 300 ]; then
    echo "mailer: no $KEYS/KeyTable after 300s; is keyroll-sidecar running?" >&2
    exit 1
  fi
  sleep 1
done
rm -f /run/opendkim/opendkim.pid
opendkim -f -x /etc/opendkim.conf &
dkim=$!
postfix start-fg &
pf=$!
echo "mailer: OpenDKIM (pid $dkim) signing with $KEYS; Postfix relaying to Mailpit"

stop() {
  postfix stop >/dev/null 2>&1 || true
  kill -TERM "$dkim" 2>/dev/null || true
}
trap stop TERM INT
wait "$pf" || true
stop
wait "$dkim" || true
