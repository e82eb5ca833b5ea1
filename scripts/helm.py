#!/usr/bin/env python3
"""Lint and render Helm charts with Helm's own Go library, without a `helm` binary.

The library comes from the PyPI package helm-sdkpy, which bundles Helm 4 as a shared
object. It exposes Helm's actions (Lint, Install, Upgrade, ...) but no client-only
render (`helm template`): its Install always talks to a Kubernetes API server and has
no dry-run switch. So `template` runs a real Install against a throwaway stand-in API
server that this script serves on 127.0.0.1 for the length of one call, with Helm's
release storage kept in memory (HELM_DRIVER=memory). The stand-in answers discovery
(so `.Capabilities` and kind mapping work), accepts every object Helm creates and
keeps nothing afterwards. The manifests printed are the ones Helm itself rendered and
recorded in the release: the same manifests `helm template` prints.

`install` and `uninstall` are Helm's own actions against a real cluster named by a
kubeconfig, release records in Secrets as `helm install` keeps them (HELM_DRIVER=secret).

Usage:
    scripts/helm.py lint CHART [-f VALUES]... [--set K=V]... [--strict]
    scripts/helm.py template CHART [-f VALUES]... [--set K=V]... [-n NS] [--release NAME]
                             [--include-crds] [--kube-version V] [--api-versions G/V[/Kind]]...
    scripts/helm.py install CHART --kubeconfig FILE --release NAME [-n NS] [-f VALUES]...
                            [--set K=V]... [--create-namespace] [--wait] [--timeout S]
    scripts/helm.py uninstall --kubeconfig FILE --release NAME [-n NS] [--wait]

Exit status: 0 success, 1 the chart has problems (lint errors, render failure),
2 bad command line or unreadable input, 3 helm-sdkpy is not installed.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

INSTALL_HINT = (
    "helm-sdkpy (Helm's Go library for Python) is not installed.\n"
    "Install it with:\n"
    "    python3 -m pip install --ignore-requires-python helm-sdkpy\n"
    "(--ignore-requires-python is needed on Python 3.11: the package declares a newer\n"
    "Python but works on 3.11.)"
)

EXIT_PROBLEMS = 1
EXIT_USAGE = 2
EXIT_NO_HELM = 3


class UsageError(Exception):
    """Bad input from the command line or a file it names (exit 2)."""


class ChartProblem(Exception):
    """The chart did not lint or render (exit 1)."""


# --------------------------------------------------------------------------------------
# Values: files and --set, merged the way Helm merges them
# --------------------------------------------------------------------------------------


def load_values_file(path: str) -> dict[str, Any]:
    """Reads one values file (YAML, or JSON when PyYAML is missing)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise UsageError(f"cannot read values file {path}: {err.strerror}") from err
    try:
        import yaml  # PyYAML
    except ImportError:
        yaml = None
    try:
        if yaml is not None:
            data = yaml.load(text, Loader=_values_loader(yaml))
        else:
            data = json.loads(text) if text.strip() else None
    except Exception as err:  # both parsers raise their own error types
        hint = "" if yaml is not None else " (PyYAML is not installed, so only JSON is read: pip install pyyaml)"
        raise UsageError(f"values file {path} is not valid YAML{hint}: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"values file {path} must hold a mapping at the top, found {type(data).__name__}")
    return data


def _values_loader(yaml):
    """A safe loader that keeps timestamps as the strings they are written as.

    Helm reads `2024-01-01` in a values file as a string; PyYAML would make it a date,
    which neither matches Helm nor serialises to JSON.
    """

    class ValuesLoader(yaml.SafeLoader):
        pass

    ValuesLoader.yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    return ValuesLoader


def merge_values(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep-merges `override` into a copy of `base`: maps merge, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_values(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def coalesce_defaults(defaults: dict[str, Any], user: dict[str, Any]) -> dict[str, Any]:
    """User values over chart defaults, where a user `null` removes the key (Helm's rule)."""
    out = copy.deepcopy(defaults)
    for key, value in user.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = coalesce_defaults(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _split_unescaped(text: str, sep: str) -> list[str]:
    """Splits on `sep` outside `{...}` and not preceded by a backslash."""
    parts, current, depth, i = [], [], 0, 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            current.append(text[i : i + 2])
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}" and depth > 0:
            depth -= 1
        if ch == sep and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    parts.append("".join(current))
    return parts


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def _typed_scalar(raw: str, as_string: bool) -> Any:
    """Helm's --set typing: true/false, null, integers; everything else stays a string."""
    value = _unescape(raw)
    if as_string:
        return value
    if value == "true":
        return True
    if value == "false":
        return False
    if value == "null":
        return None
    if value == "0":
        return 0
    if re.fullmatch(r"-?[1-9][0-9]*", value):
        return int(value)
    return value


def _parse_set_value(raw: str, as_string: bool) -> Any:
    if raw.startswith("{") and raw.endswith("}"):
        inner = raw[1:-1]
        if inner == "":
            return []
        return [_typed_scalar(item, as_string) for item in _split_unescaped(inner, ",")]
    return _typed_scalar(raw, as_string)


_KEY_PART = re.compile(r"^(?P<name>(?:[^\[\\]|\\.)*)(?P<index>(?:\[\d+\])*)$")


def _key_path(key: str) -> list[str | int]:
    """`a.b\\.c[0].d` -> ['a', 'b.c', 0, 'd']."""
    path: list[str | int] = []
    for part in _split_unescaped(key, "."):
        match = _KEY_PART.match(part)
        if not match or not match.group("name"):
            raise UsageError(f"--set: cannot parse key {key!r} (near {part!r})")
        path.append(_unescape(match.group("name")))
        path.extend(int(n) for n in re.findall(r"\[(\d+)\]", match.group("index")))
    return path


def apply_set(values: dict[str, Any], expression: str, as_string: bool = False) -> None:
    """Applies one --set expression (`a.b=1,c[0]=x`) to `values` in place."""
    for assignment in _split_unescaped(expression, ","):
        if assignment == "":
            continue
        key, sep, raw = assignment.partition("=")
        if not sep:
            raise UsageError(f"--set: {assignment!r} has no '=': write KEY=VALUE")
        path = _key_path(key)
        value = _parse_set_value(raw, as_string)
        node: Any = values
        for step, nxt in zip(path, path[1:]):
            empty: Any = [] if isinstance(nxt, int) else {}
            if isinstance(step, int):
                if not isinstance(node, list):
                    raise UsageError(f"--set: {key!r} indexes something that is not a list")
                while len(node) <= step:
                    node.append(None)
                if not isinstance(node[step], (dict, list)):
                    node[step] = empty
                node = node[step]
            else:
                if not isinstance(node, dict):
                    raise UsageError(f"--set: {key!r} names a field of something that is not a map")
                if not isinstance(node.get(step), (dict, list)):
                    node[step] = empty
                node = node[step]
        last = path[-1]
        if isinstance(last, int):
            if not isinstance(node, list):
                raise UsageError(f"--set: {key!r} indexes something that is not a list")
            while len(node) <= last:
                node.append(None)
            node[last] = value
        else:
            if not isinstance(node, dict):
                raise UsageError(f"--set: {key!r} names a field of something that is not a map")
            node[last] = value


def user_values(args: argparse.Namespace) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for path in args.values or []:
        values = merge_values(values, load_values_file(path))
    for expression in args.set or []:
        apply_set(values, expression)
    for expression in args.set_string or []:
        apply_set(values, expression, as_string=True)
    return values


# --------------------------------------------------------------------------------------
# The stand-in API server
# --------------------------------------------------------------------------------------

# (group/version, kind, plural, namespaced) of the built-in kinds the stand-in advertises.
_BUILTIN_KINDS: list[tuple[str, str, str, bool]] = [
    ("v1", "ConfigMap", "configmaps", True),
    ("v1", "Endpoints", "endpoints", True),
    ("v1", "Event", "events", True),
    ("v1", "LimitRange", "limitranges", True),
    ("v1", "Namespace", "namespaces", False),
    ("v1", "Node", "nodes", False),
    ("v1", "PersistentVolume", "persistentvolumes", False),
    ("v1", "PersistentVolumeClaim", "persistentvolumeclaims", True),
    ("v1", "Pod", "pods", True),
    ("v1", "ReplicationController", "replicationcontrollers", True),
    ("v1", "ResourceQuota", "resourcequotas", True),
    ("v1", "Secret", "secrets", True),
    ("v1", "Service", "services", True),
    ("v1", "ServiceAccount", "serviceaccounts", True),
    ("apps/v1", "ControllerRevision", "controllerrevisions", True),
    ("apps/v1", "DaemonSet", "daemonsets", True),
    ("apps/v1", "Deployment", "deployments", True),
    ("apps/v1", "ReplicaSet", "replicasets", True),
    ("apps/v1", "StatefulSet", "statefulsets", True),
    ("batch/v1", "CronJob", "cronjobs", True),
    ("batch/v1", "Job", "jobs", True),
    ("autoscaling/v1", "HorizontalPodAutoscaler", "horizontalpodautoscalers", True),
    ("autoscaling/v2", "HorizontalPodAutoscaler", "horizontalpodautoscalers", True),
    ("policy/v1", "PodDisruptionBudget", "poddisruptionbudgets", True),
    ("rbac.authorization.k8s.io/v1", "ClusterRole", "clusterroles", False),
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding", "clusterrolebindings", False),
    ("rbac.authorization.k8s.io/v1", "Role", "roles", True),
    ("rbac.authorization.k8s.io/v1", "RoleBinding", "rolebindings", True),
    ("networking.k8s.io/v1", "Ingress", "ingresses", True),
    ("networking.k8s.io/v1", "IngressClass", "ingressclasses", False),
    ("networking.k8s.io/v1", "NetworkPolicy", "networkpolicies", True),
    ("discovery.k8s.io/v1", "EndpointSlice", "endpointslices", True),
    ("coordination.k8s.io/v1", "Lease", "leases", True),
    ("events.k8s.io/v1", "Event", "events", True),
    ("scheduling.k8s.io/v1", "PriorityClass", "priorityclasses", False),
    ("storage.k8s.io/v1", "StorageClass", "storageclasses", False),
    ("apiextensions.k8s.io/v1", "CustomResourceDefinition", "customresourcedefinitions", False),
    ("admissionregistration.k8s.io/v1", "MutatingWebhookConfiguration", "mutatingwebhookconfigurations", False),
    ("admissionregistration.k8s.io/v1", "ValidatingWebhookConfiguration", "validatingwebhookconfigurations", False),
]

# Kinds of well-known add-on APIs, advertised when --api-versions names their group/version.
_ADDON_KINDS: dict[str, list[tuple[str, str, bool]]] = {
    "monitoring.coreos.com/v1": [
        ("ServiceMonitor", "servicemonitors", True),
        ("PodMonitor", "podmonitors", True),
        ("PrometheusRule", "prometheusrules", True),
        ("Probe", "probes", True),
    ],
}


def _plural(kind: str) -> str:
    lower = kind.lower()
    if lower.endswith(("s", "x", "ch", "sh")):
        return lower + "es"
    if lower.endswith("y") and lower[-2:-1] not in "aeiou":
        return lower[:-1] + "ies"
    return lower + "s"


class StandInCluster:
    """A minimal Kubernetes API on 127.0.0.1 for one Helm install: discovery, create, get.

    Every created object lives only in this process. A created CustomResourceDefinition
    is reported Established at once and its kind joins discovery, as on a real cluster.
    """

    def __init__(self, kube_version: str, api_versions: list[str]):
        match = re.fullmatch(r"v?(\d+)\.(\d+)(?:\.(\d+))?", kube_version)
        if not match:
            raise UsageError(f"--kube-version {kube_version!r} is not a version like 1.33 or v1.33.0")
        major, minor, patch = match.group(1), match.group(2), match.group(3) or "0"
        self.version = {
            "major": major,
            "minor": minor,
            "gitVersion": f"v{major}.{minor}.{patch}",
            "platform": "linux/amd64",
        }
        self.lock = threading.Lock()
        # group/version -> {plural: (kind, namespaced)}
        self.resources: dict[str, dict[str, tuple[str, bool]]] = {}
        for gv, kind, plural, namespaced in _BUILTIN_KINDS:
            self.add_kind(gv, kind, plural, namespaced)
        for item in api_versions:
            self.add_api_version(item)
        self.objects: dict[str, dict[str, Any]] = {}
        self.server: http.server.ThreadingHTTPServer | None = None

    def add_kind(self, group_version: str, kind: str, plural: str | None = None, namespaced: bool = True) -> None:
        with_plural = plural or _plural(kind)
        self.resources.setdefault(group_version, {})[with_plural] = (kind, namespaced)

    def add_api_version(self, item: str) -> None:
        parts = item.strip().strip("/").split("/")
        if len(parts) == 3:
            self.add_kind(f"{parts[0]}/{parts[1]}", parts[2])
        elif len(parts) == 2 and parts[0] and parts[1]:
            gv = "/".join(parts)
            self.resources.setdefault(gv, {})
            for kind, plural, namespaced in _ADDON_KINDS.get(gv, []):
                self.add_kind(gv, kind, plural, namespaced)
        else:
            raise UsageError(f"--api-versions {item!r}: write GROUP/VERSION or GROUP/VERSION/Kind")

    # ---- responses -------------------------------------------------------------------

    def api_group_list(self) -> dict[str, Any]:
        groups: dict[str, list[str]] = {}
        for gv in sorted(self.resources):
            if "/" in gv:
                group, version = gv.split("/", 1)
                groups.setdefault(group, []).append(version)
        return {
            "kind": "APIGroupList",
            "apiVersion": "v1",
            "groups": [
                {
                    "name": group,
                    "versions": [{"groupVersion": f"{group}/{v}", "version": v} for v in versions],
                    "preferredVersion": {"groupVersion": f"{group}/{versions[-1]}", "version": versions[-1]},
                }
                for group, versions in groups.items()
            ],
        }

    def resource_list(self, group_version: str) -> dict[str, Any] | None:
        kinds = self.resources.get(group_version)
        if kinds is None:
            return None
        verbs = ["create", "delete", "get", "list", "patch", "update", "watch"]
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": group_version,
            "resources": [
                {
                    "name": plural,
                    "singularName": kind.lower(),
                    "namespaced": namespaced,
                    "kind": kind,
                    "verbs": verbs,
                }
                for plural, (kind, namespaced) in sorted(kinds.items())
            ],
        }

    def register_crd(self, crd: dict[str, Any]) -> None:
        spec = crd.get("spec") or {}
        names = spec.get("names") or {}
        group, kind, plural = spec.get("group"), names.get("kind"), names.get("plural")
        if not (group and kind and plural):
            return
        namespaced = spec.get("scope", "Namespaced") == "Namespaced"
        for version in spec.get("versions") or []:
            if version.get("served", True) and version.get("name"):
                self.add_kind(f"{group}/{version['name']}", kind, plural, namespaced)
        crd.setdefault("status", {})["conditions"] = [
            {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts"},
            {"type": "Established", "status": "True", "reason": "InitialNamesAccepted"},
        ]
        crd["status"]["acceptedNames"] = names

    # ---- server ----------------------------------------------------------------------

    def start(self) -> str:
        cluster = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out in two writes

            def log_message(self, *args: Any) -> None:  # keep stderr for real problems
                pass

            def reply(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode("utf-8")
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def status(self, code: int, reason: str, message: str) -> None:
                self.reply(
                    code,
                    {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                     "reason": reason, "message": message, "code": code},
                )

            def body(self) -> dict[str, Any]:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b"{}"
                return json.loads(raw or b"{}")

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0].rstrip("/")
                with cluster.lock:
                    if path == "/version":
                        return self.reply(200, cluster.version)
                    if path == "/api":
                        return self.reply(200, {"kind": "APIVersions", "versions": ["v1"],
                                                "serverAddressByClientCIDRs": []})
                    if path == "/apis":
                        return self.reply(200, cluster.api_group_list())
                    gv = None
                    if path == "/api/v1":
                        gv = "v1"
                    elif path.startswith("/apis/") and path.count("/") == 3:
                        gv = path[len("/apis/"):]
                    if gv is not None:
                        listing = cluster.resource_list(gv)
                        if listing is not None:
                            return self.reply(200, listing)
                    stored = cluster.objects.get(path)
                    if stored is not None:
                        return self.reply(200, stored)
                self.status(404, "NotFound", f"{path} not found")

            def do_POST(self) -> None:
                path = self.path.split("?", 1)[0].rstrip("/")
                if "json" not in (self.headers.get("Content-Type") or "json"):
                    # Clients fall back to JSON on 415; the stand-in speaks no protobuf.
                    length = int(self.headers.get("Content-Length") or 0)
                    self.rfile.read(length)
                    return self.status(415, "UnsupportedMediaType", "send JSON")
                try:
                    obj = self.body()
                except ValueError:
                    return self.status(400, "BadRequest", "request body is not JSON")
                name = (obj.get("metadata") or {}).get("name")
                if not name:
                    return self.status(422, "Invalid", "metadata.name is required")
                key = f"{path}/{name}"
                with cluster.lock:
                    if key in cluster.objects:
                        return self.status(409, "AlreadyExists", f"{key} already exists")
                    meta = obj.setdefault("metadata", {})
                    meta["uid"] = str(uuid.uuid4())
                    meta["resourceVersion"] = str(len(cluster.objects) + 1)
                    meta["generation"] = 1
                    meta["creationTimestamp"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
                    if obj.get("kind") == "CustomResourceDefinition":
                        cluster.register_crd(obj)
                    cluster.objects[key] = obj
                self.reply(201, obj)

            def _refuse(self) -> None:
                self.status(405, "MethodNotAllowed", "the render stand-in only creates objects")

            do_PUT = _refuse
            do_PATCH = _refuse
            do_DELETE = _refuse

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02},
                         name="stand-in-api", daemon=True).start()
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


def _kubeconfig(server: str, namespace: str) -> str:
    return (
        "apiVersion: v1\n"
        "kind: Config\n"
        "clusters:\n"
        f"- name: stand-in\n  cluster:\n    server: {json.dumps(server)}\n"
        "users:\n"
        "- name: stand-in\n  user:\n    token: stand-in\n"
        "contexts:\n"
        f"- name: stand-in\n  context:\n    cluster: stand-in\n    user: stand-in\n    namespace: {json.dumps(namespace)}\n"
        "current-context: stand-in\n"
    )


# --------------------------------------------------------------------------------------
# Helm through helm-sdkpy
# --------------------------------------------------------------------------------------


_STAGED = "HELM_PY_SCRATCH_DIR"


def helm_environment(base: dict[str, str], scratch: Path, driver: str = "memory") -> dict[str, str]:
    """The environment the Go library must start with.

    The library is a Go c-shared object: Go copies the process environment it was
    started with when the library loads, so variables set later with os.environ never
    reach it. That is why the work runs in a child process started with this
    environment (see main).
    """
    env = {name: value for name, value in base.items() if not name.startswith("HELM_KUBE")}
    # Renders keep release records in memory, not in Secrets of the stand-in cluster;
    # installs into a real cluster keep them where `helm` does.
    env["HELM_DRIVER"] = driver
    for name in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"):
        target = scratch / name.lower()
        target.mkdir(parents=True, exist_ok=True)
        env[name] = str(target)
    no_proxy = env.get("NO_PROXY", "")
    env["NO_PROXY"] = ",".join(filter(None, [no_proxy, "127.0.0.1", "localhost"]))
    env[_STAGED] = str(scratch)
    return env


def import_helm():
    try:
        import helm_sdkpy  # noqa: F401
    except ImportError:
        print(INSTALL_HINT, file=sys.stderr)
        sys.exit(EXIT_NO_HELM)
    return helm_sdkpy


def configuration(helm, namespace: str, kubeconfig: str | None = None):
    try:
        return helm.Configuration(namespace=namespace, kubeconfig=kubeconfig)
    except helm.HelmLibraryNotFound as err:
        print(f"{err}\n\n{INSTALL_HINT}", file=sys.stderr)
        sys.exit(EXIT_NO_HELM)


_NO_MATCH = re.compile(r'no matches for kind "([^"]+)" in version "([^"]+)"')


def render(helm, chart: str, values: dict[str, Any], namespace: str, release: str,
           kube_version: str, api_versions: list[str], quiet: bool = False) -> dict[str, Any]:
    """Installs `chart` into a fresh stand-in cluster and returns Helm's release record."""
    registered: list[tuple[str, str]] = []
    for _attempt in range(5):
        cluster = StandInCluster(kube_version, api_versions)
        for gv, kind in registered:
            cluster.add_kind(gv, kind)
        server = cluster.start()
        try:
            config = configuration(helm, namespace, _kubeconfig(server, namespace))
            install = helm.Install(config)
            try:
                return asyncio.run(install.run(release, chart, values=values or None, wait=False, timeout=60))
            except helm.HelmError as err:
                message = str(err)
                missing = [(gv, kind) for kind, gv in _NO_MATCH.findall(message)
                           if (gv, kind) not in registered]
                if not missing:
                    # helm-sdkpy prefixes errors with the action; here the action is a
                    # means, not what the user asked for.
                    raise ChartProblem(message.removeprefix("install failed: ")) from err
                # `helm template` renders kinds no cluster knows; do the same by
                # teaching the stand-in those kinds and rendering again.
                registered.extend(missing)
                if not quiet:
                    names = ", ".join(f"{kind} ({gv})" for gv, kind in missing)
                    print(f"note: the stand-in API server did not know {names}; added for this render "
                          "(pass --api-versions GROUP/VERSION/Kind to advertise them up front)",
                          file=sys.stderr)
        finally:
            cluster.stop()
    raise ChartProblem("the chart still uses unknown kinds after several renders: "
                       + ", ".join(f"{kind} ({gv})" for gv, kind in registered))


def chart_dir(path: str) -> Path:
    chart = Path(path)
    if not (chart / "Chart.yaml").is_file():
        raise UsageError(f"{path} is not a chart directory (no Chart.yaml in it)")
    return chart


# --------------------------------------------------------------------------------------
# Subcommands
# --------------------------------------------------------------------------------------

_SEVERITY = {0: "UNKNOWN", 1: "INFO", 2: "WARNING", 3: "ERROR"}


def cmd_lint(args: argparse.Namespace, scratch: Path) -> int:
    chart = chart_dir(args.chart)
    values = user_values(args)
    helm = import_helm()

    # helm-sdkpy's Lint takes no values, so lint a copy whose values.yaml holds the
    # chart defaults with the user's values merged over them.
    target = chart
    if values:
        target = scratch / "lint" / chart.resolve().name
        shutil.copytree(chart, target)
        defaults = load_values_file(str(chart / "values.yaml")) if (chart / "values.yaml").exists() else {}
        (target / "values.yaml").write_text(json.dumps(coalesce_defaults(defaults, values), indent=2) + "\n",
                                            encoding="utf-8")

    config = configuration(helm, args.namespace)
    try:
        result = asyncio.run(helm.Lint(config).run(str(target)))
    except helm.HelmError as err:
        print(f"[ERROR] {args.chart}: {err}", file=sys.stderr)
        return EXIT_PROBLEMS

    counts = {"ERROR": 0, "WARNING": 0, "INFO": 0, "UNKNOWN": 0}
    for message in result.get("Messages") or []:
        severity = _SEVERITY.get(message.get("Severity"), "UNKNOWN")
        counts[severity] += 1
        detail = message.get("Err")
        # The bundled library serialises Go errors as {}: their text does not reach us.
        text = json.dumps(detail) if detail not in (None, {}, "") else "(message text not exposed by helm-sdkpy)"
        path = message.get("Path") or "(chart)"
        print(f"[{severity}] {path}: {text}")

    # Render the chart with the same values through the real install path: a failure
    # there comes with Helm's full message, which the lint result lacks.
    try:
        render(helm, str(chart), values, args.namespace, "lint", args.kube_version, args.api_versions,
               quiet=True)
    except ChartProblem as err:
        counts["ERROR"] += 1
        print(f"[ERROR] render: {err}")

    failed = counts["ERROR"] > 0 or (args.strict and counts["WARNING"] > 0)
    summary = (f"linted {args.chart}: {counts['ERROR']} error(s), {counts['WARNING']} warning(s), "
               f"{counts['INFO']} info")
    print(summary, file=sys.stderr if failed else sys.stdout)
    return EXIT_PROBLEMS if failed else 0


def _document(source: str, body: str) -> str:
    return f"---\n# Source: {source}\n{body.strip()}\n"


def cmd_template(args: argparse.Namespace, scratch: Path) -> int:
    chart = chart_dir(args.chart)
    values = user_values(args)
    helm = import_helm()
    try:
        release = render(helm, str(chart), values, args.namespace, args.release,
                         args.kube_version, args.api_versions)
    except ChartProblem as err:
        print(f"Error: {err}", file=sys.stderr)
        return EXIT_PROBLEMS

    chart_name = ((release.get("chart") or {}).get("metadata") or {}).get("name", chart.name)
    out: list[str] = []
    if args.include_crds:
        crd_dir = chart / "crds"
        for path in sorted(crd_dir.glob("*")) if crd_dir.is_dir() else []:
            if path.suffix in (".yaml", ".yml", ".json") and path.is_file():
                out.append(_document(f"{chart_name}/crds/{path.name}", path.read_text(encoding="utf-8")))
    manifest = release.get("manifest") or ""
    if manifest.strip():
        out.append(manifest.strip() + "\n")
    for hook in release.get("hooks") or []:
        out.append(_document(hook.get("path", "hook"), hook.get("manifest", "")))
    sys.stdout.write("".join(out))
    if args.notes:
        notes = (release.get("info") or {}).get("notes") or ""
        print(f"--- NOTES ---\n{notes}", file=sys.stderr)
    return 0


def _read_kubeconfig(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise UsageError(f"cannot read kubeconfig {path}: {err.strerror}") from err


def cmd_install(args: argparse.Namespace, scratch: Path) -> int:
    chart = chart_dir(args.chart)
    values = user_values(args)
    helm = import_helm()
    config = configuration(helm, args.namespace, _read_kubeconfig(args.kubeconfig))
    try:
        release = asyncio.run(helm.Install(config).run(
            args.release, str(chart), values=values or None, create_namespace=args.create_namespace,
            wait=args.wait, timeout=args.timeout))
    except helm.HelmError as err:
        print(f"Error: {err}", file=sys.stderr)
        return EXIT_PROBLEMS
    info = release.get("info") or {}
    print(f"installed release {args.release} of {chart} in namespace {args.namespace}: "
          f"status {info.get('status', 'unknown')}, revision {release.get('version', '?')}")
    return 0


def cmd_uninstall(args: argparse.Namespace, scratch: Path) -> int:
    helm = import_helm()
    config = configuration(helm, args.namespace, _read_kubeconfig(args.kubeconfig))
    try:
        asyncio.run(helm.Uninstall(config).run(args.release, wait=args.wait, timeout=args.timeout))
    except helm.HelmError as err:
        print(f"Error: {err}", file=sys.stderr)
        return EXIT_PROBLEMS
    print(f"uninstalled release {args.release} from namespace {args.namespace}")
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="helm.py",
        description="Lint and render Helm charts with Helm's own library (helm-sdkpy); no helm binary needed.",
    )
    sub = root.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("chart", help="path to the chart directory")
        p.add_argument("-f", "--values", action="append", metavar="FILE",
                       help="values file (YAML); may be repeated, later files win")
        p.add_argument("--set", action="append", metavar="K=V",
                       help="set a value (a.b=1,c={x,y},d[0]=z); may be repeated")
        p.add_argument("--set-string", action="append", metavar="K=V",
                       help="like --set but every value stays a string")
        p.add_argument("-n", "--namespace", default="default", help="release namespace (default: default)")
        p.add_argument("--kube-version", default="1.33.0",
                       help="Kubernetes version the chart sees in .Capabilities (default: 1.33.0)")
        p.add_argument("--api-versions", action="append", default=[], metavar="G/V[/Kind]",
                       help="extra API version (or kind) the chart sees in .Capabilities; may be repeated")

    lint = sub.add_parser("lint", help="run Helm's linter; exit 1 on errors")
    common(lint)
    lint.add_argument("--strict", action="store_true", help="fail on warnings too")
    lint.set_defaults(func=cmd_lint)

    template = sub.add_parser("template", help="render the chart and print multi-document YAML")
    common(template)
    template.add_argument("--release", default="release-name", help="release name (default: release-name)")
    template.add_argument("--include-crds", action="store_true", help="print the chart's crds/ files first")
    template.add_argument("--notes", action="store_true", help="print the rendered NOTES.txt on stderr")
    template.set_defaults(func=cmd_template)

    def cluster(p: argparse.ArgumentParser) -> None:
        p.add_argument("--kubeconfig", required=True, metavar="FILE", help="kubeconfig of the cluster")
        p.add_argument("--release", required=True, help="release name")
        p.add_argument("--wait", action="store_true",
                       help="wait until the release's objects are ready (or gone, for uninstall)")
        p.add_argument("--timeout", type=int, default=300, metavar="S",
                       help="seconds --wait waits (default: 300)")

    install = sub.add_parser("install", help="install the chart into the cluster of --kubeconfig")
    common(install)
    cluster(install)
    install.add_argument("--create-namespace", action="store_true",
                         help="create the release namespace if it does not exist")
    install.set_defaults(func=cmd_install)

    uninstall = sub.add_parser("uninstall", help="uninstall a release from the cluster of --kubeconfig")
    uninstall.add_argument("-n", "--namespace", default="default", help="release namespace (default: default)")
    cluster(uninstall)
    uninstall.set_defaults(func=cmd_uninstall)
    return root


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    staged = os.environ.get(_STAGED)
    if not staged:
        import_helm()  # exits 3 with the install command when the package is missing
        scratch = Path(tempfile.mkdtemp(prefix="helm-py-"))
        try:
            driver = "secret" if args.command in ("install", "uninstall") else "memory"
            env = helm_environment(dict(os.environ), scratch, driver)
            child = subprocess.run([sys.executable, os.path.abspath(__file__), *argv], env=env, check=False)
            return child.returncode
        except KeyboardInterrupt:
            return 130
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    try:
        return args.func(args, Path(staged))
    except UsageError as err:
        print(f"Error: {err}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
