"""Ampacity's Kubernetes I/O: an async client that applies desired objects with server-side apply.

The operator (`controllers`) and the node agent (`agents`) share it.

Reconcilers compute the full desired state of their children and `apply`
it; server-side apply makes that idempotent, and `prune` deletes children
that are no longer desired. Connection settings come from the official
client's loader (kubeconfig or in-cluster service account).
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import kubernetes

FIELD_MANAGER = "ampacity-operator"
RETRIES_ON_TOO_MANY_REQUESTS = 3

Object = dict[str, Any]


@dataclass(frozen=True)
class Kind:
    api_version: str
    plural: str
    namespaced: bool = True

    def path(self, namespace: str | None, name: str | None = None) -> str:
        group_path = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        scope = f"/namespaces/{namespace}" if self.namespaced and namespace else ""
        suffix = f"/{quote(name)}" if name else ""
        return f"{group_path}{scope}/{self.plural}{suffix}"


KINDS = {
    "Pod": Kind("v1", "pods"),
    "Service": Kind("v1", "services"),
    "ConfigMap": Kind("v1", "configmaps"),
    "Secret": Kind("v1", "secrets"),
    "Node": Kind("v1", "nodes", namespaced=False),
    "Deployment": Kind("apps/v1", "deployments"),
    "ServiceAccount": Kind("v1", "serviceaccounts"),
    "Role": Kind("rbac.authorization.k8s.io/v1", "roles"),
    "RoleBinding": Kind("rbac.authorization.k8s.io/v1", "rolebindings"),
    "NodePower": Kind("ampacity.dev/v1alpha1", "nodepowers", namespaced=False),
    "PowerBudget": Kind("ampacity.dev/v1alpha1", "powerbudgets", namespaced=False),
    "TrainingJob": Kind("ampacity.dev/v1alpha1", "trainingjobs"),
}


class KubeError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


def _client_from_kubernetes_config(kubeconfig: str | None = None, timeout: float = 30) -> httpx.AsyncClient:
    configuration = kubernetes.client.Configuration()
    if kubeconfig:
        kubernetes.config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)  # type: ignore[no-untyped-call]
    else:
        try:
            kubernetes.config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        except kubernetes.config.ConfigException:
            kubernetes.config.load_kube_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    headers = {}
    token = configuration.api_key.get("authorization") or configuration.api_key.get("BearerToken")
    if token:
        headers["Authorization"] = token if token.startswith("Bearer ") else f"Bearer {token}"
    tls = ssl.create_default_context(cafile=configuration.ssl_ca_cert)
    if not configuration.verify_ssl:
        tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE
    if configuration.cert_file and configuration.key_file:
        tls.load_cert_chain(configuration.cert_file, configuration.key_file)
    return httpx.AsyncClient(base_url=configuration.host, headers=headers, verify=tls, timeout=timeout)


class Kube:
    """A small async Kubernetes client: apply, get, list, delete."""

    def __init__(
        self, http: httpx.AsyncClient | None = None, kubeconfig: str | None = None, timeout: float = 30
    ) -> None:
        """`kubeconfig` (a path) overrides the in-cluster/KUBECONFIG lookup; `timeout` is per request."""
        self._http = http or _client_from_kubernetes_config(kubeconfig, timeout)

    async def close(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> Object:
        response = await self._http.request(method, path, **kwargs)
        for _ in range(RETRIES_ON_TOO_MANY_REQUESTS):
            # As client-go does: 429 (e.g. "storage is (re)initializing" right after a CRD is
            # established, or API priority and fairness) is retried after its Retry-After.
            if response.status_code != 429:
                break
            await asyncio.sleep(min(float(response.headers.get("Retry-After", "1") or 1), 2.0))
            response = await self._http.request(method, path, **kwargs)
        if response.status_code >= 400:
            try:
                message = response.json().get("message", response.text)
            except ValueError:
                message = response.text
            raise KubeError(response.status_code, message)
        body: Object = response.json()
        return body

    async def apply(self, obj: Object) -> Object:
        """Server-side apply of a complete desired object; the operator owns every field it sets."""
        kind = KINDS[obj["kind"]]
        path = kind.path(obj["metadata"].get("namespace"), obj["metadata"]["name"])
        return await self._request(
            "PATCH",
            path,
            params={"fieldManager": FIELD_MANAGER, "force": "true"},
            content=json.dumps(obj),
            headers={"Content-Type": "application/apply-patch+yaml"},
        )

    async def create(self, obj: Object) -> Object:
        """Create an object (KubeError 409 if it exists): for kinds the operator may write but not read."""
        path = KINDS[obj["kind"]].path(obj["metadata"].get("namespace"))
        return await self._request("POST", path, params={"fieldManager": FIELD_MANAGER}, json=obj)

    async def patch_status(self, kind: str, namespace: str | None, name: str, status: Object) -> Object:
        """JSON merge patch of the status subresource (None values remove fields)."""
        return await self._request(
            "PATCH",
            f"{KINDS[kind].path(namespace, name)}/status",
            content=json.dumps({"status": status}),
            headers={"Content-Type": "application/merge-patch+json"},
        )

    async def patch(self, kind: str, namespace: str | None, name: str, body: Object) -> Object:
        """JSON merge patch of an object (None values remove fields)."""
        return await self._request(
            "PATCH",
            KINDS[kind].path(namespace, name),
            content=json.dumps(body),
            headers={"Content-Type": "application/merge-patch+json"},
        )

    async def get(self, kind: str, namespace: str | None, name: str) -> Object | None:
        try:
            return await self._request("GET", KINDS[kind].path(namespace, name))
        except KubeError as error:
            if error.status == 404:
                return None
            raise

    async def list_objects(
        self, kind: str, namespace: str | None, label_selector: str = "", field_selector: str = ""
    ) -> list[Object]:
        params = {"labelSelector": label_selector} if label_selector else {}
        if field_selector:
            params["fieldSelector"] = field_selector
        items: list[Object] = (await self._request("GET", KINDS[kind].path(namespace), params=params))[
            "items"
        ]
        return items

    async def list_with_version(self, kind: str, namespace: str | None) -> tuple[list[Object], str]:
        """Every object of `kind`, and the list's resourceVersion to start a watch from."""
        listing = await self._request("GET", KINDS[kind].path(namespace))
        items: list[Object] = listing["items"]
        return items, str(listing["metadata"]["resourceVersion"])

    async def watch(
        self, kind: str, namespace: str | None, resource_version: str, timeout_seconds: int = 300
    ) -> AsyncIterator[Object]:
        """Watch events ({"type": ..., "object": ...}) after `resource_version`, until the server
        closes the watch (after about `timeout_seconds`); an "ERROR" event (410 Gone) means relist."""
        params = {
            "watch": "1",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_seconds),
        }
        path = KINDS[kind].path(namespace)
        timeout = httpx.Timeout(None, connect=10)
        async with self._http.stream("GET", path, params=params, timeout=timeout) as response:
            if response.status_code >= 400:
                await response.aread()
                raise KubeError(response.status_code, response.text)
            async for line in response.aiter_lines():
                if line:
                    event: Object = json.loads(line)
                    yield event

    async def delete(self, kind: str, namespace: str | None, name: str) -> None:
        try:
            await self._request(
                "DELETE", KINDS[kind].path(namespace, name), json={"propagationPolicy": "Background"}
            )
        except KubeError as error:
            if error.status != 404:
                raise

    async def prune(self, kind: str, namespace: str, label_selector: str, keep: set[str]) -> list[str]:
        """Delete the labelled children of `kind` whose names are not in `keep`; returns their names."""
        stale = [
            o["metadata"]["name"]
            for o in await self.list_objects(kind, namespace, label_selector)
            if o["metadata"]["name"] not in keep
        ]
        for name in stale:
            await self.delete(kind, namespace, name)
        return stale
