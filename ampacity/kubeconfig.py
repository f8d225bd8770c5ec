"""Where the API server is and how to prove who we are: kubeconfig or in-cluster service account.

Read without the `kubernetes` package (whose loader the client used for a dozen lines). Credentials
that expire are refreshed while the process runs, as client-go does:

- a projected service-account token (in-cluster, or a kubeconfig `tokenFile`) is re-read when the
  file changes, at least every minute, and once more after a 401;
- an `exec` credential plugin (client.authentication.k8s.io/v1 or v1beta1) is run again when its
  `expirationTimestamp` is near, and after a 401; concurrent requests share one run;
- client certificates (files or inline data) and the cluster CA (file or inline data) go into the TLS
  context; `insecure-skip-tls-verify` is honoured.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import ssl
import tempfile
import time
from collections.abc import AsyncGenerator, Generator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import yaml

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
#: Re-read a token file at least this often (client-go: one minute), even if its mtime did not move.
TOKEN_FILE_RELOAD_SECONDS = 60.0
#: Run an exec plugin again this long before the credential it gave expires.
EXEC_EXPIRY_MARGIN_SECONDS = 30.0
EXEC_API_VERSIONS = ("client.authentication.k8s.io/v1", "client.authentication.k8s.io/v1beta1")


class ConfigError(RuntimeError):
    """The connection settings cannot be loaded; the message says which setting and why."""


@dataclass(frozen=True)
class Connection:
    """What a client needs: the server URL, its TLS context and the credential flow; and the raw
    material (CA, client certificate) for kopf's own connection (`controllers.settings`)."""

    server: str
    tls: ssl.SSLContext
    auth: httpx.Auth | None
    ca_data: bytes | None = None
    insecure: bool = False
    client_cert: tuple[bytes, bytes] | None = None

    async def bearer_token(self) -> tuple[str | None, datetime | None]:
        """The current bearer token (refreshed if due) and when it expires, if it says."""
        auth = self.auth
        if isinstance(auth, StaticToken):
            return auth.token, None
        if isinstance(auth, TokenFile):
            return auth.token(), None
        if isinstance(auth, ExecCredential):
            token = await auth.current()
            return token, auth.expires_at
        return None, None


class StaticToken(httpx.Auth):
    def __init__(self, token: str) -> None:
        self.token = token
        self._header = f"Bearer {token}"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = self._header
        yield request


class TokenFile(httpx.Auth):
    """A bearer token read from a file the kubelet rotates (projected service-account tokens)."""

    def __init__(self, path: Path, reload_seconds: float = TOKEN_FILE_RELOAD_SECONDS) -> None:
        self.path = path
        self._reload_seconds = reload_seconds
        self._token = ""
        self._mtime = -1.0
        self._read_at = -float("inf")

    def token(self, force: bool = False) -> str:
        try:
            mtime = self.path.stat().st_mtime
        except OSError as error:
            raise ConfigError(f"the token file {self.path} cannot be read: {error.strerror}") from error
        stale = time.monotonic() - self._read_at >= self._reload_seconds
        if force or stale or mtime != self._mtime or not self._token:
            self._token = self.path.read_text().strip()
            self._mtime, self._read_at = mtime, time.monotonic()
        return self._token

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self.token()}"
        response = yield request
        if response.status_code == 401:  # rotated between our last read and now: read it again
            request.headers["Authorization"] = f"Bearer {self.token(force=True)}"
            yield request


