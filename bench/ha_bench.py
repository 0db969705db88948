"""Vault HA benchmark (not a test): a 3-node OpenBao Raft cluster on loopback, `keyroll run` and
keyroll-sidecar both given every node's address, the leader SIGKILLed KILLS times.

Per kill it reports, side by side:
  - election: from the kill to the new leader serving ("acquired lock, enabling active
    operation", then "post-unseal setup complete" in the servers' own logs);
  - keyroll run: from the kill to the first successful pass that finished after it;
  - sidecar: from the kill to the first successful poll (its last_success metric);
and the medians. Then the steady-state cost: Vault requests per `keyroll apply` pass and per
sidecar poll with three addresses against one (the same cluster; counted from keyroll's trace
logs, which log every request and every health probe).

Environment: KILLS (default 5), INTERVAL (keyroll run --interval and sidecar poll, seconds,
default 1), PERF_MULT (Raft performance_multiplier, default 5 = OpenBao's default timers),
KEEP=1 keeps the servers' and programs' logs.
"""

import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BAO = os.path.join(ROOT, ".venv/bin/bao")
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
KEYROLL = os.path.join(TARGET, "release/keyroll")
SIDECAR = os.path.join(TARGET, "release/keyroll-sidecar")
KILLS = int(os.environ.get("KILLS", "5"))
INTERVAL = float(os.environ.get("INTERVAL", "1"))
PERF_MULT = int(os.environ.get("PERF_MULT", "5"))
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def log_time(line):
    stamp = ANSI.sub("", line).split(" ", 1)[0]
    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def http_status(url, timeout=2):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return 0, ""


class Cluster:
    def __init__(self, work, n=3):
        self.work = work
        self.nodes = []
        for i in range(n):
            port, cport = free_port(), free_port()
            data = os.path.join(work, f"n{i}")
            os.makedirs(data)
            conf = os.path.join(work, f"n{i}.hcl")
            with open(conf, "w") as f:
                f.write(
                    f'storage "raft" {{\n path = "{data}"\n node_id = "n{i}"\n'
                    f" performance_multiplier = {PERF_MULT}\n}}\n"
                    f'listener "tcp" {{\n address = "127.0.0.1:{port}"\n'
                    f' cluster_address = "127.0.0.1:{cport}"\n tls_disable = true\n}}\n'
                    f'api_addr = "http://127.0.0.1:{port}"\n'
                    f'cluster_addr = "https://127.0.0.1:{cport}"\ndisable_mlock = true\n'
                )
            self.nodes.append(
                {"port": port, "addr": f"http://127.0.0.1:{port}", "conf": conf,
                 "log": os.path.join(work, f"n{i}.log"), "proc": None}
            )
        self.token = None
        self.keys = []

    def env(self, i):
        e = dict(os.environ, VAULT_ADDR=self.nodes[i]["addr"], HOME=self.work)
        if self.token:
            e["VAULT_TOKEN"] = self.token
        return e

    def cli(self, i, *args):
        return subprocess.run([BAO, *args], env=self.env(i), capture_output=True, text=True,
                              check=True).stdout

    def spawn(self, i):
        n = self.nodes[i]
        log = open(n["log"], "a")
        n["proc"] = subprocess.Popen([BAO, "server", f"-config={n['conf']}"], stdout=log,
                                     stderr=log, env=self.env(i))
        for _ in range(300):
            if http_status(n["addr"] + "/v1/sys/health")[0]:
                return
            time.sleep(0.1)
        raise SystemExit(f"node {i} did not start")

    def unseal(self, i):
        for k in self.keys[:2]:
            self.cli(i, "operator", "unseal", k)

    def start(self):
        self.spawn(0)
        init = json.loads(self.cli(0, "operator", "init", "-key-shares=3", "-key-threshold=2",
                                   "-format=json"))
        self.token, self.keys = init["root_token"], init["unseal_keys_b64"]
        self.unseal(0)
        self.wait_active()
        self.cli(0, "operator", "raft", "autopilot", "set-config",
                 "-server-stabilization-time=1s", "-cleanup-dead-servers=false")
        for i in range(1, len(self.nodes)):
            self.spawn(i)
            self.cli(i, "operator", "raft", "join", self.nodes[0]["addr"])
            self.unseal(i)
        for _ in range(600):
            peers = json.loads(self.cli(0, "operator", "raft", "list-peers", "-format=json"))
            if all(p["voter"] for p in peers["data"]["config"]["servers"]) and \
                    len(peers["data"]["config"]["servers"]) == len(self.nodes):
                break
            time.sleep(0.2)
        self.cli(0, "secrets", "enable", "transit")
        self.cli(0, "secrets", "enable", "-path=secret", "-version=2", "kv")
        for i in range(len(self.nodes)):
            for _ in range(300):
                r = subprocess.run([BAO, "kv", "put", "-mount=secret", "ready", "ok=1"],
                                   env=self.env(i), capture_output=True)
                if r.returncode == 0:
                    break
                time.sleep(0.2)

    def leader(self):
        for i, n in enumerate(self.nodes):
            if n["proc"] and http_status(n["addr"] + "/v1/sys/health")[0] == 200:
                return i
        return None

    def wait_active(self, limit=120):
        end = time.time() + limit
        while time.time() < end:
            i = self.leader()
            if i is not None:
                return i
            time.sleep(0.05)
        raise SystemExit("no leader")

    def kill(self, i):
        p = self.nodes[i]["proc"]
        p.send_signal(signal.SIGKILL)
        p.wait()
        self.nodes[i]["proc"] = None

    def became_active_after(self, i, t):
        """When node i started serving as active after t: the first "post-unseal setup
        complete" after an "acquired lock, enabling active operation" (its own log)."""
        won = False
        with open(self.nodes[i]["log"]) as f:
            for line in f:
                when = log_time(line)
                if not when or when <= t:
                    continue
                if "acquired lock, enabling active operation" in line:
                    won = True
                elif won and "post-unseal setup complete" in line:
                    return when
        return None

    def addresses(self):
        return [n["addr"] for n in self.nodes]

    def stop(self):
        for n in self.nodes:
            if n["proc"]:
                n["proc"].kill()
                n["proc"].wait()


