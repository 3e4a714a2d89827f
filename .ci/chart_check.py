"""The chart check behind .ci/chart-check (run it through that script: it makes the venv).

Helm itself does the linting, the values schema validation and the rendering (helm-python-sdk
binds Helm's Go SDK); this file only assembles the rendered files into one stream the way
`helm template` does, compares it with manifests/install.yaml, and validates objects with
kubernetes-validate's OpenAPI schemas.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
import tomllib
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import promql_parser
import yaml

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "charts" / "cachevol"
MANIFESTS = REPO / "manifests"
# One example per CI system (README, "Use it from your CI"); tests/examples.rs parses their
# caches with the driver's own parser, this file validates their Kubernetes objects.
EXAMPLES = REPO / "examples"
INSTALL = MANIFESTS / "install.yaml"
README = REPO / "README.md"
DASHBOARD = CHART / "dashboards" / "cachevol.json"
# Grafana's variables in the dashboard's queries, replaced by a value of their kind before the
# query is parsed as PromQL.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1d",
                     "$namespace": "cachevol"}
# The chart rendered with every branch on, for tests/chart_args.rs (flags that only appear when a
# value is set are not in install.yaml).
EVERYTHING_ON_RENDER = REPO / "target" / "chart-check" / "everything-on.yaml"
RELEASE, NAMESPACE = "cachevol", "cachevol"
# The Kubernetes version objects are validated against (kubernetes-validate ships 1.25-1.37).
KUBE_VERSION = "1.33.0"
# The default driver name; also the prefix of the claim annotations users write, which stays
# cachevol.dev/ whatever driver.name is.
DRIVER = "cachevol.dev"
# A second install beside the default one: another driver name, release and namespace.
CANARY_DRIVER, CANARY_RELEASE, CANARY_NAMESPACE = "canary.cachevol.dev", "b", "cachevol-canary"
CANARY = {"driver": {"name": CANARY_DRIVER}, "storageClass": {"name": "cachevol-canary"}}
# Objects without a namespace: two installs must not share one of these names.
CLUSTER_SCOPED = {"CSIDriver", "StorageClass", "ClusterRole", "ClusterRoleBinding",
                  "PriorityClass", "PersistentVolume", "Namespace", "CustomResourceDefinition",
                  "ValidatingWebhookConfiguration", "MutatingWebhookConfiguration",
                  "APIService", "IngressClass", "RuntimeClass", "VolumeAttributesClass"}

# Helm's install order (helm.sh/helm pkg/release/util/kind_sorter.go); kinds not listed come
# last, in alphabetical order, as Helm puts them.
INSTALL_ORDER = [
    "PriorityClass", "Namespace", "NetworkPolicy", "ResourceQuota", "LimitRange",
    "PodSecurityPolicy", "PodDisruptionBudget", "ServiceAccount", "Secret", "SecretList",
    "ConfigMap", "StorageClass", "PersistentVolume", "PersistentVolumeClaim",
    "CustomResourceDefinition", "ClusterRole", "ClusterRoleList", "ClusterRoleBinding",
    "ClusterRoleBindingList", "Role", "RoleList", "RoleBinding", "RoleBindingList", "Service",
    "DaemonSet", "Pod", "ReplicationController", "ReplicaSet", "Deployment",
    "HorizontalPodAutoscaler", "StatefulSet", "Job", "CronJob", "IngressClass", "Ingress",
    "APIService", "MutatingWebhookConfiguration", "ValidatingWebhookConfiguration",
]

# What users may set: claim annotations (cachevol.dev/<name>) and inline volumeAttributes.
# Never store or scope: only a StorageClass (an administrator) chooses those.
USER_ATTRIBUTES = {
    "key": None,
    "restore-keys": None,
    "mode": {"shared", "private", "locked"},
    "policy": {"pull-push", "pull", "push"},
    "commit-on": {"success", "marker", "always"},
    "merge": {"replace", "union"},
}
CLASS_PARAMETERS = {"store", "scope", "key", "restoreKeys", "restore-keys", "mode", "policy",
                    "commitOn", "commit-on", "merge"}

# Values that switch every template branch on, rendered and validated besides the defaults.
EVERYTHING_ON = {
    "image": {"digest": "sha256:" + "ab" * 32},
    "imagePullSecrets": [{"name": "regcred"}],
    "kubeletDir": "/var/lib/k0s/kubelet",
    "logLevel": "info,cachevol=debug",
    "logFormat": "json",
    "commonLabels": {"team": "platform", "example.com/cost-center": "ci"},
    "store": {
        "url": "s3://ci-caches/cluster-a",
        "credentials": {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": "secret",
                        "AWS_REGION": "eu-west-1", "AWS_ALLOW_HTTP": "true"},
    },
    "node": {
        "stateDir": "/mnt/fast/cachevol", "baseBudget": "50Gi", "copyViews": True,
        "leaseDuration": "30s", "nodeSelector": {"ci": "true"},
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [
                {"key": "kubernetes.io/os", "operator": "In", "values": ["linux"]}]}]}}},
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"},
                      "limits": {"memory": "1Gi"}},
        "podAnnotations": {"example.com/a": "b"}, "podLabels": {"team": "ci"},
        "serviceAccount": {"annotations": {
            "eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/cachevol"}},
        "extraArgs": ["--cluster=on"], "extraEnv": [{"name": "CACHEVOL_IO_CONCURRENCY",
                                                     "value": "8"}],
        "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "10%"}},
        "revisionHistoryLimit": 3,
    },
    "controller": {
        "replicas": 2, "gc": {"scopeBudget": "200Gi", "ttl": "0"},
        "tolerations": [{"key": "ci", "operator": "Exists", "effect": "NoSchedule"}],
        "priorityClassName": "", "podAnnotations": {"example.com/a": "b"},
        "extraArgs": ["--quiet"], "extraEnv": [{"name": "CACHEVOL_STORE_TIMEOUT",
                                                "value": "30"}],
    },
    "sidecars": {"provisioner": {"extraArgs": ["--v=5"]},
                 "livenessProbe": {"image": {"digest": "sha256:" + "cd" * 32}},
                 "nodeDriverRegistrar": {"httpPort": 9909}},
    "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
                "service": {"annotations": {"example.com/scrape": "true"}},
                "prometheusRule": {"enabled": True, "labels": {"release": "prometheus"},
                                   "staleAfter": "3d", "lockWaitFor": "45m"},
                "grafanaDashboard": {"enabled": True,
                                     "annotations": {"grafana_folder": "CI"}}},
    "storageClass": {"name": "ci-cache", "isDefaultClass": True,
                     "annotations": {"example.com/owner": "platform"},
                     "parameters": {"store": "gs://ci-caches/a", "scope": "cluster",
                                    "restoreKeys": "main, base", "mode": "shared",
                                    "policy": "pull", "commitOn": "always", "merge": "union"}},
}
# Another variant: an existing Secret, no StorageClass, no metrics Services.
EXISTING_SECRET = {
    "store": {"url": "az://caches/ci", "existingSecret": "azure-store"},
    "storageClass": {"create": False},
    "metrics": {"service": {"enabled": False}},
    "fullnameOverride": "cv",
    # RBAC and service accounts brought by the cluster's administrators.
    "rbac": {"create": False},
    "node": {"serviceAccount": {"create": False, "name": "ci-csi-node"}},
    "controller": {"serviceAccount": {"create": False, "name": "ci-csi-controller"}},
}
# An image built locally and loaded into the nodes (kind load, k3s/containerd import): never
# pulled, so the render must carry exactly this reference and policy.
LOCAL_IMAGE = {"image": {"repository": "localhost/cachevol", "tag": "dev", "pullPolicy": "Never"}}
# The published image by default: what a plain `helm install` pulls.
PUBLISHED_IMAGE = "ghcr.io/cachevol/cachevol"
# Values the schema must refuse (each with the reason it must).
BAD_VALUES = [
    ({"storageClass": {"parameters": {"mode": "exclusive"}}}, "mode enum"),
    ({"storageClass": {"parameters": {"policy": "push-pull"}}}, "policy enum"),
    ({"storageClass": {"parameters": {"commitOn": "never"}}}, "commitOn enum"),
    ({"storageClass": {"parameters": {"merge": "append"}}}, "merge enum"),
    ({"storageClass": {"parameters": {"scope": "a/b"}}}, "scope name"),
    ({"storageClass": {"reclaimPolicy": "Recycle"}}, "reclaimPolicy enum"),
    ({"store": {"url": "https://bucket.example.com"}}, "store scheme"),
    ({"store": {"url": "s3://AKIA:secret@bucket/p"}}, "credentials in the URL"),
    # The binary refuses these too (tests/store_urls.rs holds the whole corpus); here Helm's
    # own regex engine reads the pattern.
    ({"store": {"url": "file://relative/dir"}}, "file:// URL with a host, not an absolute path"),
    ({"store": {"url": "S3://bucket/p"}}, "uppercase scheme"),
    ({"storageClass": {"parameters": {"store": "s3://bucket/../p"}}}, "store path with .."),
    ({"storageClass": {"parameters": {"store": "az://my.container/p"}}}, "container with a dot"),
    ({"node": {"baseBudget": "lots"}}, "size"),
    ({"controller": {"gc": {"ttl": "forever"}}}, "duration"),
    ({"node": {"copyView": True}}, "misspelt value"),
    ({"metrics": {"port": 70000}}, "port range"),
    ({"image": {"digest": "latest"}}, "digest form"),
    ({"node": {"updateStrategy": {"type": "Recreate"}}}, "DaemonSet strategy"),
    ({"driver": {"name": "-canary.cachevol.dev"}}, "driver name begins with a dash"),
    ({"driver": {"name": "canary..cachevol.dev"}}, "driver name with an empty part"),
    ({"driver": {"name": "canary_cachevol.dev"}}, "driver name with an underscore"),
    ({"driver": {"name": "a" * 64}}, "driver name over 63 characters"),
    ({"node": {"stateDir": "var/lib/cachevol"}}, "relative state dir"),
    ({"logFormat": "yaml"}, "logFormat enum"),
    ({"commonLabels": {"app.kubernetes.io/name": "x"}}, "commonLabels naming a chart label"),
    ({"commonLabels": {"team": 1}}, "commonLabels value not a string"),
    ({"metrics": {"prometheusRule": {"staleAfter": "a week"}}}, "Prometheus duration"),
    ({"metrics": {"prometheusRule": {"lockWaitFor": "30"}}}, "duration without a unit"),
]


class Findings:
    def __init__(self) -> None:
        self.errors: list[str] = []
        self.checked = 0

    def ok(self) -> None:
        self.checked += 1

    def fail(self, what: str) -> None:
        self.checked += 1
        self.errors.append(what)


def render(chart: helm.Chart, values: dict | None, release: str = RELEASE,
           namespace: str = NAMESPACE) -> dict[str, str]:
    return chart.render(values, name=release, namespace=namespace, is_install=True)


def split_documents(text: str) -> list[str]:
    """Helm's releaseutil.SplitManifests: documents separated by `---` lines, empty ones out."""
    docs = re.split(r"(?:^|\s*\n)---\s*", text)
    return [d.strip() for d in docs if d.strip()]


