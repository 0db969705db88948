#!/usr/bin/env python3
"""keyroll-sidecar vs OpenBao Agent, side by side on one loopback OpenBao dev server.

Both deliver the same 10 transit keys (2 rsa-2048 + 3 ed25519 for OpenDKIM, 5 aes256 keyrings)
and "reload" a dummy mailer (a process recording when it gets SIGUSR1). Measured in one run:

  A. idle: RSS and CPU of each over IDLE_SECS (60) at a 30 s interval; Vault requests each made in
     that window (from the audit log, by token display name).
  B. rotation -> files swapped and reload sent: sidecar with the /refresh nudge (as the
     rotator's webhook does); sidecar and Agent by polling alone at POLL_B, each rotation at a
     uniformly random moment (a random pause first), so neither poller's phase is favoured:
     waiting for the next poll then takes half an interval on average.
  C. torn reads: a reader checks, in a tight loop, that the "latest version" it reads is present
     in the key material it reads, over >= 100 rotations, for both.

Usage: bench/sidecar.sh (builds the release binary first). Prints a table and writes JSON to
bench/results.json. Nothing here is a pass/fail test.
"""
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BAO = os.environ.get("KEYROLL_BAO_BIN", os.path.join(ROOT, ".venv/bin/bao"))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
SIDECAR = os.environ.get("SIDECAR_BIN", os.path.join(TARGET, "release-small/keyroll-sidecar"))
IDLE_SECS = int(os.environ.get("IDLE_SECS", "60"))
POLL_B = 2.0
PUSH_ROTATIONS = int(os.environ.get("PUSH_ROTATIONS", "20"))
POLL_ROTATIONS = int(os.environ.get("POLL_ROTATIONS", "60"))
TORN_ROTATIONS = int(os.environ.get("TORN_ROTATIONS", "100"))
CLK = os.sysconf("SC_CLK_TCK")

KEYS = [("rsa0", "rsa-2048"), ("rsa1", "rsa-2048"), ("ed0", "ed25519"), ("ed1", "ed25519"),
        ("ed2", "ed25519")] + [(f"aes{i}", "aes256-gcm96") for i in range(5)]


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Vault:
    def __init__(self, work):
        self.port = free_port()
        self.addr = f"http://127.0.0.1:{self.port}"
        self.token = "root-bench"
        # OpenBao 2.x only lets the API enable an audit device when the config allows it.
        extra = os.path.join(work, "bench.hcl")
        open(extra, "w").write("unsafe_allow_api_audit_creation = true\n")
        self.proc = subprocess.Popen(
            [BAO, "server", "-dev", f"-config={extra}",
             f"-dev-listen-address=127.0.0.1:{self.port}"],
            stdout=open(os.path.join(work, "bao.log"), "w"), stderr=subprocess.STDOUT,
            env={**os.environ, "HOME": work, "BAO_DEV_ROOT_TOKEN_ID": self.token})
        for _ in range(200):
            try:
                self.req("GET", "sys/health")
                break
            except Exception:
                time.sleep(0.05)
        self.req("POST", "sys/mounts/transit", {"type": "transit"})

    def req(self, method, path, body=None, token=None):
        data = json.dumps(body).encode() if body is not None else None
        r = urllib.request.Request(f"{self.addr}/v1/{path}", data=data, method=method)
        r.add_header("X-Vault-Token", token or self.token)
        with urllib.request.urlopen(r, timeout=30) as resp:
            t = resp.read()
            return json.loads(t) if t else None

    def token_for(self, name):
        r = self.req("POST", "auth/token/create", {"display_name": name, "policies": ["root"]})
        return r["auth"]["client_token"]