class ExecCredential(httpx.Auth):
    """A token from a kubeconfig `exec` plugin (cloud CLIs, OIDC helpers), refreshed before it expires."""

    def __init__(self, config: Mapping[str, Any], server: str) -> None:
        api_version = str(config.get("apiVersion", ""))
        if api_version not in EXEC_API_VERSIONS:
            raise ConfigError(
                f"the kubeconfig exec plugin uses apiVersion {api_version!r}; "
                f"supported: {', '.join(EXEC_API_VERSIONS)}"
            )
        if not config.get("command"):
            raise ConfigError("the kubeconfig exec plugin has no command")
        self._config = config
        self._server = server
        self._token = ""
        self._expires = 0.0
        self._lock = asyncio.Lock()

    def _command(self) -> tuple[list[str], dict[str, str]]:
        env = dict(os.environ)
        env.update({str(e["name"]): str(e["value"]) for e in self._config.get("env") or []})
        info = {
            "apiVersion": self._config["apiVersion"],
            "kind": "ExecCredential",
            "spec": {"interactive": False, "cluster": {"server": self._server}},
        }
        env["KUBERNETES_EXEC_INFO"] = json.dumps(info)
        return [str(self._config["command"]), *map(str, self._config.get("args") or [])], env

    def _accept(self, output: bytes) -> None:
        try:
            status = json.loads(output)["status"]
        except (ValueError, KeyError, TypeError) as error:
            raise ConfigError("the kubeconfig exec plugin did not print an ExecCredential") from error
        if not status.get("token"):
            raise ConfigError(
                "the kubeconfig exec plugin returned no token (client certificates from a plugin "
                "are not supported)"
            )
        self._token = str(status["token"])
        expiry = status.get("expirationTimestamp")
        if expiry:
            at = datetime.fromisoformat(str(expiry).replace("Z", "+00:00")).astimezone(UTC)
            self._expires = at.timestamp() - EXEC_EXPIRY_MARGIN_SECONDS
        else:
            self._expires = float("inf")  # valid until the server says 401

    async def _refresh(self, failed: str | None) -> str:
        async with self._lock:
            # Another request may have refreshed it while this one waited for the lock.
            if self._token and self._token != failed and time.time() < self._expires:
                return self._token
            command, env = self._command()
            try:
                process = await asyncio.create_subprocess_exec(
                    *command,
                    env=env,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                )
            except OSError as error:
                raise ConfigError(f"cannot run the kubeconfig exec plugin {command[0]}: {error}") from error
            stdout, stderr = await process.communicate()
            if process.returncode != 0:
                raise ConfigError(
                    f"the kubeconfig exec plugin {command[0]} exited with {process.returncode}: "
                    f"{stderr.decode(errors='replace').strip()[:500]}"
                )
            self._accept(stdout)
            return self._token

    async def current(self) -> str:
        """The token, run again first when it is about to expire."""
        return self._token if self._token and time.time() < self._expires else await self._refresh(None)

    @property
    def expires_at(self) -> datetime | None:
        if not self._token or self._expires == float("inf"):
            return None
        return datetime.fromtimestamp(self._expires, UTC)

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        token = await self.current()
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code == 401:
            request.headers["Authorization"] = f"Bearer {await self._refresh(token)}"
            yield request

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        raise ConfigError("exec credentials need the async client")
        yield request  # pragma: no cover


def _data(value: str) -> bytes:
    return base64.b64decode(value)


def _tls(
    ca_file: str | None, ca_data: bytes | None, insecure: bool, cert: tuple[bytes, bytes] | None
) -> ssl.SSLContext:
    if ca_data is not None:
        context = ssl.create_default_context(cadata=ca_data.decode())
    else:
        context = ssl.create_default_context(cafile=ca_file)
    if insecure:
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    if cert is not None:
        # The ssl module loads certificates from files only: write them where only we can read.
        with tempfile.TemporaryDirectory(prefix="ampacity-tls-") as tmp:
            cert_path, key_path = Path(tmp) / "client.crt", Path(tmp) / "client.key"
            for path, content in ((cert_path, cert[0]), (key_path, cert[1])):
                path.touch(mode=0o600)
                path.write_bytes(content)
            context.load_cert_chain(cert_path, key_path)
    return context


def in_cluster(directory: Path = SERVICE_ACCOUNT_DIR, environ: Mapping[str, str] = os.environ) -> Connection:
    host, port = environ.get("KUBERNETES_SERVICE_HOST"), environ.get("KUBERNETES_SERVICE_PORT", "443")
    if not host:
        raise ConfigError("not in a cluster: KUBERNETES_SERVICE_HOST is not set")
    if ":" in host:  # IPv6
        host = f"[{host}]"
    ca = directory / "ca.crt"
    return Connection(
        server=f"https://{host}:{port}",
        tls=_tls(str(ca), None, False, None),
        auth=TokenFile(directory / "token"),
        ca_data=ca.read_bytes(),
    )


