"""Every constraint of every kind, walked: each gets an object it rejects and one it accepts.

The constraints are read from the generated CRDs (bounds, lengths, patterns, enums, CEL rules,
the root-level rules on `metadata.name`), so a new one without a case here fails
`test_every_constraint_has_a_case`. Each case is checked against the pydantic models here (an
object the API server would refuse must also be refused by the operator, with the same field or
message, so an object admitted before a rule existed ends in `InvalidSpec`), and against the real
API server in `tests/integration/test_crds.py`, which imports `cases()`.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

import pytest
from pydantic import ValidationError

from ampacity.api import RESOURCES, Resource
from ampacity.api.crd import custom_resource_definition
from controllers.powerbudget.controller import policy_budget

BY_KIND = {r.singular: r for r in RESOURCES}
DURATION = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
POSITIVE = "must be greater than zero, e.g. 500ms or 30s"

#: Objects of each kind with every optional part present, so every constraint has a place to
#: break; a kind has several where two parts exclude each other (a PVC or a URI).
BASES: dict[str, list[dict[str, Any]]] = {
    "servingpool": [
        {
            "model": {
                "name": "llama2-70b",
                "uri": "hf://meta-llama/Llama-2-70b-chat-hf",
                # Every field, so that each bound has a place to break (a mixture of experts).
                "architecture": {
                    "num_hidden_layers": 32,
                    "hidden_size": 4096,
                    "num_attention_heads": 32,
                    "num_key_value_heads": 8,
                    "head_dim": 128,
                    "intermediate_size": 14336,
                    "vocab_size": 32000,
                    "tie_word_embeddings": False,
                    "num_local_experts": 8,
                    "n_routed_experts": 8,
                    "num_experts": 8,
                    "num_experts_per_tok": 2,
                    "n_shared_experts": 1,
                    "moe_intermediate_size": 1408,
                    "shared_expert_intermediate_size": 1408,
                    "first_k_dense_replace": 1,
                    "kv_lora_rank": 512,
                    "qk_rope_head_dim": 64,
                    "num_parameters": 46_700_000_000,
                },
            },
            "engine": {
                "image": "vllm/vllm-openai:v0.9.2",
                "port": 8000,
                "args": ["--max-model-len=8192"],
                "modelCredentialsSecret": "hf-token",
            },
            "router": {"policy": "power_of_two", "replicas": 2, "port": 8000},
            "gpuType": "h100",
            "slo": {"ttft": "1s", "tpot": "100ms", "attainment": 0.9},
            "workload": {
                "profile": "azure-conv",
                "peakRate": 10,
                "burstiness": 2,
                "promptTokens": {
                    "percentiles": [{"percentile": 50, "tokens": 200}, {"percentile": 100, "tokens": 1000}]
                },
                "outputTokens": {"histogram": [{"upTo": 64, "count": 10}, {"upTo": 256, "count": 30}]},
            },
            "latencyProfile": {"configMap": "llama-h100-profile", "key": "perf_model.csv"},
            "mode": "auto",
            "minGpus": 0,
            "maxGpus": 16,
            "autoscaling": {
                "metricsUrl": "http://router:8000/metrics",
                "cooldown": "5m",
                "scaleToZeroAfter": "10m",
            },
            "activator": {"maxQueue": 100, "maxWait": "5m", "replicas": 1, "image": "ghcr.io/ampacity/a:1"},
        },
        {
            "model": {"name": "llama2-70b", "uri": "hf://meta-llama/Llama-2-70b-chat-hf"},
            "engine": {"image": "vllm/vllm-openai:v0.9.2"},
            "gpuType": "h100",
            "slo": {"ttft": "1s", "tpot": "100ms"},
            "minGpus": 8,
            "maxGpus": 16,
        },
        {
            "model": {"name": "llama2-70b", "uri": "hf://meta-llama/Llama-2-70b-chat-hf"},
            "engine": {"image": "vllm/vllm-openai:v0.9.2"},
            "gpuType": "h100",
            "slo": {"ttft": "1s", "tpot": "100ms"},
            "maxGpus": 16,
            # The other form of each distribution.
            "workload": {
                "promptTokens": {"histogram": [{"upTo": 512, "count": 10}, {"upTo": 2048, "count": 3}]},
                "outputTokens": {
                    "percentiles": [{"percentile": 50, "tokens": 100}, {"percentile": 100, "tokens": 800}]
                },
            },
        },
        {
            # Scale to zero without a sleep group: the activator's settings stand on scaleToZeroAfter.
            "model": {"name": "llama2-70b", "uri": "hf://meta-llama/Llama-2-70b-chat-hf"},
            "engine": {"image": "vllm/vllm-openai:v0.9.2"},
            "gpuType": "h100",
            "slo": {"ttft": "1s", "tpot": "100ms"},
            "maxGpus": 16,
            "autoscaling": {"scaleToZeroAfter": "10m"},
            "activator": {"maxQueue": 10},
        },
        {
            # A sleep group (its own base: sleepAfter must stay below scaleToZeroAfter).
            "model": {"name": "llama2-70b", "uri": "hf://meta-llama/Llama-2-70b-chat-hf"},
            "engine": {"image": "vllm/vllm-openai:v0.9.2"},
            "gpuType": "h100",
            "slo": {"ttft": "1s", "tpot": "100ms"},
            "maxGpus": 16,
            "autoscaling": {"scaleToZeroAfter": "10m"},
            "sleep": {
                "group": "chat",
                "sleepersPerGpu": 4,
                "hostMemory": "160Gi",
                "level": 1,
                "sleepAfter": "1m",
            },
        },
    ],
    "trainingjob": [
        {
            "workers": {"replicas": 4, "minReplicas": 2, "maxReplicas": 8, "gpusPerWorker": 1},
            "template": {
                "metadata": {"labels": {"team": "llm"}},
                "spec": {
                    "containers": [
                        {
                            "name": "trainer",
                            "image": "ghcr.io/example/trainer:latest",
                            "env": [{"name": "EPOCHS", "value": "3"}],
                            "resources": {"limits": {"cpu": "4", "memory": "16Gi"}},
                            "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                        }
                    ],
                    "volumes": [{"name": "data", "emptyDir": {}}],
                },
            },
            "checkpoint": {
                "storage": {
                    "uri": "s3://checkpoints/gpt",
                    "endpoint": "https://minio.storage:9000",
                    "credentialsSecret": "s3-credentials",
                },
                "interval": {"policy": "fixed", "every": "30m"},
                "retention": {"keepLast": 3, "keepEvery": 10},
            },
            "failurePolicy": {"maxRestarts": 20, "backoff": "30s"},
        },
        {
            "workers": {"replicas": 1},
            "template": {"spec": {"containers": [{"name": "trainer", "image": "trainer:1"}]}},
            "checkpoint": {"storage": {"persistentVolumeClaim": "ckpt"}},
        },
    ],
    "federatedround": [
        {
            "model": "file:///state/global-model.npz",
            "clientSelector": {"federated.ampacity.dev/population": "digits"},
            "rounds": 5,
            "cohortSize": 20,
            "minQuorum": 12,
            "deadline": "10m",
            "strategy": "fedcompass",
            "localSteps": {"min": 5, "max": 50},
            "aggregation": {
                "rule": "trimmedMean",
                "trimFraction": 0.2,
                "byzantineClients": 2,
                "maxUpdateNorm": 100.0,
            },
        }
    ],
    "powerbudget": [
        {
            "nodeSelector": {
                "matchLabels": {"ampacity.dev/row": "row-a"},
                "matchExpressions": [{"key": "ampacity.dev/rack", "operator": "In", "values": ["r1"]}],
            },
            "limitWatts": 20000,
            "oversubscription": 0.3,
            "thresholds": {"t1": 0.85, "t2": 0.95},
            "priorityClasses": [
                {"name": "interactive", "priority": 100, "minCapWatts": 400},
                {"name": "batch", "priority": 0, "minCapWatts": 200},
            ],
            "defaultPriorityClass": "batch",
            "safeCapWatts": 450,
            "telemetryStaleness": "10s",
            "releaseHold": "30s",
            "actuator": "ClockLock",
        }
    ],
    "nodepower": [
        {
            "budget": "row-a",
            "gpus": [
                {
                    "index": 0,
                    "uuid": "GPU-8c5b7b3e-0d1f-4e1c-9b9a-1f2e3d4c5b6a",
                    "capWatts": 500,
                    "clockFraction": 0.8,
                    "capped": False,
                    "priority": "batch",
                }
            ],
            "safeCapWatts": 450,
            "staleness": "10s",
        }
    ],
}

#: The CEL rules whose breaking needs context: rule message -> (path to set, rejected, accepted[, base]).
ARCHITECTURE = {"num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32}
RULE_CASES: dict[str, tuple[Any, ...]] = {
    "num_attention_heads must divide hidden_size (or set head_dim)": (
        "spec.model.architecture",
        ARCHITECTURE | {"hidden_size": 4100},
        ARCHITECTURE | {"hidden_size": 4100, "head_dim": 128},
    ),
    "num_key_value_heads must divide num_attention_heads": (
        "spec.model.architecture",
        ARCHITECTURE | {"num_key_value_heads": 5},
        ARCHITECTURE | {"num_key_value_heads": 4},
    ),
    "num_experts_per_tok must not exceed the number of experts": (
        "spec.model.architecture",
        ARCHITECTURE | {"num_experts": 8, "num_experts_per_tok": 9},
        ARCHITECTURE | {"num_experts": 8, "num_experts_per_tok": 8},
    ),
    "first_k_dense_replace must be smaller than num_hidden_layers": (
        "spec.model.architecture.first_k_dense_replace",
        32,
        31,
    ),
    "give either percentiles or a histogram": (
        "spec.workload.promptTokens",
        {"percentiles": [{"percentile": 100, "tokens": 9}], "histogram": [{"upTo": 9, "count": 1}]},
        {"histogram": [{"upTo": 9, "count": 1}]},
    ),
    "percentiles must include the 100th: the longest request the pool must admit": (
        "spec.workload.promptTokens.percentiles",
        [{"percentile": 99, "tokens": 900}],
        [{"percentile": 100, "tokens": 900}],
    ),
    "the histogram needs at least one request": (
        "spec.workload.outputTokens.histogram",
        [{"upTo": 64, "count": 0}],
        [{"upTo": 64, "count": 1}],
    ),
    "workload.promptTokens and workload.outputTokens go together": (
        "spec.workload",
        {"promptTokens": {"histogram": [{"upTo": 64, "count": 1}]}},
        {"profile": "mooncake"},
    ),
    "model.uri must be hf://ORG/NAME, pvc://CLAIM/PATH, s3://BUCKET/PATH or gs://BUCKET/PATH": (
        "spec.model.uri",
        "http://example.com/llama",
        "pvc://weights/llama",
    ),
    "engine.args may not set --tensor-parallel-size, --enable-chunked-prefill, --max-num-batched-tokens, "
    "-tp, --port, --host, --kv-transfer-config, --served-model-name, --load-format, --model: the operator "
    "sets them from the plan and the spec": (
        "spec.engine.args",
        ["--port=9000"],
        ["--max-model-len=8192"],
    ),
    "minGpus must not exceed maxGpus": ("spec.minGpus", 17, 16, 1),
    "autoscaling.scaleToZeroAfter needs minGpus 0": ("spec.minGpus", 1, 0),
    "activator settings need a pool that can be at zero or asleep: set autoscaling.scaleToZeroAfter "
    "or sleep": ("spec.autoscaling", {"cooldown": "5m"}, {"scaleToZeroAfter": "10m"}, 3),
    "sleep level 1 keeps the weights in host memory: set hostMemory (or use level 2)": (
        "spec.sleep",
        {"group": "chat", "level": 1},
        {"group": "chat", "level": 2},
    ),
    "sleep.sleepAfter must be shorter than autoscaling.scaleToZeroAfter: an engine sleeps before it is "
    "stopped": ("spec.sleep.sleepAfter", "10m", "9m", 4),
    "sleep needs autoscaling: an engine's idle time is read from the live metrics it scrapes": (
        "spec.autoscaling",
        None,
        {"cooldown": "5m"},
        4,
    ),
    "workers.minReplicas must not exceed workers.replicas": ("spec.workers.minReplicas", 5, 4),
    "workers.replicas must not exceed workers.maxReplicas": ("spec.workers.replicas", 9, 8),
    "template.spec.volumes may not be named ampacity-report-token or checkpoints: the operator adds "
    "those volumes itself": ("spec.template.spec.volumes[0].name", "checkpoints", "checkpoints-in"),
    "checkpoint.storage needs exactly one of persistentVolumeClaim or uri": (
        "spec.checkpoint.storage",
        {"uri": "s3://b", "persistentVolumeClaim": "ckpt"},
        {"persistentVolumeClaim": "ckpt"},
    ),
    "checkpoint.storage.uri must start with s3://, gs://, gcs:// or file://": (
        "spec.checkpoint.storage",
        {"uri": "http://bucket/prefix"},
        {"uri": "s3://bucket/prefix"},
    ),
    "checkpoint.storage.endpoint is for an s3:// uri": (
        "spec.checkpoint.storage",
        {"uri": "gs://bucket/prefix", "endpoint": "https://minio:9000"},
        {"uri": "s3://bucket/prefix", "endpoint": "https://minio:9000"},
    ),
    "checkpoint.storage.credentialsSecret is for an object-store uri": (
        "spec.checkpoint.storage",
        {"persistentVolumeClaim": "ckpt", "credentialsSecret": "s3-creds"},
        {"uri": "s3://bucket/prefix", "credentialsSecret": "s3-creds"},
    ),
    "checkpoint.interval.every is required when policy is fixed": (
        "spec.checkpoint.interval",
        {"policy": "fixed"},
        {"policy": "auto"},
    ),
    "minQuorum must not exceed cohortSize": ("spec.minQuorum", 21, 20),
    "krum and multiKrum need minQuorum > 2 * byzantineClients + 2": (
        "spec.aggregation",
        {"rule": "krum", "byzantineClients": 5},
        {"rule": "krum", "byzantineClients": 4},
    ),
    "trimmedMean needs minQuorum > 2 * byzantineClients": ("spec.aggregation.byzantineClients", 6, 5),
    "localSteps.min must not exceed localSteps.max": ("spec.localSteps.min", 51, 50),
    "must be a file:///state/<path>.npz URI on the aggregator's state volume, the only kind of model "
    "the aggregator loads (install any other with PUT /v1/model)": (
        "spec.model",
        "http://example.com/model.npz",
        "file:///state/rounds/7/model.npz",
    ),
    "defaultPriorityClass must name one of priorityClasses": (
        "spec.defaultPriorityClass",
        "gold",
        "interactive",
    ),
    "values must be non-empty for In and NotIn and empty for Exists and DoesNotExist": (
        "spec.nodeSelector.matchExpressions[0].operator",
        "Exists",
        "NotIn",
    ),
    "thresholds.t1 must be below thresholds.t2": ("spec.thresholds.t1", 0.95, 0.94),
}

#: Bounds whose value at the boundary breaks another rule: constraint id -> (rejected, accepted).
OVERRIDES: dict[str, tuple[Any, Any]] = {
    # t2 just above zero would fall below t1; the boundary is shown with t2 = t1's successor.
    "powerbudget spec.thresholds.t2 minimum": (0, 0.86),
    # t1 < t2 <= 1, so t1 never reaches its own bound of 1.
    "powerbudget spec.thresholds.t1 maximum": (1.5, 0.94),
    # Any one character is too short to be a file:///state/ URI.
    "federatedround spec.model minLength": ("", "file:///state/m.npz"),
    # Nor an object-store URI with a scheme; the longest one keeps its scheme too.
    "servingpool spec.model.uri minLength": ("", "s3://b"),
    "servingpool spec.model.uri maxLength": ("s3://" + "b" * 2044, "s3://" + "b" * 2043),
    "trainingjob spec.checkpoint.storage.uri minLength": ("", "s3://b"),
    "servingpool spec.minGpus minimum": (-1, 0),
    # A world size of 100000 needs maxReplicas too: shown on the bound that allows it.
    "trainingjob spec.workers.replicas maximum": (100_001, 8),
    "trainingjob spec.workers.minReplicas maximum": (100_001, 4),
    "trainingjob spec.workers.minReplicas minimum": (0, 1),
    "trainingjob spec.workers.replicas minimum": (0, 2),
    "trainingjob spec.workers.maxReplicas minimum": (0, 4),
    "federatedround spec.minQuorum minimum": (0, 5),
    "federatedround spec.cohortSize minimum": (0, 12),
    "federatedround spec.localSteps.max minimum": (0, 5),
    # The CEL rule beside it refuses 0.5 itself.
    "federatedround spec.aggregation.trimFraction maximum": (0.51, 0.5 - 0.01),
    "federatedround spec.localSteps.min minimum": (0, 1),
    "servingpool spec.maxGpus minimum": (-1, 1),
    # The full architecture's other fields need these above their bounds (first_k_dense_replace 1,
    # 8 key-value heads, 2 experts per token).
    "servingpool spec.model.architecture.num_hidden_layers minimum": (0, 2),
    "servingpool spec.model.architecture.num_attention_heads minimum": (0, 8),
    "servingpool spec.model.architecture.num_local_experts minimum": (0, 2),
}

#: Good values for patterns.
PATTERN_EXAMPLES = {DURATION: ("soon", "1ms"), DNS_LABEL: ("Trainer_1", "trainer-1")}


@dataclass(frozen=True)
class Case:
    """One constraint, broken (`bad`) and kept (`good`) at `path` of `base`."""

    kind: str
    constraint: str
    path: str
    bad: Any
    good: Any
    #: What both the API server's and the operator's refusal must say.
    message: str
    base: int = 0

    @property
    def id(self) -> str:
        return self.constraint

    def manifest(self, value: Any, name: str) -> dict[str, Any]:
        """The object with `value` at `path` (a name when `path` is metadata.name)."""
        resource = BY_KIND[self.kind]
        obj: dict[str, Any] = {
            "apiVersion": resource.api_version,
            "kind": resource.kind,
            "metadata": {"name": name},
            "spec": copy.deepcopy(BASES[self.kind][self.base]),
        }
        if self.path == "metadata.name":
            obj["metadata"]["name"] = value
        else:
            _set(obj, self.path, value)
        return obj


def _steps(path: str) -> list[str | int]:
    return [int(p) if p.isdigit() else p for p in re.findall(r"[^.\[\]]+", path)]


def _set(obj: Any, path: str, value: Any) -> None:
    *parents, leaf = _steps(path)
    for step in parents:
        obj = obj[step]
    obj[leaf] = value


def _has(obj: Any, path: str) -> bool:
    for step in _steps(path):
        try:
            obj = obj[step]
        except (KeyError, IndexError, TypeError):
            return False
    return True


def constraints(resource: Resource) -> list[tuple[str, str, dict[str, Any]]]:
    """(path, keyword or rule message, schema node) for every constraint on the object's spec."""
    root = custom_resource_definition(resource)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    found = [("metadata.name", r["message"], root) for r in root.get("x-kubernetes-validations", [])]

    def walk(node: dict[str, Any], path: str) -> None:
        for keyword in (
            "minimum",
            "maximum",
            "minLength",
            "maxLength",
            "minItems",
            "maxItems",
            "pattern",
            "enum",
        ):
            if keyword in node:
                found.append((path, keyword, node))
        found.extend((path, rule["message"], node) for rule in node.get("x-kubernetes-validations", []))
        for name, child in node.get("properties", {}).items():
            walk(child, f"{path}.{name}")
        if "items" in node:
            walk(node["items"], f"{path}[0]")

    walk(root["properties"]["spec"], "spec")
    return found


