#!/usr/bin/env python3
"""keyroll-sidecar with activation = "dns": record served -> signing switched.

One OpenBao dev server, one Knot DNS server (zone example.com, TSIG-only DKIM updates, SOA
negative TTL NEG_TTL seconds), one sidecar polling every POLL seconds with activation = "dns".
For each of ROTATIONS rotations: rotate the ed25519 key in Vault, wait until the sidecar has
delivered the new key file (and found its record absent), pause a random fraction of a poll (so
the poll's phase is not favoured), publish the record with knsupdate, and time from the moment
Knot answers it until the live SigningTable names the new selector.

The bound the design promises is "negative TTL + one poll" (the first poll that sees the
record starts the clock; the sidecar re-checks exactly when the negative TTL runs out), so the
figure is reported as a ratio to that bound. Also reported: DNS queries the sidecar made over
STEADY_POLLS polls after the last switch (the design asks none once the newest version signs).

Usage: bench/sidecar-dns.sh. Prints a table and writes bench/results-sidecar-dns.json.
Nothing here is a pass/fail test.
"""
import base64
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BAO = os.environ.get("KEYROLL_BAO_BIN", os.path.join(ROOT, ".venv/bin/bao"))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
SIDECAR = os.environ.get("SIDECAR_BIN", os.path.join(TARGET, "debug/keyroll-sidecar"))
ROTATIONS = int(os.environ.get("ROTATIONS", "9"))
POLL = float(os.environ.get("POLL", "2"))
NEG_TTL = int(os.environ.get("NEG_TTL", "3"))
STEADY_POLLS = int(os.environ.get("STEADY_POLLS", "5"))
KNOTD = "/usr/sbin/knotd" if os.path.exists("/usr/sbin/knotd") else "knotd"


def free_port():
    for _ in range(200):
        t, u = socket.socket(), socket.socket(type=socket.SOCK_DGRAM)
        try:
            t.bind(("127.0.0.1", 0))
            p = t.getsockname()[1]
            u.bind(("127.0.0.1", p))
            return p
        except OSError:
            continue
        finally:
            t.close()
            u.close()
    raise RuntimeError("no free port")


def wait(what, cond, limit=120.0, step=0.02):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(step)
    raise RuntimeError(f"timed out waiting for {what}")


class Vault:
    def __init__(self, work):
        self.port = free_port()
        self.addr = f"http://127.0.0.1:{self.port}"
        self.token = "root-bench"
        self.proc = subprocess.Popen(
            [BAO, "server", "-dev", f"-dev-listen-address=127.0.0.1:{self.port}"],
            stdout=open(os.path.join(work, "bao.log"), "w"), stderr=subprocess.STDOUT,
            env={**os.environ, "HOME": work, "BAO_DEV_ROOT_TOKEN_ID": self.token})
        wait("bao", lambda: self.ok("GET", "sys/health"))
        self.ok("POST", "sys/mounts/transit", {"type": "transit"})

    def req(self, method, path, body=None):
        data = json.dumps(body).encode() if body is not None else None
        r = urllib.request.Request(f"{self.addr}/v1/{path}", data=data, method=method)
        r.add_header("X-Vault-Token", self.token)
        with urllib.request.urlopen(r, timeout=30) as resp:
            return resp.read()

    def ok(self, *a):
        try:
            self.req(*a)
            return True
        except Exception:
            return False


class Knot:
    def __init__(self, work):
        self.port = free_port()
        d = os.path.join(work, "knot")
        for sub in ("run", "db", "zones"):
            os.makedirs(os.path.join(d, sub), exist_ok=True)
        self.secret = base64.b64encode(os.urandom(32)).decode()
        open(os.path.join(d, "zones/example.com.zone"), "w").write(
            "$ORIGIN example.com.\n$TTL 300\n"
            f"@ 300 IN SOA ns1.example.com. hostmaster.example.com. 1 60 30 600 {NEG_TTL}\n"
            "@ IN NS ns1.example.com.\nns1 IN A 127.0.0.1\n")
        user = "    user: root:root\n" if os.geteuid() == 0 else ""
        self.conf = os.path.join(d, "knot.conf")
        open(self.conf, "w").write(
            f"server:\n    rundir: \"{d}/run\"\n    listen: 127.0.0.1@{self.port}\n{user}"
            f"database:\n    storage: \"{d}/db\"\n"
            f"key:\n  - id: keyroll\n    algorithm: hmac-sha256\n    secret: {self.secret}\n"
            "acl:\n  - id: dkim\n    key: keyroll\n    action: update\n    update-type: [TXT]\n"
            "    update-owner: name\n    update-owner-match: sub\n"
            "    update-owner-name: [_domainkey]\n"
            f"template:\n  - id: default\n    storage: \"{d}/zones\"\n    zonefile-sync: -1\n"
            "    journal-content: changes\n"
            "zone:\n  - domain: example.com\n    acl: dkim\n")
        self.dir = d
        self.proc = subprocess.Popen([KNOTD, "-c", self.conf],
                                     stdout=open(os.path.join(d, "knotd.log"), "w"),
                                     stderr=subprocess.STDOUT)
        wait("knotd", lambda: self.txt("example.com", "SOA") is not None)

    def txt(self, name, rtype="TXT"):
        out = subprocess.run(["kdig", "@127.0.0.1", "-p", str(self.port), "+tcp", "+norecurse",
                              "+timeout=2", "+retry=0", "+short", name, rtype],
                             capture_output=True, text=True)
        if out.returncode != 0:
            return None
        return "".join(p for p in out.stdout.replace("\n", "").split('"')[1::2]) if rtype == "TXT" \
            else out.stdout

    def publish(self, owner, value):
        strings = " ".join(f'"{value[i:i + 255]}"' for i in range(0, len(value), 255))
        script = os.path.join(self.dir, "update.txt")
        open(script, "w").write(
            f"server 127.0.0.1 {self.port}\nzone example.com.\n"
            f"update delete {owner}. TXT\nupdate add {owner}. 300 TXT {strings}\nsend\n")
        subprocess.run(["knsupdate", "-y", f"hmac-sha256:keyroll:{self.secret}", script],
                       check=True, capture_output=True)
        wait(f"{owner} served", lambda: self.txt(owner) == value)