def install_stream(rendered: dict[str, str]) -> str:
    """The rendered templates as `helm template` prints them: every document under a
    `# Source:` line, in Helm's install order (by kind, then by file, stable)."""
    docs = []
    for path in sorted(p for p in rendered if not p.endswith("NOTES.txt")):
        for doc in split_documents(rendered[path]):
            head = yaml.safe_load(doc)
            if not head:
                continue
            docs.append((path, doc, head.get("kind", "")))

    def order(item: tuple[str, str, str]) -> tuple[int, str]:
        kind = item[2]
        if kind in INSTALL_ORDER:
            return (INSTALL_ORDER.index(kind), "")
        return (len(INSTALL_ORDER), kind)

    docs.sort(key=order)
    header = (
        "# cachevol: the Helm chart charts/cachevol rendered with its default values (release\n"
        f"# {RELEASE!r}, namespace {NAMESPACE!r}). Generated by `.ci/chart-check --update`; do\n"
        "# not edit. Create the namespace first: kubectl create namespace cachevol\n"
    )
    return header + "".join(f"---\n# Source: {p}\n{d}\n" for p, d, _ in docs)


def objects(stream: str) -> list[dict]:
    return [o for o in yaml.safe_load_all(stream) if o]


def validate_object(obj: dict, where: str, f: Findings) -> None:
    kind, api = obj.get("kind"), obj.get("apiVersion", "")
    name = f"{where}: {kind}/{obj.get('metadata', {}).get('name')}"
    if api.startswith("monitoring.coreos.com/"):
        # A CRD: kubernetes-validate has no schema for it; check what the chart relies on.
        spec = obj.get("spec", {})
        eps = spec.get("endpoints") or []
        rules = [r for g in spec.get("groups") or [] for r in g.get("rules") or []]
        if (kind == "ServiceMonitor" and api == "monitoring.coreos.com/v1"
                and spec.get("selector", {}).get("matchLabels")
                and eps and all(e.get("port") == "metrics" for e in eps)):
            f.ok()
        elif (kind == "PrometheusRule" and api == "monitoring.coreos.com/v1" and rules
              and all(set(r) <= {"alert", "expr", "for", "labels", "annotations"}
                      and r.get("alert") and isinstance(r.get("expr"), str)
                      and r["labels"].get("severity") for r in rules)):
            f.ok()
        else:
            f.fail(f"{name}: not the {kind} expected (structural check)")
        return
    try:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        f.ok()
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.path)
        f.fail(f"{name}: {path}: {e.message}")
    except kubernetes_validate.SchemaNotFoundError as e:
        f.fail(f"{name}: no schema ({e.message})")


