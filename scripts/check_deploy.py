"""Checks that the deployment files agree with each other and with the server.

Schemas say whether each file is well formed; this says whether they fit
together: the Kubernetes config file holds only keys the server knows, the
grace periods cover the drain, the probes hit the right routes, nginx's body
limit is the server's, compose's nginx reaches compose's replicas, the image
bundles the model the binary looks for. Run by scripts/check-deploy.sh (it
needs PyYAML, which that script's environment has).
"""

import re
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
failures = []
passed = 0


def check(ok, what):
    global passed
    if ok:
        passed += 1
    else:
        failures.append(what)


def seconds(text):
    """Compose durations such as '40s', '1m30s' or '90'."""
    total, rest = 0, str(text)
    for value, unit in re.findall(r"(\d+)([hms]?)", rest):
        total += int(value) * {"h": 3600, "m": 60, "s": 1, "": 1}[unit]
    return total


defaults = tomllib.loads((ROOT / "config/default.toml").read_text())
drain_default = defaults["server"]["drain_timeout_secs"]

# Kubernetes: the ConfigMap's config file is one the server accepts.
k8s = ROOT / "docker/kubernetes"
configmap = yaml.safe_load((k8s / "configmap.yaml").read_text())
config = tomllib.loads(configmap["data"]["config.toml"])
for section, keys in config.items():
    check(section in defaults, f"configmap.yaml: unknown section [{section}]")
    for key, value in keys.items():
        known = defaults.get(section, {})
        check(key in known, f"configmap.yaml: unknown key {section}.{key}")
        if key in known:
            check(type(value) is type(known[key]), f"configmap.yaml: {section}.{key} should be a {type(known[key]).__name__}")
port = config.get("server", {}).get("port", defaults["server"]["port"])
drain = config.get("server", {}).get("drain_timeout_secs", drain_default)

deployment = yaml.safe_load((k8s / "deployment.yaml").read_text())
pod = deployment["spec"]["template"]["spec"]
container = pod["containers"][0]
mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
config_volume = next(v["name"] for v in pod["volumes"] if v.get("configMap", {}).get("name") == configmap["metadata"]["name"])
args = container["args"]
check("--config" in args, "deployment.yaml: the server is not given --config")
if "--config" in args:
    given = args[args.index("--config") + 1]
    check(given == f"{mounts[config_volume]}/config.toml", f"deployment.yaml: --config {given} is not the mounted ConfigMap's file")
ports = {p["name"]: p["containerPort"] for p in container["ports"]}
check(ports.get("http") == port, f"deployment.yaml: containerPort {ports.get('http')} is not the configured port {port}")
check(container["readinessProbe"]["httpGet"]["path"] == "/ready", "deployment.yaml: readiness must probe /ready")
check(container["livenessProbe"]["httpGet"]["path"] == "/health", "deployment.yaml: liveness must probe /health")
check(container["startupProbe"]["httpGet"]["path"] == "/health", "deployment.yaml: the startup probe must probe /health")
pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
sleep = int(pre_stop[1]) if pre_stop[0] == "sleep" else 0
grace = pod["terminationGracePeriodSeconds"]
# The server closes lingering connections 3 s after the drain; keep a margin.
check(grace >= sleep + drain + 5, f"deployment.yaml: terminationGracePeriodSeconds {grace} < preStop {sleep} + drain {drain} + 5")
check(container["resources"]["limits"].get("nvidia.com/gpu") == 1, "deployment.yaml: one GPU per pod")

for service in yaml.safe_load_all((k8s / "service.yaml").read_text()):
    for p in service["spec"]["ports"]:
        check(p["targetPort"] in ports, f"service.yaml: {service['metadata']['name']} targets unknown port {p['targetPort']}")

hpa = yaml.safe_load((k8s / "hpa.yaml").read_text())
metrics_source = (ROOT / "src/metrics.rs").read_text()
for m in hpa["spec"]["metrics"]:
    name = m["pods"]["metric"]["name"]
    check(f'"{name}"' in metrics_source, f"hpa.yaml: the server exports no metric {name}")

kustomization = yaml.safe_load((k8s / "kustomization.yaml").read_text())
for r in kustomization["resources"]:
    check((k8s / r).exists(), f"kustomization.yaml: {r} does not exist")

# nginx: the body limit is the server's.
nginx = (ROOT / "docker/nginx.conf").read_text()
limit = re.search(r"client_max_body_size\s+(\d+)([km]?);", nginx)
size = int(limit.group(1)) * {"": 1, "k": 1024, "m": 1024 * 1024}[limit.group(2)] if limit else None
check(size == defaults["server"]["max_body_bytes"], f"nginx.conf: client_max_body_size {size} is not server.max_body_bytes")
template = re.search(r"# BEGIN upstream servers\s*\n\s*server\s+([\w.-]+):(\d+)\s", nginx)
check(template is not None, "nginx.conf: no server line between the upstream markers")

# Compose: nginx reaches the replicas, and stopping lets them drain.
compose = yaml.safe_load((ROOT / "docker/compose.yaml").read_text())
services = compose["services"]
if template:
    host, upstream_port = template.group(1), int(template.group(2))
    check(host in services, f"nginx.conf: upstream {host} is not a compose service")
    check(upstream_port == defaults["server"]["port"], f"nginx.conf: upstream port {upstream_port} is not the server's")
check(
    any(v.startswith("./nginx.conf:/etc/nginx/conf.d/") for v in services["nginx"]["volumes"]),
    "compose.yaml: nginx does not mount nginx.conf into conf.d",
)
replica = services[template.group(1)] if template and template.group(1) in services else {}
env_drain = int(replica.get("environment", {}).get("MAMBA_SERVE_SERVER_DRAIN_TIMEOUT_SECS", drain_default))
stop = seconds(replica.get("stop_grace_period", "10s"))
check(stop >= env_drain + 5, f"compose.yaml: stop_grace_period {stop}s < drain {env_drain}s + 5")

# The CPU overlay (it uses compose's !reset tag) overrides a service that exists.
class ComposeLoader(yaml.SafeLoader):
    pass


ComposeLoader.add_constructor("!reset", lambda loader, node: None)
overlay = yaml.load((ROOT / "docker/compose.cpu.yaml").read_text(), Loader=ComposeLoader)
for name in overlay["services"]:
    check(name in services, f"compose.cpu.yaml: overrides unknown service {name}")

# The image bundles the model the binary looks for, and the context sends it.
default_model = re.search(r'DEFAULT_MODEL_DIR: &str = "([^"]+)"', (ROOT / "src/lib.rs").read_text()).group(1)
check(f"COPY {default_model} " in (ROOT / "docker/Dockerfile").read_text(), f"Dockerfile: does not COPY {default_model}")
check(f"!{default_model}" in (ROOT / ".dockerignore").read_text(), f".dockerignore: does not let {default_model} through")

for f in failures:
    print(f"check_deploy: {f}", file=sys.stderr)
print(f"deploy consistency: {passed} passed, {len(failures)} failed")
sys.exit(1 if failures else 0)
