"""A ServingPool's children: engine Deployments (vLLM, wired for its role), the vllm-router in front
of them, the pool's Service, and the router's least-privilege RBAC for Kubernetes service discovery.

Pure builders (no Kubernetes I/O): the reconciler applies what they return. Each takes the pool's
`Context` only for names, labels and owner references.

- Engines run `vllm serve MODEL --port P --tensor-parallel-size TP --served-model-name NAME`; in a
  disaggregated pool prefill engines are NixlConnector `kv_producer`s and decode engines
  `kv_consumer`s, each advertising its pod IP as VLLM_NIXL_SIDE_CHANNEL_HOST. `engine.args` follow.
- The router runs `vllm-router` with Kubernetes service discovery in the pool's namespace: plain
  load balancing over the engine pods (colocated), or `--vllm-pd-disaggregation` with a prefill and
  a decode selector. It drops a pod once it is not Ready or has a deletion timestamp.
- Scale-down drains: an engine's preStop waits (within terminationGracePeriodSeconds) until the pod
  has left the router's rotation and its running and waiting requests are done.
- A pool that can be at zero or asleep (`spec.activated`) gets the activator (`ampacity activator`)
  as its front door: the pool's Service selects the activator pods, which hold requests while no
  engine serves and send them on to the router pods. Always in the path rather than swapped in at
  zero: the endpoint never changes, no request races a Service switch, and the cost is one
  proxy hop (docs/results/serving.md). Its RBAC: read the namespace's pods (to find the engines
  and routers, as the router does) and patch this one pool's status subresource (its own field,
  status.activation), nothing else; it cannot scale or change anything.
- Engines of a sleep group (`spec.sleep`) run with `--enable-sleep-mode` and VLLM_SERVER_DEV_MODE=1
  (vLLM serves /sleep and /wake_up only then) and request the host memory their sleeping weights take.
"""

from __future__ import annotations

import copy
import json
import shlex
from dataclasses import dataclass, field
from typing import Any

from ampacity.api.gpu import GPU_PRODUCT_LABEL, GPU_RESOURCE, GPU_TYPE_LABEL
from ampacity.api.gpu_products import gpu_product
from ampacity.api.meta import GROUP, LABEL_PREFIX, format_duration
from ampacity.api.servingpool import PLANNED_ENGINE_FLAGS, Activator, ServingPoolSpec
from controllers.reconciler import Context

ENGINE_ROLES = ("engine", "prefill", "decode")
#: The router's and the activator's containers: unprivileged, read-only root, no capabilities.
RESTRICTED_SECURITY_CONTEXT = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
}
#: Their service discovery: the pods of the pool's namespace, read only.
READ_PODS = {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}
ROUTER = "router"
ACTIVATOR = "activator"
ACTIVATOR_PORT = 8081
SLEEP_MODE_FLAG = "--enable-sleep-mode"
SLEEP_GROUP_LABEL = f"{LABEL_PREFIX}/sleep-group"
ENGINE_PORT_LABEL = f"{LABEL_PREFIX}/engine-port"
DEV_MODE_ENV = "VLLM_SERVER_DEV_MODE"
KV_ROLES = {"prefill": "kv_producer", "decode": "kv_consumer"}
NIXL_SIDE_CHANNEL_PORT = 5600
ROUTER_METRICS_PORT = 29000
ROUTER_HEALTH_INTERVAL_SECONDS = 5
#: Weight loading of a 70B model from a network store takes minutes: 30 min before it counts as failed.
STARTUP_SECONDS = 1800
#: How long a stopping engine may keep serving the requests it has (the longest generation).
DRAIN_SECONDS = 600
#: Before draining, the pod must leave the router's rotation (the router watches pods).
DEREGISTER_SECONDS = 5
MODEL_MOUNT = "/models"