def pod_specs(obj: dict) -> list[dict]:
    """Pod specs inside a workload object."""
    spec = obj.get("spec", {})
    kind = obj.get("kind")
    if kind == "Pod":
        return [spec]
    if kind == "CronJob":
        return [spec["jobTemplate"]["spec"]["template"]["spec"]]
    if "template" in spec:
        return [spec["template"]["spec"]]
    return []


def check_user_attributes(attrs: dict, where: str, f: Findings, inline: bool) -> None:
    for name, value in attrs.items():
        if name not in USER_ATTRIBUTES:
            f.fail(f"{where}: {name!r} is not an attribute users may set")
            continue
        allowed = USER_ATTRIBUTES[name]
        if allowed is not None and value not in allowed:
            f.fail(f"{where}: {name}={value!r} is not one of {sorted(allowed)}")
            continue
        f.ok()
    if inline and "key" not in attrs:
        f.fail(f"{where}: an inline cachevol volume needs volumeAttributes.key")


def check_cachevol_usage(obj: dict, where: str, f: Findings) -> None:
    """The cachevol.dev/* annotations of claims and the attributes of inline volumes."""
    kind = obj.get("kind")
    if kind == "StorageClass" and obj.get("provisioner") == DRIVER:
        for p in obj.get("parameters", {}):
            (f.ok if p in CLASS_PARAMETERS or p.startswith("csi.storage.k8s.io/")
             else lambda: f.fail(f"{where}: unknown StorageClass parameter {p!r}"))()
    claims = []
    if kind == "PersistentVolumeClaim":
        claims.append((obj.get("metadata", {}),
                       f"{where}: PersistentVolumeClaim/{obj['metadata']['name']}"))
    for spec in pod_specs(obj):
        for v in spec.get("volumes", []):
            if "csi" in v and v["csi"].get("driver") == DRIVER:
                check_user_attributes(v["csi"].get("volumeAttributes", {}),
                                      f"{where} volume {v['name']}", f, inline=True)
            if "ephemeral" in v:
                claims.append((v["ephemeral"]["volumeClaimTemplate"].get("metadata", {}),
                               f"{where} volume {v['name']}"))
    for meta, w in claims:
        attrs = {k.split("/", 1)[1]: val for k, val in (meta.get("annotations") or {}).items()
                 if k.startswith(DRIVER + "/")}
        check_user_attributes(attrs, w, f, inline=False)


