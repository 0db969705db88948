#!/usr/bin/env bash
# scripts/check-deploy.sh — validates every deployment file without a container engine:
#
#   docker-compose.yml        `docker-compose config -q` (Debian's docker-compose: schema + interpolation)
#   Dockerfiles               hadolint (settings in .hadolint.yaml)
#   shell scripts             shellcheck
#   YAML under deploy/        parsed; Kubernetes manifests validated against the API schemas
#                             (kubernetes-validate --strict, schemas shipped in the wheel)
#   systemd units             systemd-analyze verify; any warning fails
#   TOML under deploy/        parsed; keyroll policies checked by `keyroll validate`
#   Vault policies            parsed by `bao policy fmt` (their effect is tested in tests/deploy_policies.rs)
#
# The Python tools come from deploy/requirements.txt, installed into .venv-deploy on first use.
# Exit status: 0 when everything passed; 1 with a list of what failed.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 1
VENV=${KEYROLL_DEPLOY_VENV:-$REPO/.venv-deploy}
BIN=${KEYROLL_BIN_DIR:-${CARGO_TARGET_DIR:-$REPO/target}/debug}
K8S_VERSION=${K8S_VERSION:-1.30.0}
failed=()
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
ok() { printf 'ok: %s\n' "$*"; }
fail() {
  printf 'FAILED: %s\n' "$*" >&2
  failed+=("$*")
}

step "tools (deploy/requirements.txt -> $VENV)"
if ! "$VENV/bin/python" -c 'import yaml, kubernetes_validate' 2>/dev/null ||
  [ ! -x "$VENV/bin/hadolint" ] || [ ! -x "$VENV/bin/shellcheck" ]; then
  if ! { python3 -m venv "$VENV" && "$VENV/bin/pip" install --quiet -r deploy/requirements.txt; }; then
    echo "cannot install deploy/requirements.txt into $VENV" >&2
    exit 1
  fi
fi
ok "$("$VENV/bin/hadolint" --version), shellcheck $("$VENV/bin/shellcheck" --version | sed -n 's/^version: //p'), kubernetes-validate $("$VENV/bin/kubernetes-validate" --version 2>&1 | tail -n1)"

step "docker-compose.yml"
if command -v docker-compose >/dev/null; then
  compose=(docker-compose)
elif docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
else
  compose=()
  fail "no docker-compose to validate docker-compose.yml with (apt-get install docker-compose)"
fi
if [ ${#compose[@]} -gt 0 ]; then
  if "${compose[@]}" -f docker-compose.yml config -q; then ok "docker-compose.yml (${compose[*]} config)"; else fail "docker-compose.yml"; fi
  # Every file the stack mounts or builds from must exist.
  for f in deploy/compose/init.sh deploy/compose/keyroll/policy.toml deploy/compose/sidecar/sidecar.toml \
    deploy/compose/mailer/Dockerfile deploy/vault/keyroll-rotator.hcl deploy/vault/keyroll-sidecar.hcl; do
    [ -f "$f" ] || fail "docker-compose.yml refers to missing $f"
  done
fi

step "Dockerfiles (hadolint)"
for f in Dockerfile deploy/compose/mailer/Dockerfile; do
  if "$VENV/bin/hadolint" "$f"; then ok "$f"; else fail "hadolint $f"; fi
done

step "shell scripts (shellcheck)"
scripts=(scripts/check-deploy.sh scripts/stack.sh deploy/compose/init.sh deploy/compose/mailer/entrypoint.sh)
if "$VENV/bin/shellcheck" "${scripts[@]}"; then ok "${scripts[*]}"; else fail "shellcheck"; fi

step "YAML"
mapfile -t yamls < <(find deploy -name '*.yaml' -o -name '*.yml' | sort)
if "$VENV/bin/python" - docker-compose.yml "${yamls[@]}" <<'PY'; then ok "parsed docker-compose.yml ${yamls[*]}"; else fail "YAML parse"; fi
import sys, yaml
bad = 0
for path in sys.argv[1:]:
    try:
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d is not None]
        if not docs:
            raise ValueError("no documents")
    except Exception as e:
        print(f"{path}: {e}", file=sys.stderr)
        bad += 1
sys.exit(1 if bad else 0)
PY
for f in deploy/kubernetes/*.yaml; do
  if "$VENV/bin/kubernetes-validate" --quiet --strict -k "$K8S_VERSION" "$f"; then
    ok "$f (Kubernetes $K8S_VERSION schemas, strict)"
  else
    fail "kubernetes-validate $f"
  fi
done

step "systemd units"
if command -v systemd-analyze >/dev/null; then
  # verify insists that ExecStart binaries exist; check the units with a stand-in for them.
  for f in deploy/systemd/*.service; do
    sed 's|/usr/local/bin/keyroll[a-z-]*|/bin/true|g' "$f" >"$tmp/$(basename "$f")"
  done
  out=$(cd "$tmp" && systemd-analyze verify ./*.service 2>&1)
  if [ -z "$out" ]; then ok "$(printf '%s ' deploy/systemd/*.service)"; else
    printf '%s\n' "$out" >&2
    fail "systemd-analyze verify"
  fi
else
  echo "systemd-analyze not installed: units not verified"
fi

step "TOML and keyroll policies"
mapfile -t tomls < <(find deploy -name '*.toml' | sort)
if "$VENV/bin/python" - "${tomls[@]}" <<'PY'; then ok "parsed ${tomls[*]}"; else fail "TOML parse"; fi
import sys, tomllib
bad = 0
for path in sys.argv[1:]:
    try:
        with open(path, "rb") as f:
            tomllib.load(f)
    except Exception as e:
        print(f"{path}: {e}", file=sys.stderr)
        bad += 1
sys.exit(1 if bad else 0)
PY
# The policy inside the Kubernetes ConfigMap, too.
"$VENV/bin/python" - "$tmp/k8s-policy.toml" <<'PY' || fail "extracting policy.toml from deploy/kubernetes/keyroll-rotator.yaml"
import sys, yaml
for d in yaml.safe_load_all(open("deploy/kubernetes/keyroll-rotator.yaml")):
    if d and d.get("kind") == "ConfigMap" and "policy.toml" in d.get("data", {}):
        open(sys.argv[1], "w").write(d["data"]["policy.toml"])
        break
else:
    sys.exit("no ConfigMap with policy.toml")
PY
if [ -x "$BIN/keyroll" ]; then
  for p in deploy/compose/keyroll/policy.toml "$tmp/k8s-policy.toml"; do
    if "$BIN/keyroll" -c "$p" validate; then ok "keyroll validate $p"; else fail "keyroll validate $p"; fi
  done
else
  echo "no $BIN/keyroll (cargo build --workspace --bins): policies parsed as TOML only"
fi

step "Vault policies"
BAO=${KEYROLL_BAO_BIN:-$REPO/.venv/bin/bao}
if [ -x "$BAO" ]; then
  for f in deploy/vault/*.hcl; do
    cp "$f" "$tmp/policy.hcl"
    if HOME=$tmp "$BAO" policy fmt "$tmp/policy.hcl" >/dev/null; then ok "$f parses"; else fail "bao policy fmt $f"; fi
  done
else
  echo "no $BAO: Vault policies not parsed here (tests/deploy_policies.rs loads them into OpenBao)"
fi

echo
if [ ${#failed[@]} -gt 0 ]; then
  printf 'check-deploy: %d failed:\n' "${#failed[@]}" >&2
  printf '  - %s\n' "${failed[@]}" >&2
  exit 1
fi
echo "check-deploy: all deployment files valid"