# Runs in the engine container (vLLM's images have python3, not always curl): wait until the engine
# has no running or waiting request, for at most DRAIN_SECONDS.
DRAIN_SCRIPT = """\
import sys, time, urllib.request
port, deregister, drain = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
time.sleep(deregister)
deadline = time.time() + drain
while time.time() < deadline:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        break
    busy = sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(("vllm:num_requests_running", "vllm:num_requests_waiting"))
    )
    if busy == 0:
        break
    time.sleep(1)
"""


class InvalidEngineSpec(ValueError):
    """The spec asks for something the plan contradicts; the message is for the user."""


def conflicting_args(args: list[str]) -> list[str]:
    """User args that would override what the plan sets (the CRD's CEL rule checks the same)."""
    return [a for a in args if a.split("=", 1)[0] in PLANNED_ENGINE_FLAGS]


@dataclass
class ModelSource:
    """What vLLM loads and what the pod needs for it."""

    argument: str
    args: list[str] = field(default_factory=list)
    volumes: list[dict[str, Any]] = field(default_factory=list)
    mounts: list[dict[str, Any]] = field(default_factory=list)


def model_source(uri: str) -> ModelSource:
    """hf://org/name -> the repo id; pvc://claim/path -> a read-only mount; s3://, gs:// -> streamed."""
    scheme, sep, rest = uri.partition("://")
    if not sep or not rest:
        raise InvalidEngineSpec(f"model.uri {uri!r} has no scheme; use hf://, pvc://, s3:// or gs://")
    if scheme == "hf":
        return ModelSource(rest)
    if scheme == "pvc":
        claim, _, path = rest.partition("/")
        return ModelSource(
            f"{MODEL_MOUNT}/{claim}/{path}".rstrip("/"),
            volumes=[{"name": "model", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}],
            mounts=[{"name": "model", "mountPath": f"{MODEL_MOUNT}/{claim}", "readOnly": True}],
        )
    if scheme in ("s3", "gs"):
        # vLLM's Run:ai model streamer reads safetensors straight from object storage.
        return ModelSource(uri, args=["--load-format", "runai_streamer"])
    raise InvalidEngineSpec(
        f"model.uri scheme {scheme!r} is not supported; use hf://, pvc://, s3:// or gs://"
    )


def kv_transfer_config(role: str) -> str:
    return json.dumps({"kv_connector": "NixlConnector", "kv_role": KV_ROLES[role]}, separators=(",", ":"))


def engine_args(spec: ServingPoolSpec, role: str, tp: int, chunk: int = 0) -> list[str]:
    """`vllm serve` arguments (after `vllm serve`) for one engine role."""
    conflicts = conflicting_args(spec.engine.args)
    if conflicts:
        raise InvalidEngineSpec(
            f"engine.args {' '.join(conflicts)} contradict the plan: the operator sets "
            f"{', '.join(PLANNED_ENGINE_FLAGS)}"
        )
    source = model_source(spec.model.uri)
    args = [
        source.argument,
        "--port",
        str(spec.engine.port),
        "--tensor-parallel-size",
        str(tp),
        "--served-model-name",
        spec.model.name,
        *source.args,
    ]
    if role in KV_ROLES:
        args += ["--kv-transfer-config", kv_transfer_config(role)]
    if chunk > 0:
        # The plan's chunked prefill: prompts enter each pass at most `chunk` tokens at a time.
        args += ["--enable-chunked-prefill", "--max-num-batched-tokens", str(chunk)]
    if spec.sleep is not None and SLEEP_MODE_FLAG not in spec.engine.args:
        args.append(SLEEP_MODE_FLAG)
    return args + list(spec.engine.args)


def shm_size(tp: int) -> str:
    """/dev/shm for NCCL's shared-memory transport between the TP workers of one pod."""
    return f"{max(1, tp) * 2}Gi"