def check_promql(expr: str, where: str, f: Findings) -> None:
    """`expr` parses as PromQL (which metrics it names is tests/dashboards.rs's to check)."""
    for var, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(var, value)
    try:
        promql_parser.parse(expr)
        f.ok()
    except ValueError as e:
        f.fail(f"{where}: not PromQL ({e}): {expr}")


def check_dashboard(f: Findings) -> None:
    """The Grafana dashboard: JSON, every query PromQL, on the dashboard's data source
    variable, panel ids unique and panels inside Grafana's 24-column grid."""
    try:
        dash = json.loads(DASHBOARD.read_text())
    except json.JSONDecodeError as e:
        f.fail(f"{DASHBOARD.relative_to(REPO)}: not JSON: {e}")
        return
    where = str(DASHBOARD.relative_to(REPO))
    variables = {v["name"]: v for v in dash.get("templating", {}).get("list", [])}
    (f.ok if variables.get("datasource", {}).get("type") == "datasource"
     else lambda: f.fail(f"{where}: no datasource variable"))()
    panels = dash.get("panels", [])
    ids = [p["id"] for p in panels]
    (f.ok if len(ids) == len(set(ids)) else lambda: f.fail(f"{where}: panel ids repeat"))()
    queries = 0
    for p in panels:
        g = p["gridPos"]
        (f.ok if g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24
         else lambda p=p: f.fail(f"{where}: panel {p['title']!r} leaves the grid"))()
        for t in p.get("targets", []):
            queries += 1
            (f.ok if t.get("datasource", {}).get("uid") == "${datasource}"
             else lambda p=p: f.fail(f"{where}: panel {p['title']!r} has another data source"))()
            check_promql(t["expr"], f"{where}: panel {p['title']!r}", f)
    (f.ok if queries else lambda: f.fail(f"{where}: no queries"))()


def flatten(values: dict, prefix: str = "") -> list[str]:
    """Leaf paths of a values tree (an empty map or a list is a leaf)."""
    out = []
    for k, v in values.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out += flatten(v, path + ".")
        else:
            out.append(path)
    return out


def check_chart(update: bool, f: Findings) -> None:
    report = helm.lint(str(CHART), strict=True, namespace=NAMESPACE,
                       kube_version="v" + KUBE_VERSION)
    for m in report.get("messages", []):
        if m["severity"] >= 2:  # 2 warning, 3 error; 1 is info ("icon is recommended")
            f.fail(f"helm lint: {m['path']}: {m['error']}")
    for e in report.get("errors", []):
        f.fail(f"helm lint: {e}")
    f.ok()

    with helm.Chart.load(str(CHART)) as chart:
        chart.validate_schema(None)
        f.ok()
        for bad, why in BAD_VALUES:
            try:
                chart.validate_schema(bad)
                f.fail(f"values.schema.json accepts {bad} ({why})")
            except helm.HelmValuesError:
                f.ok()

        default = render(chart, None)
        stream = install_stream(default)
        if update:
            INSTALL.write_text(stream)
            print(f"wrote {INSTALL.relative_to(REPO)}")
        committed = INSTALL.read_text() if INSTALL.exists() else ""
        if committed != stream:
            diff = "".join(difflib.unified_diff(
                committed.splitlines(True), stream.splitlines(True),
                "manifests/install.yaml (committed)", "manifests/install.yaml (rendered)", n=2))
            f.fail("manifests/install.yaml differs from the chart rendered with default values; "
                   "run .ci/chart-check --update and commit it:\n" + diff[:6000])
        else:
            f.ok()
        notes = default.get("cachevol/templates/NOTES.txt", "")
        (f.ok if "file:///var/lib/cachevol/store" in notes
         else lambda: f.fail("NOTES.txt does not warn about the per-node file:// store"))()

        for label, values in (("defaults", None), ("everything on", EVERYTHING_ON),
                              ("existing secret", EXISTING_SECRET),
                              ("local image", LOCAL_IMAGE), ("canary driver", CANARY)):
            chart.validate_schema(values)
            rendered = render(chart, values)
            stream = install_stream(rendered)
            if values is EVERYTHING_ON:
                EVERYTHING_ON_RENDER.parent.mkdir(parents=True, exist_ok=True)
                EVERYTHING_ON_RENDER.write_text(stream)
            objs = objects(stream)
            for o in objs:
                validate_object(o, f"render ({label})", f)
                check_cachevol_usage(o, f"render ({label})", f)
            check_rendered(label, values or {}, objs, rendered, f)
        check_two_installs(chart, f)

        # Every value is documented: its dotted path appears in README.md.
        readme = README.read_text()
        # A map such as node.resources may be documented as a whole.
        for path in flatten(chart.values):
            parts = path.split(".")
            shortest = min(2, len(parts))  # a top-level name only documents itself
            prefixes = [".".join(parts[:i]) for i in range(len(parts), shortest - 1, -1)]
            (f.ok if any(f"`{p}`" in readme for p in prefixes)
             else lambda p=path: f.fail(f"README.md does not document the value `{p}`"))()


