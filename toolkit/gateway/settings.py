"""The gateway's settings file: go-infer's ``settings.yaml`` (its ``API`` section as it is) plus
the Triton connection, the per-API data <-> tensor mapping and the error codes.

    API:                      # go-infer's section, same keys
      Port: 5000
      Addr: 127.0.0.1
      AppIdSecret: {"3EA2...": "41DF..."}
      SM2PrivateKey: "JShs..."  # or SM2PublicKey alone
      ReqTimeDiff: 300          # allowed |now - timestamp|, seconds
    Triton: {Url: 127.0.0.1:8001, Timeout: 10}
    Apis:                     # optional: defaults come from each model's metadata
      embedding: {Inputs: {text: {Tensor: TEXT, Kind: text}}, Outputs: {EMBEDDING: embeddings}}
    ErrCode: {BadSignature: 9800}   # optional: override go-infer's numbers

go-infer's ``Server`` (Redis queue) and ``Customer`` sections are accepted and ignored, so an
existing settings file loads unchanged. Secrets are ``SecretStr``: they never show in a repr or log.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from toolkit.errors import GatewayError

Kind = Literal["text", "base64", "number"]
_API_PATH = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)*$")
_HEADER_KEY = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


class _Section(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="forbid", frozen=True)


def normalise_api_path(path: str) -> str:
    """``embedding``, ``/embedding`` and go-infer's ``/api/embedding`` all name ``POST /api/embedding``."""
    name = path.strip()
    name = name[len("/api/"):] if name.startswith("/api/") else name.lstrip("/")
    if not _API_PATH.match(name) or ".." in name.split("/"):
        raise ValueError(f"api path {path!r}: use letters, digits, '_', '-', '.' and '/' segments")
    return name


class AppRate(_Section):
    per_second: float = Field(alias="PerSecond", ge=0)
    burst: float = Field(alias="Burst", ge=1)


class RateLimit(_Section):
    """Requests per second and burst per appId (PerSecond 0: unlimited); ``Apps`` overrides per app."""

    per_second: float = Field(200.0, alias="PerSecond", ge=0)
    burst: float = Field(400.0, alias="Burst", ge=1)
    apps: dict[str, AppRate] = Field(default_factory=dict, alias="Apps")