def _merge_resources(extra: dict[str, Any], tp: int, host_memory: int | str | None = None) -> dict[str, Any]:
    resources: dict[str, Any] = {k: dict(v) for k, v in extra.items() if isinstance(v, dict)}
    for kind in ("limits", "requests"):
        resources.setdefault(kind, {})[GPU_RESOURCE] = str(tp)
    if host_memory is not None:
        # The weights of a level-1 sleeper live in host memory: the scheduler must count them.
        resources["requests"].setdefault("memory", str(host_memory))
    return resources


def gpu_names(gpu_type: str) -> tuple[list[str], list[str]]:
    """(short types, GFD product labels) a gpuType matches: a catalogued GPU by either name."""
    try:
        product = gpu_product(gpu_type)
    except KeyError:
        return [gpu_type], [gpu_type]
    return sorted({gpu_type, product.short_name}), sorted({gpu_type, product.product})


def gpu_affinity(gpu_type: str, preferences: list[dict[str, Any]]) -> dict[str, Any]:
    """Only nodes with the requested GPU (GPU Feature Discovery's product label or the short type)."""
    short, products = gpu_names(gpu_type)
    terms = [
        {"matchExpressions": [{"key": GPU_TYPE_LABEL, "operator": "In", "values": short}]},
        {"matchExpressions": [{"key": GPU_PRODUCT_LABEL, "operator": "In", "values": products}]},
    ]
    node_affinity: dict[str, Any] = {
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}
    }
    if preferences:
        node_affinity["preferredDuringSchedulingIgnoredDuringExecution"] = preferences
    return {"nodeAffinity": node_affinity}


def engine_labels(ctx: Context, role: str) -> dict[str, str]:
    return ctx.child_labels(role)


def engine_deployment(
    ctx: Context,
    spec: ServingPoolSpec,
    role: str,
    replicas: int,
    tp: int,
    preferences: list[dict[str, Any]],
    chunk: int = 0,
) -> dict[str, Any]:
    """One engine role (engine: colocated, prefill or decode) as a Deployment."""
    engine = spec.engine
    source = model_source(spec.model.uri)
    labels = engine_labels(ctx, role)
    env: list[dict[str, Any]] = []
    if role in KV_ROLES:
        env += [
            {"name": "VLLM_NIXL_SIDE_CHANNEL_HOST", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "VLLM_NIXL_SIDE_CHANNEL_PORT", "value": str(NIXL_SIDE_CHANNEL_PORT)},
        ]
    if spec.sleep is not None:
        env.append({"name": DEV_MODE_ENV, "value": "1"})
    env += engine.env
    env_from = list(engine.env_from)
    if engine.model_credentials_secret:
        env_from.append({"secretRef": {"name": engine.model_credentials_secret}})
    ports = [{"name": "http", "containerPort": engine.port}]
    if role in KV_ROLES:
        ports.append({"name": "nixl", "containerPort": NIXL_SIDE_CHANNEL_PORT})
    drain = ["python3", "-c", DRAIN_SCRIPT, str(engine.port), str(DEREGISTER_SECONDS), str(DRAIN_SECONDS)]
    container: dict[str, Any] = {
        "name": "engine",
        "image": engine.image,
        "command": ["vllm", "serve"],
        "args": engine_args(spec, role, tp, chunk),
        "env": env,
        "ports": ports,
        "resources": _merge_resources(
            engine.resources, tp, spec.sleep.host_memory if spec.sleep and spec.sleep.level == 1 else None
        ),
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}, *source.mounts, *engine.volume_mounts],
        "startupProbe": {
            "httpGet": {"path": "/health", "port": "http"},
            "periodSeconds": 10,
            "failureThreshold": STARTUP_SECONDS // 10,
        },
        "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 5},
        "livenessProbe": {
            "httpGet": {"path": "/health", "port": "http"},
            "periodSeconds": 15,
            "failureThreshold": 4,
        },
        "lifecycle": {"preStop": {"exec": {"command": drain}}},
    }
    if env_from:
        container["envFrom"] = env_from
    pod: dict[str, Any] = {
        "containers": [container],
        "affinity": gpu_affinity(spec.gpu_type, preferences),
        "volumes": [
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm_size(tp)}},
            *source.volumes,
            *engine.volumes,
        ],
        "terminationGracePeriodSeconds": DEREGISTER_SECONDS + DRAIN_SECONDS + 30,
    }
    if engine.tolerations:
        pod["tolerations"] = engine.tolerations
    if engine.node_selector:
        pod["nodeSelector"] = engine.node_selector
    if engine.service_account_name:
        pod["serviceAccountName"] = engine.service_account_name
    if engine.image_pull_secrets:
        pod["imagePullSecrets"] = engine.image_pull_secrets
    pod_labels = dict(labels)
    if spec.sleep is not None:
        # How the group's reconcilers find every engine that shares GPUs with theirs, and its port.
        pod_labels |= {SLEEP_GROUP_LABEL: spec.sleep.group, ENGINE_PORT_LABEL: str(engine.port)}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": ctx.child_metadata(f"{ctx.name}-{role}", role),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            # Engines hold GPUs: replace one at a time without a surge pod that would need spare GPUs.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
            "template": {"metadata": {"labels": pod_labels}, "spec": pod},
        },
    }