def toml_list(addrs):
    return "[" + ", ".join(f'"{a}"' for a in addrs) + "]"


def write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return path


def successes(log_path):
    with open(log_path) as f:
        return [t for t in (log_time(l) for l in f if "pass finished" in l and "exit_code=0" in l)
                if t]


def sidecar_last_success(port):
    code, body = http_status(f"http://127.0.0.1:{port}/metrics")
    if code != 200:
        return None
    m = re.search(r"^keyroll_sidecar_last_success_timestamp_seconds (\S+)$", body, re.M)
    return float(m.group(1)) if m else None


def count_requests(log_text):
    """Requests keyroll sent to Vault: every attempt ("vault request") and health probe."""
    return sum(1 for l in log_text.splitlines()
               if "vault request" in l or "vault probe" in l)


def main():
    for b in (KEYROLL, SIDECAR, BAO):
        if not os.path.exists(b):
            raise SystemExit(f"missing {b}")
    work = tempfile.mkdtemp(prefix="keyroll-ha-")
    cluster = Cluster(work)
    procs = []
    try:
        cluster.start()
        addrs = cluster.addresses()
        env = dict(PATH=os.environ["PATH"], VAULT_TOKEN=cluster.token)
        keys = [f"ha-{i}" for i in range(4)]
        policy = write(os.path.join(work, "policy.toml"),
                       f"[vault]\naddress = {toml_list(addrs)}\ntimeout = \"5s\"\n" + "".join(
                           f'[[keys]]\nname = "{k}"\ntype = "aes256-gcm96"\nexportable = true\n'
                           f'rotate_every = "2s"\n' for k in keys))
        run_log = os.path.join(work, "run.log")
        procs.append(subprocess.Popen(
            [KEYROLL, "-c", policy, "run", "--interval", f"{INTERVAL}s"], env=env,
            stdout=subprocess.DEVNULL, stderr=open(run_log, "w")))
        deadline = time.time() + 60
        while len(successes(run_log)) < 2 and time.time() < deadline:
            time.sleep(0.1)
        out = os.path.join(work, "out")
        sport = free_port()
        sc_cfg = write(os.path.join(work, "sidecar.toml"),
                       f'output_dir = "{out}"\npoll_interval = "{INTERVAL}s"\npoll_jitter = "0%"\n'
                       f'[listen]\naddress = "127.0.0.1:{sport}"\n'
                       f"[vault]\naddress = {toml_list(addrs)}\ntimeout = \"5s\"\n" + "".join(
                           f'[[keys]]\nname = "{k}"\nformat = "keyring-json"\n' for k in keys))
        procs.append(subprocess.Popen([SIDECAR, "-c", sc_cfg], env=env,
                                      stdout=subprocess.DEVNULL,
                                      stderr=open(os.path.join(work, "sidecar.log"), "w")))
        while sidecar_last_success(sport) is None and time.time() < deadline:
            time.sleep(0.1)

        rows = []
        for k in range(KILLS):
            time.sleep(5)
            leader = cluster.leader()
            t_kill = time.time()
            cluster.kill(leader)
            first_sc = None
            end = time.time() + 90
            while time.time() < end:
                s = sidecar_last_success(sport)
                if first_sc is None and s and s > t_kill + 0.05:
                    first_sc = s
                new = cluster.leader()
                after = [t for t in successes(run_log) if t > t_kill + 0.05]
                if new is not None and first_sc and after:
                    break
                time.sleep(0.05)
            new = cluster.wait_active()
            elected = cluster.became_active_after(new, t_kill)
            after = [t for t in successes(run_log) if t > t_kill + 0.05]
            row = {
                "election": elected - t_kill if elected else float("nan"),
                "keyroll": after[0] - t_kill if after else float("nan"),
                "sidecar": first_sc - t_kill if first_sc else float("nan"),
            }
            rows.append(row)
            print(f"kill {k + 1}: n{leader} -> n{new}: election {row['election']:.2f} s, "
                  f"keyroll run {row['keyroll']:.2f} s, sidecar {row['sidecar']:.2f} s",
                  flush=True)
            if not after:
                # No good pass within the window: show why (warnings and errors since the kill).
                with open(run_log) as f:
                    for line in f:
                        t = log_time(line)
                        if t and t > t_kill and ("WARN" in line or "ERROR" in line):
                            print("   ", ANSI.sub("", line.rstrip())[:300])
            cluster.spawn(leader)
            cluster.unseal(leader)
            # Back as a voter before the next kill, or the cluster cannot elect again.
            time.sleep(3)

        med = {c: statistics.median(r[c] for r in rows) for c in ("election", "keyroll", "sidecar")}
        print(f"median over {KILLS} leader kills (performance_multiplier {PERF_MULT}, interval "
              f"{INTERVAL:g} s): election {med['election']:.2f} s, first successful keyroll pass "
              f"{med['keyroll']:.2f} s, first successful sidecar poll {med['sidecar']:.2f} s; "
              f"bound election + interval = {med['election'] + INTERVAL:.2f} s")
        for p in procs:
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=30)
        procs = []

        # Steady state: Vault requests per no-op `keyroll run` pass and per sidecar poll (after
        # start-up), and per one-shot `keyroll apply` (start-up included), three addresses vs one.
        leader = cluster.leader()
        n_keys = 10
        quiet = "".join(f'[[keys]]\nname = "quiet-{i}"\ntype = "aes256-gcm96"\n'
                        f'exportable = true\nrotate_every = "30d"\n' for i in range(n_keys))
        results = {}
        for label, a in (("three", addrs), ("one", [addrs[leader]])):
            p = write(os.path.join(work, f"quiet-{label}.toml"),
                      f"[vault]\naddress = {toml_list(a)}\n" + quiet)
            subprocess.run([KEYROLL, "-c", p, "apply"], env=env, capture_output=True, check=True)
            r = subprocess.run([KEYROLL, "-c", p, "--log-level", "keyroll=trace", "apply"],
                               env=env, capture_output=True, text=True, check=True)
            one_shot = count_requests(r.stderr)
            log = os.path.join(work, f"run-{label}.log")
            d = subprocess.Popen([KEYROLL, "-c", p, "--log-level", "keyroll=trace", "run",
                                  "--interval", "1s"], env=env, stdout=subprocess.DEVNULL,
                                 stderr=open(log, "w"))
            while True:
                with open(log) as f:
                    text = f.read()
                if text.count("pass finished") >= 7:
                    break
                time.sleep(0.2)
            d.send_signal(signal.SIGTERM)
            d.wait(timeout=30)
            # Requests logged after the 2nd pass finished up to the 7th: five whole passes.
            lines = text.splitlines()
            ends = [i for i, l in enumerate(lines) if "pass finished" in l]
            per_pass = count_requests("\n".join(lines[ends[1] + 1:ends[6] + 1])) / 5
            sc_out = os.path.join(work, f"out-{label}")
            sp = free_port()
            c = write(os.path.join(work, f"sc-{label}.toml"),
                      f'output_dir = "{sc_out}"\npoll_interval = "1s"\npoll_jitter = "0%"\n'
                      f'[listen]\naddress = "127.0.0.1:{sp}"\n'
                      f"[vault]\naddress = {toml_list(a)}\n" + "".join(
                          f'[[keys]]\nname = "quiet-{i}"\nformat = "keyring-json"\n'
                          for i in range(n_keys)))
            log = os.path.join(work, f"sc-{label}.log")
            sc = subprocess.Popen([SIDECAR, "-c", c, "--log-level", "keyroll=trace"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=open(log, "w"))
            while sidecar_last_success(sp) is None:
                time.sleep(0.1)
            time.sleep(0.5)
            with open(log) as f:
                before = count_requests(f.read())
            passes_before = sidecar_passes(sp)
            time.sleep(10)
            with open(log) as f:
                after = count_requests(f.read())
            polls = sidecar_passes(sp) - passes_before
            sc.send_signal(signal.SIGTERM)
            sc.wait(timeout=30)
            results[label] = (per_pass, (after - before) / max(polls, 1), one_shot)
        t, o = results["three"], results["one"]
        print(f"steady state, {n_keys} keys, three addresses vs one: Vault requests per "
              f"keyroll run pass {t[0]:.1f} vs {o[0]:.1f} ({t[0] / o[0]:.2f}x); per sidecar poll "
              f"{t[1]:.1f} vs {o[1]:.1f} ({t[1] / o[1]:.2f}x); one-shot keyroll apply including "
              f"start-up {t[2]} vs {o[2]} (the active node listed {'first' if leader == 0 else 'not first'})")
    finally:
        for p in procs:
            p.kill()
        cluster.stop()
        if os.environ.get("KEEP"):
            print(f"logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def sidecar_passes(port):
    code, body = http_status(f"http://127.0.0.1:{port}/metrics")
    m = re.search(r"^keyroll_sidecar_passes_total (\S+)$", body, re.M)
    return float(m.group(1)) if m else 0.0


if __name__ == "__main__":
    sys.exit(main())