def _bound_values(node: dict[str, Any], keyword: str) -> tuple[Any, Any]:
    integer = node.get("type") == "integer"
    if keyword == "minimum":
        m = node["minimum"]
        if node.get("exclusiveMinimum"):
            return m, (m + 1 if integer else m + 0.01)
        return (m - 1 if integer else m - 0.5), m
    if keyword == "maximum":
        m = node["maximum"]
        if node.get("exclusiveMaximum"):
            return m, (m - 1 if integer else m - 0.01)
        return (m + 1 if integer else m + 0.5), m
    if keyword == "minLength":
        return "a" * (node["minLength"] - 1), "a" * node["minLength"]
    if keyword == "maxLength":
        return "a" * (node["maxLength"] + 1), "a" * node["maxLength"]
    if keyword == "minItems":
        return [], None  # None: the base's own list
    if keyword == "maxItems":
        return ("repeat", node["maxItems"] + 1), ("repeat", node["maxItems"])  # the base's items, repeated
    if keyword == "pattern":
        return PATTERN_EXAMPLES[node["pattern"]]
    if keyword == "enum":
        return "sideways", node["enum"][0]
    raise AssertionError(f"no example values for {keyword}")


def _name_values(resource: Resource, message: str) -> tuple[str, str]:
    limit = resource.name_limit
    assert limit is not None
    if message == limit.validations()[0].message:
        return "a" * (limit.max_length + 1), "a" * limit.max_length
    return "pool.v2", "pool-v2"