def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_secs(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / CLK


def tree_pids(pid):
    """pid and its descendants (the bao wheel's agent may run as a child process)."""
    out = [pid]
    try:
        for c in open(f"/proc/{pid}/task/{pid}/children").read().split():
            out += tree_pids(int(c))
    except OSError:
        pass
    return out


class Mailer:
    """A stand-in mailer: on every SIGUSR1 it records the time and, like a real mailer
    re-reading its files, which versions of the probed key its files hold at that moment
    (`probe`: the file, and "keyring" for the sidecar's keyring JSON or "export" for Agent's
    export template)."""

    def __init__(self, work, name, probe):
        self.log = os.path.join(work, f"{name}.reloads")
        self.pidfile = os.path.join(work, f"{name}.pid")
        path, kind = probe
        code = ("import signal,time,sys,os,json\n"
                f"f=open({self.log!r},'a',buffering=1)\n"
                "def versions():\n"
                "    try:\n"
                f"        d=json.load(open({path!r}))\n"
                f"        return [int(v['version']) for v in d['versions']] if {kind!r}=='keyring' else [int(v) for v in d]\n"
                "    except Exception:\n"
                "        return []\n"
                "def on(*a):\n"
                "    t=time.time()\n"
                "    f.write(repr(t)+' '+','.join(map(str,versions()))+'\\n')\n"
                "signal.signal(signal.SIGUSR1, on)\n"
                f"open({self.pidfile!r},'w').write(str(os.getpid()))\n"
                "while True: signal.pause()\n")
        self.proc = subprocess.Popen([sys.executable, "-c", code])
        while not os.path.exists(self.pidfile):
            time.sleep(0.01)
        self.pid = self.proc.pid

    def entries(self):
        """(time, versions held) per reload."""
        out = []
        try:
            for line in open(self.log).read().splitlines():
                t, _, vs = line.partition(" ")
                out.append((float(t), {int(v) for v in vs.split(",") if v}))
        except OSError:
            pass
        return out

    def times(self):
        return [t for t, _ in self.entries()]

    def loaded(self, version, after):
        """When the mailer first reloaded (after `after`) with `version` in its files."""
        for t, vs in self.entries():
            if t >= after and version in vs:
                return t
        return None


def sidecar_config(out, port, poll, mailer):
    c = (f'output_dir = "{out}"\npoll_interval = "{poll}"\npoll_jitter = "10%"\n'
         f'[listen]\naddress = "127.0.0.1:{port}"\n'
         f'[reload]\nsignal = "SIGUSR1"\npidfile = "{mailer.pidfile}"\n')
    for name, kt in KEYS:
        if kt.startswith("rsa") or name in ("ed0", "ed1"):
            c += f'[[keys]]\nname = "{name}"\nformat = "opendkim"\ndomain = "{name}.example.com"\n'
        elif kt == "ed25519":
            c += f'[[keys]]\nname = "{name}"\nformat = "pem"\n'
        else:
            c += f'[[keys]]\nname = "{name}"\nformat = "keyring-json"\n'
    return c


def agent_config(work, vault, token_file, out, interval, mailer):
    c = (f'pid_file = "{work}/agent.pid"\nvault {{\n address = "{vault.addr}"\n}}\n'
         f'auto_auth {{\n method "token_file" {{\n  config = {{ token_file_path = "{token_file}" }}\n }}\n}}\n'
         f'template_config {{\n static_secret_render_interval = "{interval}"\n exit_on_retry_failure = false\n}}\n')
    for name, kt in KEYS:
        kind = "encryption-key" if kt.startswith("aes") else "signing-key"
        for suffix, tpl in (
            ("json", f'{{{{ with secret "transit/export/{kind}/{name}" }}}}{{{{ .Data.keys | toJSON }}}}{{{{ end }}}}'),
            ("latest", f'{{{{ with secret "transit/keys/{name}" }}}}{{{{ .Data.latest_version }}}}{{{{ end }}}}'),
        ):
            c += (f'template {{\n contents = {json.dumps(tpl)}\n destination = "{out}/{name}.{suffix}"\n'
                  f' perms = "0600"\n exec {{\n  command = ["kill", "-USR1", "{mailer.pid}"]\n }}\n}}\n')
    return c


def http(port, method, path):
    r = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=b"" if method == "POST" else None,
                               method=method)
    with urllib.request.urlopen(r, timeout=60) as resp:
        return resp.read().decode()


def metric(port, series):
    for line in http(port, "GET", "/metrics").splitlines():
        if line.startswith(series + " "):
            return float(line.split()[1])
    return 0.0


def wait(pred, limit=60.0, step=0.002):
    end = time.time() + limit
    while time.time() < end:
        if pred():
            return True
        time.sleep(step)
    return False