def main():
    work = tempfile.mkdtemp(prefix="kr-dns-bench-", dir=os.path.join(TARGET, "tmp")
                            if os.path.isdir(os.path.join(TARGET, "tmp")) else None)
    vault = Vault(work)
    knot = Knot(work)
    procs = [vault.proc, knot.proc]
    try:
        vault.req("POST", "transit/keys/dkim", {"type": "ed25519", "exportable": True})
        out = os.path.join(work, "out")
        lport = free_port()
        cfg = os.path.join(work, "sidecar.toml")
        open(cfg, "w").write(
            f"output_dir = \"{out}\"\npoll_interval = \"{POLL}s\"\npoll_jitter = \"0%\"\n"
            f"listen.address = \"127.0.0.1:{lport}\"\n"
            "[[keys]]\nname = \"dkim\"\nformat = \"opendkim\"\ndomain = \"example.com\"\n"
            "activation = \"dns\"\n"
            f"[dns]\nservers = [\"127.0.0.1:{knot.port}\"]\nzone = \"example.com\"\n"
            "timeout = \"2s\"\n[report]\nsidecar_id = \"bench\"\n")
        side = subprocess.Popen([SIDECAR, "-c", cfg],
                                stdout=open(os.path.join(work, "sidecar.log"), "w"),
                                stderr=subprocess.STDOUT,
                                env={**os.environ, "VAULT_ADDR": vault.addr,
                                     "VAULT_TOKEN": vault.token})
        procs.append(side)

        def get(path):
            with urllib.request.urlopen(f"http://127.0.0.1:{lport}{path}", timeout=30) as r:
                return r.read().decode()

        def signing():
            try:
                return open(os.path.join(out, "SigningTable")).read()
            except OSError:
                return ""

        def value(version):
            recs = json.load(open(os.path.join(out, "dns/records.json")))
            return next(r["value"] for r in recs if r["version"] == version)

        def dns_queries():
            m = get("/metrics")
            return sum(float(line.split()[-1]) for line in m.splitlines()
                       if line.startswith("keyroll_sidecar_dns_queries_total"))

        wait("sidecar ready", lambda: "kr1._domainkey" in signing())
        knot.publish("kr1._domainkey.example.com", value(1))
        samples = []
        for i in range(ROTATIONS):
            v = i + 2
            vault.req("POST", "transit/keys/dkim/rotate", {})
            wait(f"kr{v} delivered and found absent", lambda: json.loads(get("/healthz"))
                 ["keys"]["dkim"].get("dkim", {}).get("waiting", {}).get("state") == "absent")
            time.sleep(random.uniform(0, POLL))
            knot.publish(f"kr{v}._domainkey.example.com", value(v))
            t0 = time.monotonic()
            wait(f"switch to kr{v}", lambda: f"kr{v}._domainkey" in signing(), step=0.01)
            samples.append(time.monotonic() - t0)
            print(f"  rotation {i + 1}: served -> signing {samples[-1]:.2f} s", file=sys.stderr)
        q0 = dns_queries()
        polls0 = float(next(line.split()[-1] for line in get("/metrics").splitlines()
                            if line.startswith("keyroll_sidecar_passes_total")))
        wait("steady polls", lambda: float(next(
            line.split()[-1] for line in get("/metrics").splitlines()
            if line.startswith("keyroll_sidecar_passes_total"))) >= polls0 + STEADY_POLLS,
            limit=STEADY_POLLS * POLL * 10)
        steady = dns_queries() - q0
        bound = NEG_TTL + POLL
        med = statistics.median(samples)
        res = {
            "rotations": ROTATIONS, "poll_s": POLL, "negative_ttl_s": NEG_TTL,
            "served_to_signing_s": {"median": round(med, 3), "min": round(min(samples), 3),
                                    "max": round(max(samples), 3)},
            "bound_s": bound, "median_over_bound": round(med / bound, 3),
            "max_over_bound": round(max(samples) / bound, 3),
            "steady_state_dns_queries": {"polls": STEADY_POLLS, "queries": steady},
        }
        print(f"record served -> signing switched, {ROTATIONS} rotations "
              f"(negative TTL {NEG_TTL} s, poll {POLL} s):")
        print(f"  median {med:.2f} s  min {min(samples):.2f} s  max {max(samples):.2f} s")
        print(f"  bound (negative TTL + one poll) {bound:.2f} s  median/bound "
              f"{med / bound:.2f}  max/bound {max(samples) / bound:.2f}")
        print(f"  DNS queries over {STEADY_POLLS} steady polls after the last switch: {steady:.0f}")
        json.dump(res, open(os.path.join(ROOT, "bench/results-sidecar-dns.json"), "w"), indent=2)
    finally:
        for p in procs:
            p.kill()
            p.wait()


if __name__ == "__main__":
    main()