def _selector_args(ctx: Context, role: str) -> list[str]:
    labels = engine_labels(ctx, role)
    keys = ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component")
    return [f"{k}={labels[k]}" for k in keys]


def router_args(ctx: Context, spec: ServingPoolSpec, disaggregated: bool) -> list[str]:
    """`vllm-router` arguments: Kubernetes service discovery of the pool's engines in its namespace."""
    args = [
        "--host",
        "0.0.0.0",
        "--port",
        str(spec.router.port),
        "--policy",
        str(spec.router.policy),
        "--prometheus-host",
        "0.0.0.0",
        "--prometheus-port",
        str(ROUTER_METRICS_PORT),
        "--service-discovery",
        "--service-discovery-namespace",
        ctx.namespace,
        "--service-discovery-port",
        str(spec.engine.port),
        # A dead engine leaves the rotation within ~10 s even before its pod turns unready:
        # vllm-router 0.1.17 does not retry a P/D request's decode stage on another engine.
        "--health-check-interval-secs",
        str(ROUTER_HEALTH_INTERVAL_SECONDS),
        "--health-failure-threshold",
        "2",
        "--cb-failure-threshold",
        "3",
    ]
    if disaggregated:
        args += ["--vllm-pd-disaggregation", "--prefill-selector", *_selector_args(ctx, "prefill")]
        args += ["--decode-selector", *_selector_args(ctx, "decode")]
    else:
        args += ["--selector", *_selector_args(ctx, "engine")]
    return args


def router_name(ctx: Context) -> str:
    return f"{ctx.name}-router"


def _front_deployment(
    ctx: Context, component: str, name: str, replicas: int, container: dict[str, Any], grace_seconds: int
) -> dict[str, Any]:
    """A Deployment of one of the pool's request-path components (router, activator): its own
    ServiceAccount, a container that runs unprivileged on a read-only root."""
    labels = ctx.child_labels(component)
    container = {**container, "securityContext": copy.deepcopy(RESTRICTED_SECURITY_CONTEXT)}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": ctx.child_metadata(name, component),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "serviceAccountName": name,
                    "containers": [container],
                    "terminationGracePeriodSeconds": grace_seconds,
                },
            },
        },
    }


def router_deployment(ctx: Context, spec: ServingPoolSpec, image: str, disaggregated: bool) -> dict[str, Any]:
    container = {
        "name": "router",
        "image": spec.router.image or image,
        "command": ["vllm-router"],
        "args": router_args(ctx, spec, disaggregated),
        "ports": [
            {"name": "http", "containerPort": spec.router.port},
            {"name": "metrics", "containerPort": ROUTER_METRICS_PORT},
        ],
        "readinessProbe": {"tcpSocket": {"port": "http"}, "periodSeconds": 5},
        "livenessProbe": {"tcpSocket": {"port": "http"}, "periodSeconds": 15},
        "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}},
    }
    # In-flight streams finish on the old router while a new one takes over.
    return _front_deployment(ctx, ROUTER, router_name(ctx), spec.router.replicas, container, DRAIN_SECONDS)