def host_paths(objs: list[dict]) -> set[str]:
    return {v["hostPath"]["path"] for o in objs for spec in pod_specs(o)
            for v in spec.get("volumes", []) if "hostPath" in v}


def check_two_installs(chart: helm.Chart, f: Findings) -> None:
    """A second install (another driver.name, release and namespace) beside the default one
    shares no cluster-scoped object and no host directory with it. The Leases are the binary's
    (named after --driver-name, which check_rendered sees passed to both daemons); so are
    csi-provisioner's, which it names after the driver. With the same namespace, the namespaced
    objects differ too (every name starts with the release's)."""
    first = objects(install_stream(render(chart, None)))
    for namespace in (CANARY_NAMESPACE, NAMESPACE):
        where = f"two installs (second in namespace {namespace})"
        second = objects(install_stream(render(chart, CANARY, CANARY_RELEASE, namespace)))

        def names(objs: list[dict]) -> set[tuple[str, str, str]]:
            return {(o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"])
                    for o in objs}

        for o in first + second:
            scoped = o["kind"] in CLUSTER_SCOPED
            (f.ok if scoped != bool(o["metadata"].get("namespace"))
             else lambda o=o: f.fail(f"{where}: {o['kind']}/{o['metadata']['name']} "
                                     "namespace does not match its kind's scope"))()
        shared = names(first) & names(second)
        (f.ok if not shared else lambda: f.fail(f"{where}: both make {sorted(shared)}"))()
        # kubelet's own directories, which every CSI driver's node plugin mounts: its root (pod
        # volumes live under it) and plugins_registry (where registrars drop their sockets).
        kubelet_own = {"/var/lib/kubelet", "/var/lib/kubelet/plugins_registry"}
        both = (host_paths(first) & host_paths(second)) - kubelet_own
        (f.ok if not both else lambda: f.fail(f"{where}: both use host directories {both}"))()


def check_rendered(label: str, values: dict, objs: list[dict], rendered: dict[str, str],
                   f: Findings) -> None:
    """What the chart promises beyond schema validity."""
    by_kind: dict[str, list[dict]] = {}
    for o in objs:
        by_kind.setdefault(o["kind"], []).append(o)

    def expect(cond: bool, what: str) -> None:
        (f.ok if cond else lambda: f.fail(f"render ({label}): {what}"))()

    driver = values.get("driver", {}).get("name", DRIVER)
    drivers = by_kind.get("CSIDriver", [])
    expect(len(drivers) == 1 and drivers[0]["metadata"]["name"] == driver,
           f"one CSIDriver named {driver}")
    expect(bool(drivers) and drivers[0]["spec"].get("seLinuxMount") is True,
           "CSIDriver seLinuxMount: true")
    for sc in by_kind.get("StorageClass", []):
        expect(sc.get("provisioner") == driver, f"StorageClass provisioner {sc.get('provisioner')}")
    ds = by_kind["DaemonSet"][0]["spec"]["template"]["spec"]
    node = {c["name"]: c for c in ds["containers"]}
    expect(set(node) == {"cachevol", "node-driver-registrar", "liveness-probe"},
           f"node containers {sorted(node)}")
    expect(node["cachevol"]["securityContext"].get("privileged") is True,
           "node plugin privileged")
    kubelet = values.get("kubeletDir", "/var/lib/kubelet")
    expect(f"--kubelet-registration-path={kubelet}/plugins/{driver}/csi.sock"
           in node["node-driver-registrar"]["args"], "registration path under kubeletDir")
    node_paths = {v["name"]: v["hostPath"]["path"] for v in ds["volumes"] if "hostPath" in v}
    expect(node_paths.get("plugin-dir") == f"{kubelet}/plugins/{driver}",
           f"socket dir {node_paths.get('plugin-dir')}")
    # The default driver keeps /var/lib/cachevol, where earlier installs have their state.
    want_state = values.get("node", {}).get("stateDir") or (
        "/var/lib/cachevol" if driver == DRIVER else f"/var/lib/cachevol-{driver}")
    expect(node_paths.get("state-dir") == want_state,
           f"node state dir {node_paths.get('state-dir')}, want {want_state}")
    reg = node["node-driver-registrar"]
    expect(any(a.startswith("--http-endpoint=:") for a in reg["args"])
           and reg.get("livenessProbe", {}).get("httpGet", {}).get("path") == "/healthz",
           "node-driver-registrar serves /healthz and is probed")
    expect(ds.get("securityContext", {}).get("seccompProfile", {}).get("type") == "RuntimeDefault",
           "node pod: RuntimeDefault seccomp")
    for name in ("node-driver-registrar", "liveness-probe"):
        expect(node[name]["securityContext"].get("capabilities", {}).get("drop") == ["ALL"],
               f"{name} drops every capability")
    # Helm merges a user's map into the default one.
    want_selector = {"kubernetes.io/os": "linux", **values.get("node", {}).get("nodeSelector", {})}
    expect(ds.get("nodeSelector") == want_selector, f"node nodeSelector {ds.get('nodeSelector')}")
    mounts = {m["name"]: m for m in node["cachevol"]["volumeMounts"]}
    expect(mounts["kubelet-dir"]["mountPath"] == kubelet
           and mounts["kubelet-dir"].get("mountPropagation") == "Bidirectional",
           "kubelet dir at the same path, Bidirectional")
    expect(mounts["state-dir"].get("mountPropagation") == "Bidirectional",
           "state dir Bidirectional")
    expect(any(t.get("operator") == "Exists" and "key" not in t
               for t in ds.get("tolerations", [])), "node plugin tolerates every taint")
    dep = by_kind["Deployment"][0]["spec"]["template"]["spec"]
    expect(dep.get("nodeSelector") == {"kubernetes.io/os": "linux"}, "controller on Linux nodes")
    rbac = values.get("rbac", {}).get("create", True)
    expect(("ClusterRole" in by_kind) == rbac and ("RoleBinding" in by_kind) == rbac,
           f"RBAC objects rendered only with rbac.create ({rbac})")
    for comp, spec in (("node", ds), ("controller", dep)):
        sa = values.get(comp, {}).get("serviceAccount", {})
        want = sa.get("name") or f"{values.get('fullnameOverride') or RELEASE}-{comp}"
        expect(spec.get("serviceAccountName") == want,
               f"{comp} serviceAccountName {spec.get('serviceAccountName')}, want {want}")
        made = {o["metadata"]["name"] for o in by_kind.get("ServiceAccount", [])}
        expect((want in made) == sa.get("create", True), f"{comp} ServiceAccount made: {made}")
    ctl = {c["name"]: c for c in dep["containers"]}
    expect("--extra-create-metadata" in ctl["csi-provisioner"]["args"],
           "csi-provisioner --extra-create-metadata")
    # The cachevol image of both components, as image.* says: a digest wins over the tag, an
    # empty tag is the chart's appVersion (the release's published image by default).
    image = values.get("image", {})
    app_version = str(yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"])
    repo = image.get("repository", PUBLISHED_IMAGE)
    want_image = (f"{repo}@{image['digest']}" if image.get("digest")
                  else f"{repo}:{image.get('tag') or app_version}")
    if not image:
        expect(want_image == f"{PUBLISHED_IMAGE}:{app_version}", "defaults: the published image")
    for name, c in (("node", node["cachevol"]), ("controller", ctl["cachevol"])):
        expect(c["image"] == want_image, f"{name} image {c['image']}, want {want_image}")
        want_policy = image.get("pullPolicy", "IfNotPresent")
        expect(c.get("imagePullPolicy") == want_policy,
               f"{name} imagePullPolicy {c.get('imagePullPolicy')}, want {want_policy}")
    # The controller's containers keep their root file systems read-only; what cachevol writes
    # to is an emptyDir (a hostPath or a config volume would be the wrong thing to write to).
    for name, c in ctl.items():
        expect(c.get("securityContext", {}).get("readOnlyRootFilesystem") is True,
               f"controller container {name}: readOnlyRootFilesystem")
    dep_volumes = {v["name"]: v for v in dep.get("volumes", [])}
    for m in ctl["cachevol"].get("volumeMounts", []):
        if not m.get("readOnly"):
            expect("emptyDir" in dep_volumes.get(m["name"], {}),
                   f"controller writes to {m['mountPath']}, which is not an emptyDir")
    store_values = values.get("store") or {}
    fullname = values.get("fullnameOverride") or RELEASE  # the release name holds the chart's
    secret = store_values.get("existingSecret") or (
        f"{fullname}-store" if store_values.get("credentials") else None)
    for name, c in (("node", node["cachevol"]), ("controller", ctl["cachevol"])):
        refs = [e["secretRef"]["name"] for e in c.get("envFrom", [])]
        expect(refs == ([secret] if secret else []), f"{name} envFrom {refs}, want {secret}")
        store = store_values.get("url") or "file:///var/lib/cachevol/store"
        expect(f"--store={store}" in c["args"], f"{name} --store={store}")
        # GetPluginInfo's name, and what the binary names its Leases and lock label after.
        expect(f"--driver-name={driver}" in c["args"], f"{name} --driver-name={driver}")
    # commonLabels on every object and every pod; the log format passed to both daemons.
    common = values.get("commonLabels", {})
    for o in objs:
        labels = o["metadata"].get("labels") or {}
        expect(common.items() <= labels.items(),
               f"{o['kind']}/{o['metadata']['name']}: labels {labels} lack commonLabels")
        component = {"DaemonSet": "node", "Deployment": "controller"}.get(o["kind"])
        if component:
            # A component's podLabels win over commonLabels where both name a label.
            want = {**common, **values.get(component, {}).get("podLabels", {})}
            pod_labels = o["spec"]["template"]["metadata"].get("labels") or {}
            expect(want.items() <= pod_labels.items(),
                   f"{o['kind']}/{o['metadata']['name']}: pod labels {pod_labels}, want {want}")
    log_format = values.get("logFormat", "text")
    for name, c in (("node", node["cachevol"]), ("controller", ctl["cachevol"])):
        expect(f"--log-format={log_format}" in c["args"], f"{name} --log-format={log_format}")
    # The alerts and the dashboard: only when asked for, with the values they take.
    metrics = values.get("metrics", {})
    rule_values = metrics.get("prometheusRule", {})
    rules = by_kind.get("PrometheusRule", [])
    expect(len(rules) == (1 if rule_values.get("enabled") else 0),
           f"{len(rules)} PrometheusRules with prometheusRule.enabled={rule_values.get('enabled')}")
    for r in rules:
        exprs = {x["alert"]: x for g in r["spec"]["groups"] for x in g["rules"]}
        stale, wait = exprs.get("CachevolCachesStale"), exprs.get("CachevolLockWaitLong")
        expect(bool(stale) and f"[{rule_values['staleAfter']}]" in stale["expr"],
               f"CachevolCachesStale over staleAfter ({rule_values['staleAfter']})")
        expect(bool(wait) and wait.get("for") == rule_values["lockWaitFor"],
               f"CachevolLockWaitLong for lockWaitFor ({rule_values['lockWaitFor']})")
        expect(all(f'namespace="{NAMESPACE}"' in x["expr"] for x in exprs.values()),
               "every alert selects the release's namespace")
        for name, x in exprs.items():
            check_promql(x["expr"], f"render ({label}): alert {name}", f)
        expect(r["metadata"]["labels"].get("release") == rule_values["labels"]["release"],
               "PrometheusRule labels")
    dash_values = metrics.get("grafanaDashboard", {})
    dashboards = [c for c in by_kind.get("ConfigMap", []) if "cachevol.json" in c.get("data", {})]
    expect(len(dashboards) == (1 if dash_values.get("enabled") else 0),
           f"{len(dashboards)} dashboard ConfigMaps with "
           f"grafanaDashboard.enabled={dash_values.get('enabled')}")
    shipped = (CHART / "dashboards" / "cachevol.json").read_text()
    for c in dashboards:
        data = c["data"]["cachevol.json"]
        expect(json.loads(data) == json.loads(shipped),
               "the ConfigMap holds dashboards/cachevol.json")
        expect(c["metadata"]["labels"].get("grafana_dashboard") == "1",
               "the dashboard ConfigMap has the sidecar's label")
    if secret and not store_values.get("existingSecret"):
        expect(any(s["metadata"]["name"] == secret for s in by_kind.get("Secret", [])),
               "the chart makes the credentials Secret")
    else:
        expect("Secret" not in by_kind, "no Secret when there are no chart-made credentials")


def check_examples(f: Findings) -> None:
    claims: set[str] = set()
    # manifests/ first: its claims are what the runner examples may name.
    paths = [p for p in sorted(MANIFESTS.glob("*.yaml")) if p != INSTALL]
    paths += sorted(p for p in EXAMPLES.iterdir() if p.is_file())
    for path in paths:
        where = str(path.relative_to(REPO))
        if path.suffix == ".toml":
            check_gitlab(path.read_text(), where, claims, f)
            continue
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        if not docs:
            f.fail(f"{where}: empty")
        for doc in docs:
            api = doc.get("apiVersion", "")
            if api.startswith("tekton.dev/"):
                check_tekton(doc, docs, where, f)
            elif api.startswith("argoproj.io/"):
                check_argo(doc, where, f)
            elif "apiVersion" in doc and "kind" in doc:
                validate_object(doc, where, f)
                check_cachevol_usage(doc, where, f)
                for spec in pod_specs(doc):
                    check_mounts({"spec": spec}, where, f)
                if doc["kind"] == "PersistentVolumeClaim":
                    claims.add(doc["metadata"]["name"])
            elif "template" in doc and "spec" in doc["template"]:
                # A runner chart's values: its pod template, checked as a Pod.
                pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "runner"},
                       "spec": doc["template"]["spec"]}
                validate_object(pod, where + " (template)", f)
                check_cachevol_usage(pod, where + " (template)", f)
                check_mounts(pod, where + " (template)", f)
            elif "runners" in doc and "config" in doc["runners"]:
                check_gitlab(doc["runners"]["config"], where, claims, f)
            elif path.name == "gitlab-ci.yml":
                jobs = {k: v for k, v in doc.items() if isinstance(v, dict) and "script" in v}
                (f.ok if jobs and all(isinstance(j["script"], list) for j in jobs.values())
                 else lambda: f.fail(f"{where}: no GitLab job with a script list"))()
            else:
                f.fail(f"{where}: neither a Kubernetes object nor a known runner values file")