def cases() -> list[Case]:
    """One case per constraint of every kind."""
    found = []
    for resource in RESOURCES:
        kind = resource.singular
        for path, what, node in constraints(resource):
            constraint = f"{kind} {path.replace('[0]', '[]')} {what}"
            if path == "metadata.name":
                bad, good = _name_values(resource, what)
                found.append(Case(kind, constraint, path, bad, good, what))
                continue
            keyword = what in (
                "minimum",
                "maximum",
                "minLength",
                "maxLength",
                "minItems",
                "maxItems",
                "pattern",
                "enum",
            )
            if keyword:
                bad, good = OVERRIDES.get(constraint) or _bound_values(node, what)
                target, message = path, path
            elif what == POSITIVE:
                bad, good, target, message = "0s", "1ms", path, POSITIVE
            elif what.startswith("must be less than "):  # an exclusive maximum, checked by CEL
                bound = node["maximum"]
                bad, good, target, message = bound, bound - 0.01, path, path
            else:
                target, bad, good, *chosen = RULE_CASES[what]
                message = what
            bases = [i for i, b in enumerate(BASES[kind]) if _has({"spec": b}, target)]
            assert chosen or bases, f"no base of {kind} has {target}: add one ({constraint})"
            base = chosen[0] if chosen else bases[0]
            if good is None:
                good = copy.deepcopy(_get({"spec": BASES[kind][base]}, target))
            if isinstance(bad, tuple) and bad[0] == "repeat":
                items = _get({"spec": BASES[kind][base]}, target)
                bad, good = [(items * bad[1])[: bad[1]], (items * good[1])[: good[1]]]
            found.append(Case(kind, constraint, target, bad, good, message, base))
    return found


