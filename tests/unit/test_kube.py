"""The Kubernetes client: paginated lists, typed errors in words, refreshed credentials, kubeconfig."""

from __future__ import annotations

import asyncio
import base64
import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import yaml

from ampacity.dev.cluster.pki import Pki
from ampacity.kube import ApiUnavailable, Conflict, Forbidden, Invalid, Kube, NotFound
from ampacity.kubeconfig import (
    ConfigError,
    ExecCredential,
    StaticToken,
    TokenFile,
    from_kubeconfig,
    in_cluster,
)


def client(handler: httpx.MockTransport | None = None, auth: httpx.Auth | None = None, **kw: object) -> Kube:
    return Kube(http=httpx.AsyncClient(base_url="https://api", transport=handler, auth=auth), **kw)  # type: ignore[arg-type]


async def test_lists_are_read_in_pages_at_one_resource_version() -> None:
    seen: list[dict[str, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        params = dict(request.url.params)
        seen.append(params)
        page = int(params.get("continue") or 0)
        more = {"continue": str(page + 1)} if page < 2 else {}
        items = [{"metadata": {"name": f"n{page}-{i}"}} for i in range(2)]
        return httpx.Response(200, json={"metadata": {"resourceVersion": "77", **more}, "items": items})

    kube = client(httpx.MockTransport(handler))
    items, version = await kube.list_with_version("Node", None, label_selector="gpu=h100")
    assert [o["metadata"]["name"] for o in items] == ["n0-0", "n0-1", "n1-0", "n1-1", "n2-0", "n2-1"]
    assert version == "77"
    assert [p.get("continue") for p in seen] == [None, "1", "2"]
    assert all(p["limit"] == "500" and p["labelSelector"] == "gpu=h100" for p in seen)
    await kube.close()


async def test_an_expired_continuation_lists_again_from_the_start() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.params.get("continue"))
        if len(calls) == 2:
            return httpx.Response(410, json={"reason": "Expired", "message": "continue token too old"})
        more = {"continue": "c"} if request.url.params.get("continue") is None else {}
        return httpx.Response(200, json={"metadata": {"resourceVersion": "1", **more}, "items": [{}]})

    kube = client(httpx.MockTransport(handler))
    assert len(await kube.list_objects("Pod", "ns")) == 2
    assert calls == [None, "c", None, "c"]


@pytest.mark.parametrize(
    ("status", "error", "words"),
    [
        (404, NotFound, 'GET pods ns/p: pods "p" not found'),
        (409, Conflict, "GET pods ns/p"),
        (403, Forbidden, "GET pods ns/p"),
        (422, Invalid, "GET pods ns/p"),
        (503, ApiUnavailable, "GET pods ns/p"),
    ],
)
async def test_errors_are_typed_and_say_what_was_asked(status: int, error: type, words: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json={"message": 'pods "p" not found', "reason": "X"})

    kube = client(httpx.MockTransport(handler))
    if status == 404:
        assert await kube.get("Pod", "ns", "p") is None
        with pytest.raises(NotFound) as raised:
            await kube.patch("Pod", "ns", "p", {})
        assert "PATCH pods ns/p" in raised.value.message
        return
    with pytest.raises(error) as raised:
        await kube._request("GET", "/api/v1/namespaces/ns/pods/p")
    assert raised.value.status == status and words in raised.value.message


async def test_a_server_that_does_not_answer_is_api_unavailable_in_words() -> None:
    attempts = []

    def handler(request: httpx.Request) -> httpx.Response:
        attempts.append(request.method)
        raise httpx.ReadTimeout("timed out", request=request)

    kube = client(httpx.MockTransport(handler), timeout=10)
    with pytest.raises(ApiUnavailable) as raised:
        await kube.list_objects("Node", None)
    assert raised.value.message == "GET nodes: the API server did not answer within 10 s"
    assert len(attempts) == 3  # retried twice: a GET is safe to repeat
    attempts.clear()
    with pytest.raises(ApiUnavailable):
        await kube.create({"kind": "Secret", "metadata": {"name": "s", "namespace": "ns"}})
    assert attempts == ["POST"]  # a create that may have landed is not repeated


async def test_a_rotated_token_file_is_read_again(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("one\n")
    accepted = {"Bearer one"}
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["Authorization"])
        if request.headers["Authorization"] not in accepted:
            return httpx.Response(401, json={"message": "Unauthorized"})
        return httpx.Response(200, json={"metadata": {"name": "n"}})

    auth = TokenFile(token)
    kube = client(httpx.MockTransport(handler), auth=auth)
    assert await kube.get("Node", None, "n") is not None
    # The kubelet writes a new token (same mtime second, so only the 401 tells), and the old one dies.
    mtime = token.stat().st_mtime
    token.write_text("two\n")
    os.utime(token, (mtime, mtime))
    accepted = {"Bearer two"}
    assert await kube.get("Node", None, "n") is not None
    assert seen == ["Bearer one", "Bearer one", "Bearer two"]
    # A rotation the file's mtime shows is picked up without a refused request.
    token.write_text("three\n")
    os.utime(token, (mtime + 5, mtime + 5))
    accepted = {"Bearer three"}
    assert await kube.get("Node", None, "n") is not None
    assert seen[-1] == "Bearer three" and len(seen) == 4


def exec_plugin(tmp_path: Path, lifetime: timedelta) -> dict[str, object]:
    """A credential plugin that hands out token-1, token-2, ... and counts its runs."""
    script = tmp_path / "plugin.py"
    script.write_text(
        "import json, os, pathlib, sys\n"
        "count = pathlib.Path(sys.argv[1])\n"
        "n = int(count.read_text() or 0) + 1 if count.exists() else 1\n"
        "count.write_text(str(n))\n"
        "assert json.loads(os.environ['KUBERNETES_EXEC_INFO'])['kind'] == 'ExecCredential'\n"
        "print(json.dumps({'apiVersion': 'client.authentication.k8s.io/v1', 'kind': 'ExecCredential',\n"
        "  'status': {'token': f'token-{n}', 'expirationTimestamp': sys.argv[2]}}))\n"
    )
    expiry = (datetime.now(UTC) + lifetime).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "apiVersion": "client.authentication.k8s.io/v1",
        "command": sys.executable,
        "args": [str(script), str(tmp_path / "runs"), expiry],
    }


