"""Where the API server is and how to authenticate: :class:`ApiTarget` from in-cluster
settings, a kubeconfig or ``--master``."""

from __future__ import annotations

import importlib
import os
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

import yaml

from kpy.sources import kubeconfig as kubeconfig_files
from kpy.sources.kube.api import IN_CLUSTER_CA, IN_CLUSTER_TOKEN, KubeConfigError


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiTarget:
    """Where and how to reach the API server: taken from a client Configuration."""

    scheme: str
    host: str
    port: int
    base_path: str = ""
    ssl_context: ssl.SSLContext | None = None
    server_hostname: str | None = None
    auth: Callable[[], dict[str, str]] = field(default=lambda: {})
    auth_may_block: bool = False  # token refresh may read a file or run an exec plugin

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}{self.base_path}"

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> ApiTarget:
        if "://" not in url:
            url = "https://" + url
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise KubeConfigError(f"not an API server address: {url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(
            scheme=parts.scheme,
            host=parts.hostname,
            port=port,
            base_path=parts.path.rstrip("/"),
            **kwargs,
        )

    @classmethod
    def from_configuration(cls, configuration: Any) -> ApiTarget:
        """From a ``kubernetes.client.Configuration`` (TLS files, token, basic auth)."""
        context: ssl.SSLContext | None = None
        if configuration.host.startswith("https"):
            context = ssl.create_default_context(cafile=configuration.ssl_ca_cert or None)
            if configuration.cert_file:
                context.load_cert_chain(configuration.cert_file, configuration.key_file)
            if not configuration.verify_ssl:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            elif getattr(configuration, "assert_hostname", None) is False:
                context.check_hostname = False

        def auth() -> dict[str, str]:
            headers: dict[str, str] = {}
            for setting in configuration.auth_settings().values():  # refreshes tokens
                if setting.get("in") == "header" and setting.get("value"):
                    headers[str(setting["key"]).title()] = str(setting["value"])
            if not headers and (configuration.username or configuration.password):
                headers["Authorization"] = configuration.get_basic_auth_token()
            return headers

        return cls.from_url(
            configuration.host,
            ssl_context=context,
            server_hostname=getattr(configuration, "tls_server_name", None) or None,
            auth=auth,
            auth_may_block=configuration.refresh_api_key_hook is not None,
        )


def load_target(
    *,
    kubeconfig: str = "",
    master: str = "",
    environ: Mapping[str, str] | None = None,
    token_file: str = IN_CLUSTER_TOKEN,
    ca_file: str = IN_CLUSTER_CA,
) -> ApiTarget:
    """The API server to use, like kube-proxy: kubeconfig, else in-cluster, else master.

    ``master`` overrides the address from a kubeconfig or the in-cluster environment
    (credentials are kept): without kube-proxy the ``kubernetes`` Service VIP is not
    programmed yet, so the agent must reach the API server directly. So does setting
    ``KUBERNETES_SERVICE_HOST``/``PORT`` in the DaemonSet, which in-cluster reads.

    Read by :mod:`kpy.sources.kubeconfig`; the official client (slow to import) only
    for what that leaves to it (exec plugins, auth providers, merged kubeconfigs).
    """
    env = os.environ if environ is None else environ
    where = "in-cluster configuration"
    try:
        settings: kubeconfig_files.Settings | None
        if kubeconfig:
            where = kubeconfig
            settings = kubeconfig_files.from_file(kubeconfig)
        elif env.get("KUBERNETES_SERVICE_HOST") and os.path.exists(token_file):
            settings = kubeconfig_files.in_cluster(env, token_file, ca_file)
        elif master:
            settings = kubeconfig_files.Settings(host="")
        else:
            where = env.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
            if not os.path.exists(where.split(os.pathsep)[0]):
                raise KubeConfigError(
                    "no API server: not in a cluster (no KUBERNETES_SERVICE_HOST and service "
                    "account token), no --kubeconfig, no --master, and no default kubeconfig"
                )
            settings = kubeconfig_files.from_file(where)
        if settings is None:
            return _load_with_client(where, master)
        if master:
            where = f"--master {master}"
            settings = replace(settings, host=master if "://" in master else f"https://{master}")
        return ApiTarget.from_url(
            settings.host,
            ssl_context=settings.ssl_context(),
            server_hostname=settings.tls_server_name,
            auth=settings.auth,
            auth_may_block=settings.auth_may_block,
        )
    except (yaml.YAMLError, OSError, ValueError, TypeError) as exc:
        if isinstance(exc, KubeConfigError):
            raise
        raise KubeConfigError(f"{where}: {type(exc).__name__}: {exc}") from exc


def _load_with_client(where: str, master: str) -> ApiTarget:
    """A kubeconfig through the official client's loader (exec, auth-provider, merges)."""
    # The client is needed for configuration only (and its functions are untyped: the
    # modules are held as Any, so nothing untyped leaks past this function).
    client: Any = importlib.import_module("kubernetes.client")
    config: Any = importlib.import_module("kubernetes.config")
    configuration = client.Configuration()
    try:
        config.load_kube_config(config_file=where, client_configuration=configuration)
        if master:
            where = f"--master {master}"
            configuration.host = master if "://" in master else f"https://{master}"
        return ApiTarget.from_configuration(configuration)
    except config.ConfigException as exc:
        raise KubeConfigError(f"{where}: {type(exc).__name__}: {exc}") from exc