def as_pod(name: str, containers: list[dict], volumes: list[dict]) -> dict:
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
           "spec": {"containers": containers}}
    if volumes:
        pod["spec"]["volumes"] = volumes
    return pod


def check_mounts(pod: dict, where: str, f: Findings) -> None:
    """Every volumeMount names a volume of the pod (the API server checks that, the schemas
    do not)."""
    volumes = {v["name"] for v in pod["spec"].get("volumes", [])}
    for c in pod["spec"]["containers"]:
        for m in c.get("volumeMounts", []):
            (f.ok if m["name"] in volumes
             else lambda m=m, c=c: f.fail(f"{where}: container {c['name']} mounts "
                                          f"{m['name']}, which is no volume"))()


def check_tekton(doc: dict, docs: list[dict], where: str, f: Findings) -> None:
    """A Tekton Task (its steps as containers) or TaskRun (its workspace bindings: claim templates
    as claims, bound to the workspaces its Task declares). No schema for Tekton's CRDs here."""
    kind = doc.get("kind")
    name = f"{where}: {kind}/{doc.get('metadata', {}).get('name') or '(generated)'}"
    spec = doc.get("spec", {})
    if kind == "Task":
        # `script` is Tekton's own (it becomes the container's command); the rest is a Container.
        steps = [{k: v for k, v in s.items() if k != "script"} for s in spec.get("steps", [])]
        (f.ok if steps else lambda: f.fail(f"{name}: no steps"))()
        validate_object(as_pod("task", steps, []), name + " (steps as a Pod)", f)
        # $(workspaces.NAME.…) and $(params.NAME) name what the Task declares.
        declared = {"workspaces": {w["name"] for w in spec.get("workspaces", [])},
                    "params": {p["name"] for p in spec.get("params", [])}}
        refs = re.findall(r"\$\((workspaces|params)\.([A-Za-z0-9_-]+)", json.dumps(spec))
        for kind_, ref in refs:
            (f.ok if ref in declared[kind_]
             else lambda k=kind_, r=ref: f.fail(f"{name}: $({k}.{r}…) is not declared"))()
        return
    if kind != "TaskRun":
        f.fail(f"{name}: only Task and TaskRun are checked")
        return
    ref = spec.get("taskRef", {}).get("name")
    tasks = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "Task"}
    task = tasks.get(ref)
    if task is None:
        f.fail(f"{name}: taskRef {ref!r} is not a Task of the file")
        return
    declared = {w["name"] for w in task["spec"].get("workspaces", [])}
    bound = set()
    for w in spec.get("workspaces", []):
        bound.add(w["name"])
        if "volumeClaimTemplate" in w:
            tmpl = w["volumeClaimTemplate"]
            pvc = {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                   "metadata": {"name": w["name"], **tmpl.get("metadata", {})},
                   "spec": tmpl["spec"]}
            validate_object(pvc, f"{name} workspace {w['name']}", f)
            check_cachevol_usage(pvc, f"{name} workspace {w['name']}", f)
    (f.ok if declared == bound
     else lambda: f.fail(f"{name}: binds workspaces {sorted(bound)}, its Task declares "
                         f"{sorted(declared)}"))()


