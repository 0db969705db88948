#!/usr/bin/env python3
"""Verifies a DKIM-signed message against the TXT records keyroll-sidecar published.

    dkim_verify.py MESSAGE.eml RECORDS.json

RECORDS.json is the sidecar's `dns/records.json` (opendkim format): a list of
{"name": "<selector>._domainkey.<domain>", "value": "v=DKIM1; k=...; p=..."}. Verification is
dkimpy's, independent of the OpenDKIM that signed, and looks names up in that file instead of
DNS. Exit status 0 when the signature verifies, 1 when it does not.
"""
import json
import sys

import dkim


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    message = open(sys.argv[1], "rb").read()
    with open(sys.argv[2], encoding="utf-8") as f:
        records = {r["name"].rstrip(".").lower(): r["value"] for r in json.load(f)}

    def dnsfunc(name, timeout=5):
        value = records.get(name.decode().rstrip(".").lower())
        return value.encode() if value else None

    ok = dkim.verify(message, dnsfunc=dnsfunc)
    if not ok:
        print(f"{sys.argv[1]}: DKIM signature does not verify against {sys.argv[2]}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