def pool_service(ctx: Context, spec: ServingPoolSpec) -> dict[str, Any]:
    """The pool's one endpoint, under the pool's name: the activator when the pool can be at zero
    or asleep, else the router."""
    front = ACTIVATOR if spec.activated else ROUTER
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": ctx.child_metadata(ctx.name, front),
        "spec": {
            "selector": ctx.child_labels(front),
            "ports": [{"name": "http", "port": spec.router.port, "targetPort": "http"}],
        },
    }


def activator_name(ctx: Context) -> str:
    return f"{ctx.name}-activator"


def activator_args(ctx: Context, spec: ServingPoolSpec, phases: list[str]) -> list[str]:
    """`ampacity activator` arguments: the pool, where its engines and routers listen, the limits."""
    limits = spec.activator or Activator()
    return [
        "--pool",
        ctx.name,
        "--namespace",
        ctx.namespace,
        "--phases",
        ",".join(phases),
        "--engine-port",
        str(spec.engine.port),
        "--router-port",
        str(spec.router.port),
        "--listen",
        f"0.0.0.0:{ACTIVATOR_PORT}",
        "--max-queue",
        str(limits.max_queue),
        "--max-wait",
        format_duration(limits.max_wait),
    ]


def activator_deployment(
    ctx: Context, spec: ServingPoolSpec, image: str, phases: list[str]
) -> dict[str, Any]:
    limits = spec.activator or Activator()
    container = {
        "name": "activator",
        "image": limits.image or image,
        "command": ["ampacity", "activator"],
        "args": activator_args(ctx, spec, phases),
        "ports": [{"name": "http", "containerPort": ACTIVATOR_PORT}],
        "readinessProbe": {"httpGet": {"path": "/activator/healthz", "port": "http"}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/activator/healthz", "port": "http"}, "periodSeconds": 15},
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
    }
    # Held requests and streams in flight end before the old activator goes.
    grace = int(limits.max_wait) + 30
    return _front_deployment(ctx, ACTIVATOR, activator_name(ctx), limits.replicas, container, grace)


def activator_rbac(ctx: Context) -> list[dict[str, Any]]:
    """The activator reads the namespace's pods and patches its own pool's status, nothing more."""
    status = {
        "apiGroups": [GROUP],
        "resources": ["servingpools/status"],
        "resourceNames": [ctx.name],
        "verbs": ["patch"],
    }
    return _namespaced_rbac(ctx, ACTIVATOR, activator_name(ctx), [copy.deepcopy(READ_PODS), status])


def endpoint(ctx: Context, spec: ServingPoolSpec) -> str:
    return f"http://{ctx.name}.{ctx.namespace}.svc:{spec.router.port}/v1"


def router_rbac(ctx: Context) -> list[dict[str, Any]]:
    """ServiceAccount, Role and RoleBinding: the router may only get/list/watch pods in its namespace."""
    return _namespaced_rbac(ctx, ROUTER, router_name(ctx), [copy.deepcopy(READ_PODS)])


def _namespaced_rbac(
    ctx: Context, component: str, name: str, rules: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """A ServiceAccount `name` bound to a Role of `rules` in the pool's namespace."""
    meta = ctx.child_metadata(name, component)
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": meta, "rules": rules},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": meta,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ctx.namespace}],
        },
    ]


def shell_command(container: dict[str, Any]) -> str:
    """The container's command line, for Events and docs."""
    return shlex.join([*container.get("command", []), *container.get("args", [])])