def check_argo(doc: dict, where: str, f: Findings) -> None:
    """An Argo Workflow: each container template with the workflow's volumes, as a Pod (which is
    what Argo runs it as, besides its own init and wait containers)."""
    name = f"{where}: {doc.get('kind')}/{doc.get('metadata', {}).get('generateName', '')}"
    spec = doc.get("spec", {})
    templates = {t["name"]: t for t in spec.get("templates", [])}
    (f.ok if spec.get("entrypoint") in templates
     else lambda: f.fail(f"{name}: entrypoint {spec.get('entrypoint')!r} is no template"))()
    containers = [t for t in templates.values() if "container" in t]
    (f.ok if containers else lambda: f.fail(f"{name}: no container template"))()
    for t in containers:
        pod = as_pod(t["name"], [{"name": "main", **t["container"]}], spec.get("volumes", []))
        validate_object(pod, f"{name} template {t['name']}", f)
        check_cachevol_usage(pod, f"{name} template {t['name']}", f)
        check_mounts(pod, f"{name} template {t['name']}", f)


def check_gitlab(config: str, where: str, claims: set[str], f: Findings) -> None:
    """The gitlab-runner chart's runners.config: TOML that mounts claims and inline volumes."""
    try:
        toml = tomllib.loads(config)
    except tomllib.TOMLDecodeError as e:
        f.fail(f"{where}: runners.config is not TOML: {e}")
        return
    for runner in toml.get("runners", []):
        vols = runner.get("kubernetes", {}).get("volumes", {})
        for pvc in vols.get("pvc", []):
            (f.ok if pvc.get("name") in claims and pvc.get("mount_path")
             else lambda p=pvc: f.fail(f"{where}: pvc volume {p} names no claim of "
                                       "claims.yaml or has no mount_path"))()
        for csi in vols.get("csi", []):
            if csi.get("driver") != DRIVER or not csi.get("mount_path"):
                f.fail(f"{where}: csi volume {csi.get('name')} is not a cachevol volume")
                continue
            check_user_attributes(csi.get("volume_attributes", {}),
                                  f"{where} csi volume {csi.get('name')}", f, inline=True)
        if not vols:
            f.fail(f"{where}: a runner mounts no cache")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--update", action="store_true",
                    help="rewrite manifests/install.yaml from the chart before checking")
    args = ap.parse_args()
    f = Findings()
    check_chart(args.update, f)
    check_dashboard(f)
    check_examples(f)
    for e in f.errors:
        print(f"FAIL {e}", file=sys.stderr)
    print(f"chart-check: helm {helm.helm_sdk_version()}, Kubernetes schemas {KUBE_VERSION}")
    print(f"chart-check: {f.checked - len(f.errors)} passed, {len(f.errors)} failed")
    return 1 if f.errors else 0


if __name__ == "__main__":
    sys.exit(main())