class ApiSection(_Section):
    """go-infer's ``API:`` section, with the gateway's safety settings next to it."""

    port: int = Field(5000, alias="Port", ge=0, le=65535)
    addr: str = Field("127.0.0.1", alias="Addr")
    app_id_secret: dict[str, SecretStr] = Field(alias="AppIdSecret", min_length=1)
    #: App ids that may send ``signType: plain`` (no signature). Off for everyone by default.
    plain_app_ids: list[str] = Field(default_factory=list, alias="PlainAppIds")
    #: go-infer's setting: the base64 private key; the gateway only needs the public key it implies.
    sm2_private_key: SecretStr | None = Field(None, alias="SM2PrivateKey")
    sm2_public_key: str | None = Field(None, alias="SM2PublicKey")
    req_time_diff: int = Field(300, alias="ReqTimeDiff", gt=0)
    reject_replay: bool = Field(True, alias="RejectReplay")
    replay_cache_size: int = Field(100_000, alias="ReplayCacheSize", gt=0)
    max_body_bytes: int = Field(16 * 1024 * 1024, alias="MaxBodyBytes", gt=0)
    max_json_depth: int = Field(32, alias="MaxJsonDepth", gt=1)
    #: Also accept ``data`` signed as Python's ``json.dumps`` writes it (go-infer's test client).
    accept_python_json: bool = Field(True, alias="AcceptPythonJson")
    #: A request whose body has not fully arrived after this many seconds is answered 9801 (HTTP 408).
    body_read_timeout: float = Field(10.0, alias="BodyReadTimeout", gt=0)
    #: Open connections beyond this are answered 503 by the server (uvicorn's limit_concurrency).
    max_connections: int = Field(256, alias="MaxConnections", gt=0)
    #: Connections from one client address beyond this are answered 503 (9996) and closed at once;
    #: below MaxConnections, so one address never takes every connection (nginx's limit_conn).
    max_connections_per_client: int = Field(64, alias="MaxConnectionsPerClient", gt=0)
    #: Seconds for a request line and headers to arrive whole, from the connection opening or the
    #: previous answer; then the connection is closed (408 if part arrived; nginx's client_header_timeout).
    header_timeout: float = Field(10.0, alias="HeaderTimeout", gt=0)
    #: Seconds an idle keep-alive connection stays open after an answer (uvicorn's timeout_keep_alive).
    keep_alive_timeout: float = Field(5.0, alias="KeepAliveTimeout", gt=0)
    #: Processes that parse and verify small SM2 requests off the event loop (0: threads of the gateway).
    check_workers: int = Field(1, alias="CheckWorkers", ge=0, le=64)
    #: Processes that check bodies of LargeBodyBytes or more, apart from the small ones (0: with them).
    #: Each lane serves client addresses round-robin, at most workers - 1 (at least 1) busy with one.
    large_check_workers: int = Field(2, alias="LargeCheckWorkers", ge=0, le=64)
    large_body_bytes: int = Field(64 * 1024, alias="LargeBodyBytes", gt=0)
    #: Requests being checked at once; more are answered 9996 (busy) at once.
    max_pending_checks: int = Field(64, alias="MaxPendingChecks", gt=0)
    #: Requests and body bytes one client address may have being read or checked at once; more are
    #: answered 9996 (HTTP 503) at once, before the body is read when Content-Length says so.
    max_pending_checks_per_client: int = Field(32, alias="MaxPendingChecksPerClient", gt=0)
    max_pending_bytes_per_client: int = Field(32 * 1024 * 1024, alias="MaxPendingBytesPerClient", gt=0)
    #: Token bucket per appId, applied after authentication; 429 and RateLimited when empty.
    rate_limit: RateLimit = Field(default_factory=lambda: RateLimit(), alias="RateLimit")

    @field_validator("app_id_secret")
    @classmethod
    def _secrets_not_empty(cls, value: dict[str, SecretStr]) -> dict[str, SecretStr]:
        empty = sorted(k for k, v in value.items() if not k or not v.get_secret_value())
        if empty:
            raise ValueError(f"empty app id or secret: {empty}")
        return value

    @model_validator(mode="after")
    def _plain_ids_known(self) -> ApiSection:
        unknown = sorted(set(self.plain_app_ids) - set(self.app_id_secret))
        if unknown:
            raise ValueError(f"PlainAppIds not in AppIdSecret: {unknown}")
        return self

    @model_validator(mode="after")
    def _per_client_below_global(self) -> ApiSection:
        problems = []
        if self.max_connections_per_client >= self.max_connections:
            problems.append(f"MaxConnectionsPerClient ({self.max_connections_per_client}) must be below "
                            f"MaxConnections ({self.max_connections})")
        if self.max_pending_checks_per_client > self.max_pending_checks:
            problems.append(f"MaxPendingChecksPerClient ({self.max_pending_checks_per_client}) must not exceed "
                            f"MaxPendingChecks ({self.max_pending_checks})")
        if self.max_pending_bytes_per_client < self.max_body_bytes:
            problems.append(f"MaxPendingBytesPerClient ({self.max_pending_bytes_per_client}) must be at least "
                            f"MaxBodyBytes ({self.max_body_bytes})")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class TritonSection(_Section):
    #: Triton's gRPC address: host:port, several separated by commas, or dns:///name:port; several
    #: replicas are balanced by gRPC itself (toolkit/client/balancing.py).
    url: str = Field("127.0.0.1:8001", alias="Url", description="Triton's gRPC address(es)")
    #: gzip the gateway's calls to Triton (worth it only on a slow link; see BENCHMARKS.md).
    compression: Literal["gzip"] | None = Field(None, alias="Compression")
    #: Per-request deadline in seconds (go-infer's ``Server.MessageTimeout``).
    timeout: float = Field(10.0, alias="Timeout", gt=0)
    #: ``KEY=VALUE`` given to ``toolkit serve --restrict-apis``: sent with the model-repository calls
    #: of start-up discovery (never with inference, which is not restricted).
    admin_header: SecretStr | None = Field(None, alias="AdminHeader")

    @field_validator("admin_header")
    @classmethod
    def _key_value(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            key, sep, secret = value.get_secret_value().partition("=")
            if not sep or not secret or not _HEADER_KEY.match(key):
                raise ValueError("expected KEY=VALUE with a lower-case header KEY")
        return value


class InputMapping(_Section):
    tensor: str = Field(alias="Tensor")
    #: text: a UTF-8 string -> BYTES; base64: base64 of binary data -> BYTES; number: numbers.
    #: Default: from the tensor (see ``toolkit.gateway.mapping.default_kind``).
    kind: Kind | None = Field(None, alias="Kind")


class ApiMapping(_Section):
    #: The Triton model or ensemble (default: the one whose ``toolkit.api_path`` is this path).
    model: str | None = Field(None, alias="Model")
    #: ``data`` field -> input tensor (default: every input, field = lower-cased tensor name).
    inputs: dict[str, InputMapping] | None = Field(None, alias="Inputs")
    #: output tensor -> response ``data`` field (default: every output, lower-cased and plural).
    outputs: dict[str, str] | None = Field(None, alias="Outputs")
    timeout: float | None = Field(None, alias="Timeout", gt=0)


class ErrorCodes(_Section):
    """The numbers clients see; go-infer's by default."""

    bad_signature: int = Field(9800, alias="BadSignature")
    missing_parameter: int = Field(9801, alias="MissingParameter")
    timestamp_out_of_window: int = Field(9802, alias="TimestampOutOfWindow")
    unknown_sign_type: int = Field(9803, alias="UnknownSignType")
    unknown_app_id: int = Field(9805, alias="UnknownAppId")
    wrong_version: int = Field(9806, alias="WrongVersion")
    replayed_signature: int = Field(9800, alias="ReplayedSignature")
    unknown_api_path: int = Field(9709, alias="UnknownApiPath")
    api_entry_failed: int = Field(9701, alias="ApiEntryFailed")
    queue_timeout: int = Field(9997, alias="QueueTimeout")
    inference_failed: int = Field(9998, alias="InferenceFailed")
    #: Busy or restarting: a full queue, a model reloading, the gateway's own checks saturated (503).
    unavailable: int = Field(9996, alias="Unavailable")
    #: The appId's rate limit is exceeded (429).
    rate_limited: int = Field(9810, alias="RateLimited")


class VariantMapping(_Section):
    name: str = Field(alias="Name", min_length=1)
    model: str = Field(alias="Model", min_length=1)
    version: str = Field("", alias="Version", pattern=r"^[0-9]*$")
    weight: float = Field(alias="Weight", ge=0)


class EndpointMapping(_Section):
    """An API path split between variants by weight (Paddle Serving's variant_weight_list)."""

    variants: list[VariantMapping] = Field(alias="Variants", min_length=1)
    #: A top-level request field (e.g. appId) whose value always picks the same variant.
    sticky: str | None = Field(None, alias="Sticky")

    @model_validator(mode="after")
    def _weights(self) -> EndpointMapping:
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must differ, got {names}")
        if sum(v.weight for v in self.variants) <= 0:
            raise ValueError(f"weights must sum to more than 0, got {[v.weight for v in self.variants]}")
        return self


class GatewaySettings(_Section):
    api: ApiSection = Field(alias="API")
    triton: TritonSection = Field(default_factory=TritonSection, alias="Triton")
    apis: dict[str, ApiMapping] = Field(default_factory=dict, alias="Apis")
    endpoints: dict[str, EndpointMapping] = Field(default_factory=dict, alias="Endpoints")
    err_code: ErrorCodes = Field(default_factory=ErrorCodes, alias="ErrCode")
    #: go-infer's Redis queue and custom settings: accepted so its file loads, not used.
    server: dict[str, Any] | None = Field(None, alias="Server")
    customer: dict[str, Any] | None = Field(None, alias="Customer")

    @field_validator("apis", "endpoints")
    @classmethod
    def _normalise_paths(cls, value: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for path, mapping in value.items():
            name = normalise_api_path(path)
            if name in out:
                raise ValueError(f"api path {name!r} is configured twice")
            out[name] = mapping
        return out

    @model_validator(mode="after")
    def _sm2_key_usable(self) -> GatewaySettings:
        from toolkit.gateway.signing import Sm2KeyError, Sm2Verifier

        private = self.api.sm2_private_key.get_secret_value() if self.api.sm2_private_key else None
        if private or self.api.sm2_public_key:
            try:
                Sm2Verifier.from_settings(private, self.api.sm2_public_key)
            except Sm2KeyError as e:
                raise ValueError(str(e)) from None
        return self


def parse_settings(raw: Any, *, source: str = "settings") -> GatewaySettings:
    if not isinstance(raw, dict):
        raise GatewayError(f"{source}: expected a mapping with an API section")
    try:
        return GatewaySettings.model_validate(raw)
    except ValidationError as e:
        problems = "\n".join(f"  {'.'.join(map(str, err['loc'])) or '(top)'}: {err['msg']}"
                             for err in e.errors(include_url=False, include_input=False))
        raise GatewayError(f"{source}: {e.error_count()} problem(s):\n{problems}") from None


def with_overrides(settings: GatewaySettings, *, addr: str | None = None, port: int | None = None,
                   triton_url: str | None = None, admin_header: str | None = None) -> GatewaySettings:
    """The settings with command-line values in their place, validated as the file is."""
    raw = settings.model_dump(by_alias=True)
    for section, key, value in (("API", "Addr", addr), ("API", "Port", port), ("Triton", "Url", triton_url),
                                ("Triton", "AdminHeader", admin_header)):
        if value is not None:
            raw[section][key] = value
    return parse_settings(raw, source="command line")


def restart_needed(running: GatewaySettings, new: GatewaySettings) -> list[str]:
    """What changed between two settings that a running gateway cannot apply: everything but
    ``Endpoints``, named by section and key (never by value: some are secrets)."""
    before = running.model_dump(by_alias=True, exclude={"endpoints"})
    after = new.model_dump(by_alias=True, exclude={"endpoints"})
    changed = []
    for section in sorted(set(before) | set(after)):
        old, value = before.get(section), after.get(section)
        if old == value:
            continue
        if isinstance(old, dict) and isinstance(value, dict):
            keys = sorted(k for k in set(old) | set(value) if old.get(k) != value.get(k))
            changed.append(f"{section}.{{{', '.join(keys)}}}" if len(keys) > 1 else f"{section}.{keys[0]}")
        else:
            changed.append(section)
    return [f"{', '.join(changed)} changed (needs a restart)"] if changed else []


def load_settings(path: Path) -> GatewaySettings:
    """Read and validate a settings file; every problem is reported at once, with its field."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise GatewayError(f"cannot read gateway settings {path}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise GatewayError(f"{path}: not valid YAML: {e}") from e
    return parse_settings(_expand_env(raw, str(path)), source=str(path))


_ENV_REFERENCE = re.compile(r"^\$\{([A-Z_][A-Z0-9_]*)\}$")


def _expand_env(value: Any, source: str) -> Any:
    """A string that is exactly ``${NAME}`` is the environment variable NAME (how a Kubernetes
    Secret reaches a settings file kept in a ConfigMap); an unset one is an error naming it."""
    if isinstance(value, dict):
        return {k: _expand_env(v, source) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, source) for v in value]
    if isinstance(value, str):
        match = _ENV_REFERENCE.match(value)
        if match:
            import os

            if match.group(1) not in os.environ:
                raise GatewayError(f"{source}: ${{{match.group(1)}}} is not set in the environment")
            return os.environ[match.group(1)]
    return value