def audit_counts(audit_log, since, until):
    counts = {}
    for line in open(audit_log):
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if e.get("type") != "request":
            continue
        t = e.get("time", "")
        who = (e.get("auth") or {}).get("display_name", "")
        path = (e.get("request") or {}).get("path", "")
        if not path.startswith("transit/"):
            continue
        # RFC 3339 with nanoseconds; compare as epoch seconds.
        ts = time.mktime(time.strptime(t[:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
        if not (since <= ts <= until):
            continue
        kind = "export" if "/export/" in path else "read"
        who = "sidecar" if "sidecar" in who else ("agent" if "agent" in who else who)
        counts.setdefault(who, {"read": 0, "export": 0})[kind] += 1
    return counts


def main():
    # BENCH_DIR: where both write their files. Publishing fsyncs every file, so a disk-backed
    # directory adds the disk's fsync latency; a tmpfs (a memory-backed emptyDir) does not.
    base = os.environ.get("BENCH_DIR") or None
    work = tempfile.mkdtemp(prefix="kr-bench-", dir=base)
    os.chmod(work, 0o755)
    procs = []
    results = {}
    try:
        v = Vault(work)
        procs.append(v.proc)
        audit_log = os.path.join(work, "audit.log")
        v.req("POST", "sys/audit/file", {"type": "file", "options": {"file_path": audit_log}})
        for name, kt in KEYS:
            v.req("POST", f"transit/keys/{name}", {"type": kt, "exportable": True})
        s_tok = v.token_for("sidecar")
        a_tok = v.token_for("agent")
        a_tok_file = os.path.join(work, "agent.token")
        open(a_tok_file, "w").write(a_tok)

        s_out, a_out = os.path.join(work, "sidecar-out"), os.path.join(work, "agent-out")
        ms = Mailer(work, "mailer-sidecar", (f"{s_out}/aes0.keyring.json", "keyring"))
        ma = Mailer(work, "mailer-agent", (f"{a_out}/aes0.json", "export"))
        procs += [ms.proc, ma.proc]
        os.makedirs(a_out)
        s_port = free_port()
        s_cfg = os.path.join(work, "sidecar.toml")
        open(s_cfg, "w").write(sidecar_config(s_out, s_port, "30s", ms))
        env = {"PATH": os.environ["PATH"], "VAULT_ADDR": v.addr, "VAULT_TOKEN": s_tok}
        sc = subprocess.Popen([SIDECAR, "-c", s_cfg], env=env,
                              stdout=open(os.path.join(work, "sidecar.log"), "w"), stderr=subprocess.STDOUT)
        procs.append(sc)

        def start_agent(interval):
            cfg = os.path.join(work, f"agent-{interval}.hcl")
            open(cfg, "w").write(agent_config(work, v, a_tok_file, a_out, interval, ma))
            p = subprocess.Popen([BAO, "agent", f"-config={cfg}"], env={**os.environ, "HOME": work},
                                 stdout=open(os.path.join(work, f"agent-{interval}.log"), "w"),
                                 stderr=subprocess.STDOUT)
            procs.append(p)
            ok = wait(lambda: all(os.path.exists(f"{a_out}/{n}.latest") for n, _ in KEYS), 60, 0.05)
            assert ok, open(os.path.join(work, f"agent-{interval}.log")).read()[-3000:]
            return p

        ag = start_agent("30s")
        assert wait(lambda: http(s_port, "GET", "/readyz").startswith("ready"), 60, 0.05)
        time.sleep(3)

        # ---- A. idle: RSS, CPU, Vault requests ----
        def cpu(p):
            return sum(cpu_secs(x) for x in tree_pids(p.pid))
        c0s, c0a, t0 = cpu(sc), cpu(ag), time.time()
        time.sleep(IDLE_SECS)
        c1s, c1a, t1 = cpu(sc), cpu(ag), time.time()
        time.sleep(1.5)  # let the audit log flush
        counts = audit_counts(audit_log, t0, t1)
        results["idle"] = {
            "seconds": round(t1 - t0, 1),
            "sidecar_rss_kib": rss_kib(sc.pid),
            "agent_rss_kib": sum(rss_kib(x) for x in tree_pids(ag.pid)),
            "sidecar_cpu_pct": round(100 * (c1s - c0s) / (t1 - t0), 4),
            "agent_cpu_pct": round(100 * (c1a - c0a) / (t1 - t0), 4),
            "vault_requests": counts,
        }

        # ---- B1. push path: rotate, POST /refresh (the rotator's webhook), reload received ----
        push = []
        for i in range(PUSH_ROTATIONS):
            n0 = len(ms.times())
            v.req("POST", "transit/keys/ed0/rotate", {})
            t_rot = time.time()
            http(s_port, "POST", "/refresh")
            assert wait(lambda: len(ms.times()) > n0, 10)
            push.append(ms.times()[-1] - t_rot)
        results["push_latency_s"] = {"median": round(statistics.median(push), 4),
                                     "max": round(max(push), 4), "n": len(push)}

        # ---- B2. poll path: both at POLL_B, no nudge ----
        ag.send_signal(signal.SIGTERM)
        ag.wait(15)
        cfg_text = open(s_cfg).read().replace('poll_interval = "30s"', f'poll_interval = "{int(POLL_B)}s"')
        open(s_cfg, "w").write(cfg_text)  # applied by the sidecar's config reload, no restart
        time.sleep(1)
        ag = start_agent(f"{int(POLL_B)}s")
        time.sleep(2 * POLL_B)
        ps, pa, ps_new, pa_new = [], [], [], []
        for i in range(POLL_ROTATIONS):
            # Rotate at a random point of both pollers' cycles: without this pause the next
            # rotation would follow the slower poller's reload by a fixed delay, favouring the
            # other one.
            time.sleep(random.uniform(0, POLL_B))
            n0s, n0a = len(ms.times()), len(ma.times())
            t_rot = time.time()
            v.req("POST", "transit/keys/aes0/rotate", {})
            new = v.req("GET", "transit/keys/aes0")["data"]["latest_version"]
            assert wait(lambda: ms.loaded(new, t_rot) and ma.loaded(new, t_rot), 30)
            ps.append(ms.times()[n0s] - t_rot)
            pa.append(ma.times()[n0a] - t_rot)
            ps_new.append(ms.loaded(new, t_rot) - t_rot)
            pa_new.append(ma.loaded(new, t_rot) - t_rot)
        results["poll_latency_s"] = {
            "interval": POLL_B, "n": len(ps),
            "sidecar_median": round(statistics.median(ps), 3), "sidecar_max": round(max(ps), 3),
            "sidecar_mean": round(statistics.mean(ps), 3),
            "agent_median": round(statistics.median(pa), 3), "agent_max": round(max(pa), 3),
            "agent_mean": round(statistics.mean(pa), 3),
            # The first reload with the new version in the mailer's files (Agent's first reload
            # often comes from the latest_version template alone, before the new key is there).
            "sidecar_new_key_median": round(statistics.median(ps_new), 3),
            "sidecar_new_key_mean": round(statistics.mean(ps_new), 3),
            "sidecar_new_key_max": round(max(ps_new), 3),
            "agent_new_key_median": round(statistics.median(pa_new), 3),
            "agent_new_key_mean": round(statistics.mean(pa_new), 3),
            "agent_new_key_max": round(max(pa_new), 3),
        }

        # ---- C. torn reads over TORN_ROTATIONS rotations (rotator webhook nudges the sidecar) ----
        stop = threading.Event()
        torn = {"sidecar": [0, 0], "agent": [0, 0]}  # [checks, inconsistent]

        def read_sidecar():
            try:
                latest = json.load(open(f"{s_out}/ed2/versions.json"))["latest"]
                ok = os.path.exists(f"{s_out}/ed2/v{latest}.key.pem")
                kr = json.load(open(f"{s_out}/aes1.keyring.json"))
                ok = ok and any(e["version"] == kr["active_version"] for e in kr["versions"])
                return ok
            except (OSError, ValueError, KeyError):
                return None

        def read_agent():
            try:
                latest = open(f"{a_out}/ed2.latest").read().strip()
                keys = json.load(open(f"{a_out}/ed2.json"))
                return latest in keys
            except (OSError, ValueError):
                return None

        def reader(name, fn):
            while not stop.is_set():
                r = fn()
                if r is None:
                    continue
                torn[name][0] += 1
                if not r:
                    torn[name][1] += 1

        threads = [threading.Thread(target=reader, args=a) for a in
                   (("sidecar", read_sidecar), ("agent", read_agent))]
        for t in threads:
            t.start()
        for i in range(TORN_ROTATIONS):
            v.req("POST", "transit/keys/ed2/rotate", {})
            v.req("POST", "transit/keys/aes1/rotate", {})
            http(s_port, "POST", "/refresh")
            time.sleep(0.1)
        time.sleep(POLL_B + 1)
        stop.set()
        for t in threads:
            t.join()
        results["torn_reads"] = {"rotations": TORN_ROTATIONS,
                                 "sidecar_checks": torn["sidecar"][0], "sidecar_torn": torn["sidecar"][1],
                                 "agent_checks": torn["agent"][0], "agent_torn": torn["agent"][1]}
        results["sidecar_metrics"] = {
            "reads": metric(s_port, 'keyroll_sidecar_vault_requests_total{kind="read"}'),
            "exports": metric(s_port, 'keyroll_sidecar_vault_requests_total{kind="export"}'),
            "publishes": metric(s_port, "keyroll_sidecar_publishes_total"),
            "reloads_ok": metric(s_port, 'keyroll_sidecar_reloads_total{result="ok"}'),
        }
    finally:
        for p in reversed(procs):
            try:
                p.send_signal(signal.SIGTERM)
                p.wait(10)
            except Exception:
                p.kill()
        # The work directory holds exported private keys: never leave it behind.
        shutil.rmtree(work, ignore_errors=True)
    report(results)
    with open(os.path.join(ROOT, "bench/results.json"), "w") as f:
        json.dump(results, f, indent=2)


def report(r):
    i = r["idle"]
    print(json.dumps(r, indent=2))
    print()
    print(f"{'measure':44} {'sidecar':>12} {'agent':>12} {'ratio':>8}")

    def row(name, s, a, fmt="{:.3f}"):
        ratio = (s / a) if a else float("nan")
        print(f"{name:44} {fmt.format(s):>12} {fmt.format(a):>12} {ratio:>8.3f}")
    row("RSS, 10 keys (MiB)", i["sidecar_rss_kib"] / 1024, i["agent_rss_kib"] / 1024, "{:.1f}")
    row(f"idle CPU over {i['seconds']}s (% of a core)", i["sidecar_cpu_pct"], i["agent_cpu_pct"], "{:.4f}")
    vs = i["vault_requests"].get("sidecar", {"read": 0, "export": 0})
    va = i["vault_requests"].get("agent", {"read": 0, "export": 0})
    row("Vault requests while idle (reads+exports)", vs["read"] + vs["export"], va["read"] + va["export"], "{:.0f}")
    row("  of which exports", vs["export"], va["export"], "{:.0f}")
    p = r["poll_latency_s"]
    row(f"rotation->reload, poll {p['interval']}s, median (s)", p["sidecar_median"], p["agent_median"])
    row(f"rotation->reload, poll {p['interval']}s, mean (s)", p["sidecar_mean"], p["agent_mean"])
    row(f"rotation->reload, poll {p['interval']}s, max (s)", p["sidecar_max"], p["agent_max"])
    row(f"rotation->reload with new key, poll {p['interval']}s, median", p["sidecar_new_key_median"], p["agent_new_key_median"])
    row(f"rotation->reload with new key, poll {p['interval']}s, mean", p["sidecar_new_key_mean"], p["agent_new_key_mean"])
    row(f"rotation->reload with new key, poll {p['interval']}s, max", p["sidecar_new_key_max"], p["agent_new_key_max"])
    pu = r["push_latency_s"]
    row("rotation->reload via /refresh, median (s)", pu["median"], p["agent_new_key_median"])
    t = r["torn_reads"]
    row(f"torn reads over {t['rotations']} rotations", t["sidecar_torn"], t["agent_torn"], "{:.0f}")
    print(f"(reader checks: sidecar {t['sidecar_checks']}, agent {t['agent_checks']})")


if __name__ == "__main__":
    main()