def _named(entries: list[dict[str, Any]] | None, name: str, what: str, path: Path) -> dict[str, Any]:
    for entry in entries or []:
        if entry.get("name") == name:
            return dict(entry.get(what) or {})
    raise ConfigError(f"{path}: no {what} named {name!r}")


def from_kubeconfig(path: Path, context: str | None = None) -> Connection:
    """The connection of a kubeconfig file's current (or named) context; relative paths are
    relative to the file, as kubectl reads them."""
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except OSError as error:
        raise ConfigError(f"cannot read the kubeconfig {path}: {error.strerror}") from error
    except yaml.YAMLError as error:
        raise ConfigError(f"the kubeconfig {path} is not YAML: {error}") from error
    name = context or config.get("current-context")
    if not name:
        raise ConfigError(f"{path}: no current-context")
    ctx = _named(config.get("contexts"), name, "context", path)
    cluster = _named(config.get("clusters"), str(ctx.get("cluster")), "cluster", path)
    user = _named(config.get("users"), str(ctx.get("user")), "user", path) if ctx.get("user") else {}
    server = cluster.get("server")
    if not server:
        raise ConfigError(f"{path}: cluster {ctx.get('cluster')!r} has no server")

    def local(file: str) -> str:
        return str((path.parent / file).resolve())

    cert: tuple[bytes, bytes] | None = None
    if user.get("client-certificate-data") and user.get("client-key-data"):
        cert = (_data(user["client-certificate-data"]), _data(user["client-key-data"]))
    elif user.get("client-certificate") and user.get("client-key"):
        cert = (
            Path(local(user["client-certificate"])).read_bytes(),
            Path(local(user["client-key"])).read_bytes(),
        )
    ca_data = (
        _data(cluster["certificate-authority-data"]) if cluster.get("certificate-authority-data") else None
    )
    ca_file = local(cluster["certificate-authority"]) if cluster.get("certificate-authority") else None
    insecure = bool(cluster.get("insecure-skip-tls-verify"))
    tls = _tls(ca_file, ca_data, insecure, cert)
    if ca_data is None and ca_file is not None:
        ca_data = Path(ca_file).read_bytes()

    auth: httpx.Auth | None = None
    if user.get("token"):
        auth = StaticToken(str(user["token"]))
    elif user.get("tokenFile"):
        auth = TokenFile(Path(local(user["tokenFile"])))
    elif user.get("exec"):
        auth = ExecCredential(user["exec"], str(server))
    elif user.get("username") and user.get("password"):
        auth = httpx.BasicAuth(str(user["username"]), str(user["password"]))
    elif user.get("auth-provider"):
        raise ConfigError(f"{path}: auth-provider plugins are not supported; use an exec plugin")
    return Connection(
        server=str(server).rstrip("/"),
        tls=tls,
        auth=auth,
        ca_data=ca_data,
        insecure=insecure,
        client_cert=cert,
    )


def default_kubeconfig(environ: Mapping[str, str] = os.environ) -> Path:
    """$KUBECONFIG (its first existing file) or ~/.kube/config."""
    for entry in (environ.get("KUBECONFIG") or "").split(os.pathsep):
        if entry and Path(entry).expanduser().exists():
            return Path(entry).expanduser()
    return Path.home() / ".kube" / "config"


def load(kubeconfig: str | None = None) -> Connection:
    """An explicit kubeconfig, else the in-cluster service account, else $KUBECONFIG/~/.kube/config."""
    if kubeconfig:
        return from_kubeconfig(Path(kubeconfig))
    if os.environ.get("KUBERNETES_SERVICE_HOST") and (SERVICE_ACCOUNT_DIR / "token").exists():
        return in_cluster()
    return from_kubeconfig(default_kubeconfig())
