"""Talk to a running Triton: inference, the reading of its errors, retry and balancing.

    infer.py      TritonClient: HTTP or gRPC, numpy in and out, retries, compression
    admin.py      TritonAdmin: the one client of Triton's admin API (health, repository, config, stats)
    failures.py   Triton's error text -> the toolkit's code (classify_triton_error, is_retryable)
    retry.py      when to send a failed inference again
    balancing.py  several replicas behind one gRPC channel, balanced by gRPC itself
    values.py     the CLI's -i values <-> arrays

Imports: ``toolkit.errors`` and the stub side's contract (``toolkit.runtime.codes``) only; the
gateway, the bench and the CLI build on this package.
"""

from toolkit.client.infer import TritonClient, normalize_url
from toolkit.client.values import parse_input_value, to_jsonable

__all__ = ["TritonClient", "normalize_url", "parse_input_value", "to_jsonable"]