def _get(obj: Any, path: str) -> Any:
    for step in _steps(path):
        obj = obj[step]
    return obj


CASES = cases()


def test_every_constraint_has_a_case() -> None:
    # cases() raises on a CEL rule without an entry in RULE_CASES; here: ids are unique, and
    # every hand-written entry still matches a constraint.
    ids = [c.constraint for c in CASES]
    assert len(ids) == len(set(ids))
    messages = {c.message for c in CASES}
    assert set(RULE_CASES) <= messages, set(RULE_CASES) - messages
    assert set(OVERRIDES) <= set(ids), set(OVERRIDES) - set(ids)


def _refusals(case: Case, value: Any) -> list[str]:
    """What the operator says about the object with `value`: `<path>: <message>` per problem."""
    manifest = case.manifest(value, "walk")
    resource = BY_KIND[case.kind]
    problems = (
        [f"metadata.name: {m}" for m in resource.name_limit.problems(manifest["metadata"]["name"])]
        if (resource.name_limit)
        else []
    )
    try:
        resource.spec.model_validate(manifest["spec"])
    except ValidationError as error:
        problems += [
            f"{'.'.join(['spec', *(str(p) for p in e['loc'])])}: {e['msg']}"
            for e in error.errors(include_url=False)
        ]
    return problems


