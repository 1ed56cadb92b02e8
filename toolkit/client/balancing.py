"""Several Triton replicas behind one gRPC channel, balanced by gRPC itself.

gRPC keeps one long-lived HTTP/2 connection per channel, so a Kubernetes Service in front of Triton
pins every request of a client to one pod. The remedy is gRPC's own client-side balancing: a target
that resolves to every replica, the ``round_robin`` policy, and a retry policy for UNAVAILABLE, in
the channel's service config, handed to tritonclient as ``channel_args``. No balancer of our own.

Health: round_robin takes a replica out of the rotation as soon as its connection fails, and the
retry policy sends a call that could not reach it to another one. gRPC's client-side health
checking is not used: Triton (24.10) answers ``grpc.health.v1.Health/Check`` but not ``Watch``,
which that feature needs (the channel would log an error and assume "healthy" anyway); a replica
that is up but not ready is taken out of rotation by Kubernetes' readiness probe instead.

Addresses, as users give them:

    127.0.0.1:8001                          one replica (a plain channel, as before)
    127.0.0.1:8001,127.0.0.1:8004           several: gRPC's ipv4/ipv6 resolver lists them
    dns:///triton-headless.ns.svc:8001      a DNS name with several A records (a headless Service)
"""

from __future__ import annotations

import json
import re

from toolkit.errors import ToolkitError

#: Retried by the channel itself on another replica: the call never reached a model (connection
#: refused, replica gone), so sending it again is safe.
RETRY_POLICY = {
    "maxAttempts": 4,
    "initialBackoff": "0.1s",
    "maxBackoff": "1s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}
_HOST_PORT = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


def split_addresses(url: str | list[str] | tuple[str, ...]) -> list[str]:
    """The replicas named by ``url`` (a comma-separated string or a list), checked as host:port."""
    items = [u.strip() for u in (url.split(",") if isinstance(url, str) else url) if u.strip()]
    if not items:
        raise ToolkitError("no Triton address given (expected host:port, a comma-separated list, or dns:///name:port)")
    for item in items:
        if item.startswith("dns:///"):
            if len(items) > 1:
                raise ToolkitError(f"'{item}': a dns:/// name resolves to its replicas itself; give it alone")
            continue
        bare = item.removeprefix("grpc://").removeprefix("http://")
        if not _HOST_PORT.match(bare):
            raise ToolkitError(f"'{item}' is not host:port (expected e.g. 127.0.0.1:8001)")
    return [i.removeprefix("grpc://").removeprefix("http://") for i in items]


def grpc_target(url: str | list[str] | tuple[str, ...]) -> str:
    """The gRPC target for one or several replicas."""
    addresses = split_addresses(url)
    if len(addresses) == 1:
        return addresses[0]
    scheme = "ipv6" if all(a.startswith("[") for a in addresses) else "ipv4"
    if scheme == "ipv4" and not all(re.match(r"^\d+\.\d+\.\d+\.\d+:", a) for a in addresses):
        raise ToolkitError(f"several addresses must be IP:port ({', '.join(addresses)}); for host names "
                           "use one dns:///name:port that resolves to every replica")
    return f"{scheme}:{','.join(addresses)}"


def is_balanced(url: str | list[str] | tuple[str, ...]) -> bool:
    addresses = split_addresses(url)
    return len(addresses) > 1 or addresses[0].startswith("dns:///")


def service_config(*, health_check: bool = False, retry: bool = True) -> str:
    config: dict = {"loadBalancingConfig": [{"round_robin": {}}]}
    if health_check:
        config["healthCheckConfig"] = {"serviceName": ""}
    if retry:
        config["methodConfig"] = [{"name": [{"service": "inference.GRPCInferenceService"}],
                                   "retryPolicy": RETRY_POLICY}]
    return json.dumps(config)


def channel_args(url: str | list[str] | tuple[str, ...]) -> list[tuple[str, object]] | None:
    """tritonclient's ``channel_args`` for ``url``: None (tritonclient's defaults) for one replica;
    round_robin, health checking and retries for several. tritonclient's own defaults (message
    sizes, keepalive) are kept."""
    if not is_balanced(url):
        return None
    return [
        ("grpc.max_send_message_length", 2**31 - 1),
        ("grpc.max_receive_message_length", 2**31 - 1),
        ("grpc.keepalive_time_ms", 2**31 - 1),
        ("grpc.keepalive_timeout_ms", 20000),
        ("grpc.keepalive_permit_without_calls", False),
        ("grpc.http2.max_pings_without_data", 2),
        ("grpc.lb_policy_name", "round_robin"),
        ("grpc.service_config", service_config()),
        ("grpc.enable_retries", 1),
        # A replica that went away is tried again soon after it comes back.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]