async def test_exec_credentials_are_cached_until_they_expire(tmp_path: Path) -> None:
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["Authorization"])
        return httpx.Response(200, json={"items": [], "metadata": {}})

    long_lived = ExecCredential(exec_plugin(tmp_path, timedelta(hours=1)), "https://api")
    kube = client(httpx.MockTransport(handler), auth=long_lived)
    for _ in range(3):
        await kube.list_objects("Node", None)
    assert seen == ["Bearer token-1"] * 3
    assert (tmp_path / "runs").read_text() == "1"

    # A credential about to expire is replaced before it is used.
    (tmp_path / "runs").unlink()
    expiring = ExecCredential(exec_plugin(tmp_path, timedelta(seconds=10)), "https://api")
    kube = client(httpx.MockTransport(handler), auth=expiring)
    await kube.list_objects("Node", None)
    await kube.list_objects("Node", None)
    assert seen[-2:] == ["Bearer token-1", "Bearer token-2"]


async def test_a_failing_exec_plugin_is_a_worded_error(tmp_path: Path) -> None:
    failing = ExecCredential(
        {
            "apiVersion": "client.authentication.k8s.io/v1",
            "command": sys.executable,
            "args": ["-c", "exit(3)"],
        },
        "https://api",
    )
    kube = client(httpx.MockTransport(lambda r: httpx.Response(200, json={})), auth=failing)
    with pytest.raises(Exception, match=r"exec plugin .* exited with 3"):
        await kube.get("Node", None, "n")
    with pytest.raises(ConfigError, match="apiVersion"):
        ExecCredential({"apiVersion": "v0", "command": "x"}, "https://api")