def _pydantic_path(path: str) -> str:
    return path.replace("[", ".").replace("]", "")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_the_models_refuse_what_the_api_server_refuses(case: Case) -> None:
    refused = _refusals(case, case.bad)
    assert refused, f"{case.path}={case.bad!r} is accepted by the model"
    if case.message == case.path:  # a bound: the refusal names the field
        assert any(r.startswith(f"{_pydantic_path(case.path)}:") for r in refused), refused
    else:
        assert any(case.message in r for r in refused), refused


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_the_models_accept_the_boundary(case: Case) -> None:
    assert _refusals(case, case.good) == []


@pytest.mark.parametrize("case", [c for c in CASES if c.kind == "powerbudget"], ids=lambda c: c.id)
def test_an_accepted_power_budget_is_one_the_policy_can_run(case: Case) -> None:
    spec = BY_KIND["powerbudget"].spec.model_validate(case.manifest(case.good, "walk")["spec"])
    policy_budget(spec)  # type: ignore[arg-type]  # raises ValueError on a budget the policy refuses


def test_refusals_name_the_field_in_words() -> None:
    refused = _refusals(
        next(c for c in CASES if c.constraint == "trainingjob spec.template.spec.containers minItems"),
        "notalist",
    )
    assert refused == ["spec.template.spec.containers: Input should be a valid list"]
    staleness = next(c for c in CASES if c.constraint == f"powerbudget spec.telemetryStaleness {POSITIVE}")
    assert _refusals(staleness, "0s") == [f"spec.telemetryStaleness: {POSITIVE}"]
