"""What ``toolkit tune`` varies, checked against the model's spec before anything runs.

Three of the spec's own fields, under their model.yaml names: ``instance_count``, ``max_batch_size`` and
``dynamic_batching.max_queue_delay_microseconds``. Model Analyzer's automatic search cannot vary the queue
delay, so the search is its manual sweep (``model_config_parameters``: explicit lists, every combination
tried). Model Analyzer measures the committed configuration too (its ``<model>_config_default``): the
baseline the winner is compared with, in the same run.

Defaults fit a small CPU machine: 1 and 2 instances, the committed max batch size and a quarter of it
(never below the spec's largest preferred batch size, which a smaller one would make invalid), no delay
and 2 ms, at one concurrency of 8; each default range also holds the committed value, so the sweep
measures the committed configuration a second time (see ``Sweep.holds_committed``).
"""

from __future__ import annotations

from dataclasses import dataclass

from toolkit.errors import TuneError
from toolkit.repository.spec import ModelSpec

DEFAULT_INSTANCES = (1, 2)
DEFAULT_QUEUE_DELAYS_US = (0, 2000)
DEFAULT_CONCURRENCY = (8,)


@dataclass(frozen=True)
class SearchSpace:
    """The user's ranges; ``None`` takes the default that fits the spec (see ``resolve``)."""

    instance_counts: tuple[int, ...] | None = None
    max_batch_sizes: tuple[int, ...] | None = None
    queue_delays_us: tuple[int, ...] | None = None
    concurrency: tuple[int, ...] = DEFAULT_CONCURRENCY

    def resolve(self, spec: ModelSpec) -> Sweep:
        """The concrete lists for ``spec``; a range the spec cannot take is one TuneError naming the option."""
        instances = _sorted("--instances", self.instance_counts or (*DEFAULT_INSTANCES, spec.instance_count), 1, 64)
        concurrency = _sorted("--concurrency", self.concurrency, 1, 4096)
        if spec.max_batch_size == 0:
            given_ranges = (("--max-batch-sizes", self.max_batch_sizes), ("--queue-delays", self.queue_delays_us))
            for option, given in given_ranges:
                if given:
                    raise TuneError(f"{option}: model '{spec.name}' does not batch (max_batch_size 0 in its "
                                    "model.yaml): only --instances can be searched")
            return Sweep(instances, (), (), concurrency, spec.instance_count in instances)
        preferred = max(spec.dynamic_batching.preferred_batch_size, default=1) if spec.dynamic_batching else 1
        if self.max_batch_sizes:
            batch_sizes = _sorted("--max-batch-sizes", self.max_batch_sizes, 1, 1 << 20)
            too_small = [b for b in batch_sizes if b < preferred]
            if too_small:
                raise TuneError(f"--max-batch-sizes {','.join(map(str, too_small))}: below the preferred_batch_size "
                                f"{preferred} of model '{spec.name}' (Triton refuses such a config)")
        else:
            batch_sizes = tuple(sorted({max(spec.max_batch_size // 4, preferred), spec.max_batch_size}))
        if spec.dynamic_batching is None:
            if self.queue_delays_us:
                raise TuneError(f"--queue-delays: model '{spec.name}' has no dynamic_batching in its model.yaml, "
                                "so there is no queue delay to search")
            delays: tuple[int, ...] = ()
        else:
            committed = spec.dynamic_batching.max_queue_delay_microseconds
            delays = _sorted("--queue-delays", self.queue_delays_us or (*DEFAULT_QUEUE_DELAYS_US, committed), 0,
                             10_000_000)
        twin = _holds_committed(spec, instances, batch_sizes, delays)
        return Sweep(instances, batch_sizes, delays, concurrency, twin)


def _holds_committed(spec: ModelSpec, instances: tuple[int, ...], batch_sizes: tuple[int, ...],
                     delays: tuple[int, ...]) -> bool:
    delay = spec.dynamic_batching.max_queue_delay_microseconds if spec.dynamic_batching else None
    return (spec.instance_count in instances and (not batch_sizes or spec.max_batch_size in batch_sizes)
            and (not delays or delay in delays))


@dataclass(frozen=True)
class Sweep:
    """Every value to try; an empty tuple leaves that field at the committed value."""

    instance_counts: tuple[int, ...]
    max_batch_sizes: tuple[int, ...]
    queue_delays_us: tuple[int, ...]
    concurrency: tuple[int, ...]
    #: Whether one combination repeats the committed values (a twin of ``<model>_config_default``). Model
    #: Analyzer measures each configuration once; on a shared machine the same configuration measured twice
    #: in one run differed by up to a third (BENCHMARKS.md): the twin shows the run's noise.
    holds_committed: bool = True

    @property
    def size(self) -> int:
        """How many configurations Model Analyzer loads, the committed one included."""
        return 1 + len(self.instance_counts) * max(len(self.max_batch_sizes), 1) * max(len(self.queue_delays_us), 1)

    def model_config_parameters(self) -> dict:
        """Model Analyzer's manual sweep, in its ``model_config_parameters`` form (lists are swept)."""
        parameters: dict = {"instance_group": [{"kind": "KIND_CPU", "count": list(self.instance_counts)}]}
        if self.max_batch_sizes:
            parameters["max_batch_size"] = list(self.max_batch_sizes)
        if self.queue_delays_us:
            parameters["dynamic_batching"] = {"max_queue_delay_microseconds": list(self.queue_delays_us)}
        return parameters


def _sorted(option: str, values: tuple[int, ...], low: int, high: int) -> tuple[int, ...]:
    bad = [v for v in values if not low <= v <= high]
    if bad or not values:
        raise TuneError(f"{option}: expected values from {low} to {high}, got {','.join(map(str, values)) or 'none'}")
    return tuple(sorted(set(values)))