def test_kubeconfig_with_inline_certificates_and_a_token(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    pki.create()
    data = {
        p: base64.b64encode(p.read_bytes()).decode() for p in (pki.ca.cert, pki.admin.cert, pki.admin.key)
    }
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "local",
        "contexts": [{"name": "local", "context": {"cluster": "c", "user": "u"}}],
        "clusters": [
            {
                "name": "c",
                "cluster": {
                    "server": "https://127.0.0.1:6443/",
                    "certificate-authority-data": data[pki.ca.cert],
                },
            }
        ],
        "users": [
            {
                "name": "u",
                "user": {
                    "client-certificate-data": data[pki.admin.cert],
                    "client-key-data": data[pki.admin.key],
                    "token": "abc",
                },
            }
        ],
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    connection = from_kubeconfig(path)
    assert connection.server == "https://127.0.0.1:6443"
    assert isinstance(connection.auth, StaticToken)
    assert connection.tls.get_ca_certs()  # the cluster CA is trusted
    # Files relative to the kubeconfig, a token file, and a named context that does not exist.
    config["clusters"][0]["cluster"] = {"server": "https://x", "certificate-authority": "pki/ca.crt"}
    config["users"][0]["user"] = {"tokenFile": "token"}
    path.write_text(yaml.safe_dump(config))
    (tmp_path / "token").write_text("t")
    assert isinstance(from_kubeconfig(path).auth, TokenFile)
    with pytest.raises(ConfigError, match="no context named 'other'"):
        from_kubeconfig(path, context="other")


def test_in_cluster_reads_the_projected_token_file(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    pki.create()
    (tmp_path / "ca.crt").write_bytes(pki.ca.cert.read_bytes())
    (tmp_path / "token").write_text("sa-token")
    connection = in_cluster(
        tmp_path, {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    )
    assert connection.server == "https://10.0.0.1:443"
    assert isinstance(connection.auth, TokenFile) and connection.auth.token() == "sa-token"
    with pytest.raises(ConfigError, match="not in a cluster"):
        in_cluster(tmp_path, {})


async def test_kopf_logs_in_with_the_same_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kopf's own connection comes from `ampacity.kubeconfig` too (exec plugins included)."""
    from controllers.settings import login

    pki = Pki(tmp_path / "pki")
    pki.create()
    config = {
        "current-context": "c",
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
        "clusters": [
            {"name": "c", "cluster": {"server": "https://127.0.0.1:1", "certificate-authority": "pki/ca.crt"}}
        ],
        "users": [{"name": "u", "user": {"exec": exec_plugin(tmp_path, timedelta(hours=1))}}],
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setenv("KUBECONFIG", str(path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    info = await login()
    assert info.server == "https://127.0.0.1:1" and info.token == "token-1"
    assert info.ca_data == pki.ca.cert.read_bytes()
    assert info.expiration is not None and info.expiration > datetime.now(UTC)


def one_connection_held(monkeypatch: pytest.MonkeyPatch) -> tuple[Kube, asyncio.Event, list[str]]:
    """A client with one connection, whose GET of a pod named "holder" holds it until the gate is
    set; the names of the pods GET, in the order the server answered."""
    from ampacity import kube as kube_module

    monkeypatch.setattr(kube_module, "MAX_CONNECTIONS", 1)
    gate = asyncio.Event()
    served: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        name = request.url.path.rsplit("/", 1)[-1]
        if name == "holder":
            await gate.wait()
        served.append(name)
        return httpx.Response(200, json={"metadata": {"name": name}})

    return client(httpx.MockTransport(handler)), gate, served


async def test_requests_queue_by_lane_when_every_connection_is_busy(monkeypatch: pytest.MonkeyPatch) -> None:
    """With every connection busy, a new object's children go before the rest of new passes,
    and those before routine requests queued earlier; a request cancelled while it waits keeps
    no slot."""
    from ampacity.kube import LANE, Lane

    kube, gate, served = one_connection_held(monkeypatch)

    async def get(name: str, lane: Lane = Lane.ROUTINE) -> None:
        LANE.set(lane)
        await kube.get("Pod", "ns", name)

    async def queue(name: str, lane: Lane = Lane.ROUTINE) -> asyncio.Task[None]:
        task = asyncio.create_task(get(name, lane))
        await asyncio.sleep(0.01)
        return task

    holder = await queue("holder")
    routine = await queue("routine")
    cancelled = await queue("cancelled")
    new_generation = await queue("new-generation", Lane.NEW_GENERATION)
    first_child = await queue("first-child", Lane.FIRST_CHILDREN)
    cancelled.cancel()
    gate.set()
    await asyncio.gather(holder, routine, new_generation, first_child)
    assert served == ["holder", "first-child", "new-generation", "routine"]
    await asyncio.wait_for(get("after"), 1.0)  # the cancelled waiter left no slot taken
    await kube.close()


async def test_within_a_lane_the_pass_granted_fewest_requests_goes_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Three passes queue children in one lane (the first three, then one, then two): each pass's
    first child goes before any pass's second, and a pass's own requests keep their order."""
    from ampacity.kube import FLOW, LANE, Flow, Lane

    kube, gate, served = one_connection_held(monkeypatch)

    async def get(name: str, flow: Flow | None) -> None:
        LANE.set(Lane.FIRST_CHILDREN)
        FLOW.set(flow)
        await kube.get("Pod", "ns", name)

    tasks = [asyncio.create_task(get("holder", None))]
    await asyncio.sleep(0.01)
    one, two, three = Flow(), Flow(), Flow()
    for name, flow in [("a1", one), ("a2", one), ("a3", one), ("b1", two), ("c1", three), ("c2", three)]:
        tasks.append(asyncio.create_task(get(name, flow)))
        await asyncio.sleep(0.01)
    gate.set()
    await asyncio.gather(*tasks)
    assert served == ["holder", "a1", "b1", "c1", "a2", "c2", "a3"]
    await kube.close()
