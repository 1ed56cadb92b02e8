"""The one client of Triton's HTTP admin surface: health, the repository API, model config, readiness
and statistics. The server's start and supervisor, rollout and rollback, and the bench use it.

Every call has a timeout of its own (the caller's, else the client's default): an admin call never
blocks a supervisor or an operator for long. With ``toolkit serve --restrict-apis KEY=VALUE`` Triton
answers the repository API only to requests carrying that header; pass it as ``headers``.

Two ways to call, for two kinds of caller:

* ``request`` returns ``(status, body)``, with status 0 when Triton cannot be reached or the call
  timed out: a supervisor polls and decides itself;
* the named calls (``index``, ``load``, ``unload``, ``config``, ``statistics``) raise
  ``TritonAdminError`` naming the call, the model and Triton's reason: an operator's command fails
  with that one line.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

from toolkit.errors import TritonAdminError


class TritonAdmin:
    def __init__(self, url: str, headers: Mapping[str, str] | None = None, timeout: float = 5.0):
        self.url = url.removeprefix("http://").rstrip("/")
        self.headers, self.timeout = dict(headers or {}), timeout

    # --- the raw call ----------------------------------------------------------------------------

    def request(self, method: str, path: str, body: bytes | dict | None = None, *,
                timeout: float | None = None) -> tuple[int, bytes]:
        """One request; ``(0, b"")`` when Triton cannot be reached or does not answer in time."""
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        headers = {**self.headers, **({"Content-Type": "application/json"} if data is not None else {})}
        request = urllib.request.Request(f"http://{self.url}{path}", data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except OSError:  # refused, reset, timed out (URLError and TimeoutError are OSErrors)
            return 0, b""

    # --- named calls -------------------------------------------------------------------------------

    def live(self, *, timeout: float | None = None) -> bool:
        return self.request("GET", "/v2/health/live", timeout=timeout)[0] == 200

    def server_ready(self, *, timeout: float | None = None) -> bool:
        return self.request("GET", "/v2/health/ready", timeout=timeout)[0] == 200

    def ready(self, model: str, version: int | None = None, *, timeout: float | None = None) -> bool:
        path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/ready"
        return self.request("GET", path, timeout=timeout)[0] == 200

    def index(self, *, timeout: float | None = None) -> list[dict]:
        """The repository index: one entry per model version (name, version, state, reason)."""
        status, body = self.request("POST", "/v2/repository/index", {}, timeout=timeout)
        if status != 200:
            raise TritonAdminError(f"cannot list Triton's models at {self.url}: {self._reason(status, body)}",
                                   status)
        found = json.loads(body or b"[]")
        return found if isinstance(found, list) else []

    def ready_models(self, *, timeout: float | None = None) -> list[str]:
        """The models READY now, by name; none when Triton cannot be asked."""
        try:
            return sorted({m["name"] for m in self.index(timeout=timeout) if m.get("state") == "READY"})
        except TritonAdminError:
            return []

    def load(self, model: str, config: Mapping[str, Any] | None = None, *, timeout: float | None = None) -> None:
        """Load (or reload) ``model``; ``config`` overrides its config.pbtxt (Triton's JSON form)."""
        payload = {"parameters": {"config": json.dumps(config)}} if config is not None else {}
        status, body = self.request("POST", f"/v2/repository/models/{model}/load", payload, timeout=timeout)
        if status != 200:
            raise TritonAdminError(f"Triton could not load '{model}': {self._reason(status, body)}", status)

    def unload(self, model: str, *, timeout: float | None = None) -> None:
        status, body = self.request("POST", f"/v2/repository/models/{model}/unload", {}, timeout=timeout)
        if status != 200:
            raise TritonAdminError(f"Triton could not unload '{model}': {self._reason(status, body)}", status)

    def config(self, model: str, *, timeout: float | None = None) -> dict:
        status, body = self.request("GET", f"/v2/models/{model}/config", timeout=timeout)
        if status != 200:
            raise TritonAdminError(f"cannot read the config of '{model}': {self._reason(status, body)}", status)
        return json.loads(body)

    def statistics(self, *, timeout: float | None = None) -> dict:
        status, body = self.request("GET", "/v2/models/stats", timeout=timeout)
        if status != 200:
            raise TritonAdminError(f"cannot read Triton's statistics at {self.url}: {self._reason(status, body)}",
                                   status)
        return json.loads(body)

    def _reason(self, status: int, body: bytes) -> str:
        if status == 0:
            return f"Triton is not reachable at http://{self.url} (or did not answer in time)"
        try:
            return json.loads(body).get("error") or f"HTTP {status}"
        except (ValueError, AttributeError):
            return f"HTTP {status}: {body[:300].decode(errors='replace')}"
