"""Request enrichment: a model whose config names a feature service gets that service's features for
the request's entity read from the online store and fed to one of its inputs, so clients send only
the entity key.

config.pbtxt parameters (Triton's ``parameters`` map):

    parameters { key: "weir_feature_service" value: { string_value: "driver_ranking" } }
    parameters { key: "weir_feature_input"   value: { string_value: "FEATURES" } }      # FP32 [-1, n]
    parameters { key: "weir_entity_parameter" value: { string_value: "entity_key" } }   # default entity_key
    parameters { key: "weir_feature_default" value: { string_value: "0" } }   # optional: for missing values

The request parameter (``entity_key`` by default) holds the entity key (join-key values joined by
'|'). A missing entity or value is NOT_FOUND naming the key unless a default is configured. Reads go
through a short-TTL in-process cache; Redis is read by an asyncio client on the event loop (one
pipelined round trip, no thread hop), SQLite in a thread (the event loop never waits on the disk).
A store that cannot be reached is UNAVAILABLE, naming the store.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from weir.errors import InvalidArgumentError, NotFoundError, UnavailableError, clip
from weir_proto.feature_definitions import FRESHNESS, Definitions
from weir_proto.inference import messages as pb
from weir_proto.online_store import OnlineStore

log = logging.getLogger(__name__)

SERVICE_PARAMETER = "weir_feature_service"
INPUT_PARAMETER = "weir_feature_input"
ENTITY_PARAMETER = "weir_entity_parameter"
DEFAULT_PARAMETER = "weir_feature_default"
DEFAULT_ENTITY_PARAMETER = "entity_key"
CACHE_SECONDS = 1.0
CACHE_ENTRIES = 100_000
MAX_ENTITY_KEY_CHARS = 256  # an entity key is an id; the cache keeps up to CACHE_ENTRIES of them


@dataclass(frozen=True)
class EnrichmentSpec:
    service: str
    feature_input: str
    entity_parameter: str
    default: float | None

    @classmethod
    def from_config(cls, config: pb.ModelConfig) -> EnrichmentSpec | None:
        parameters = {key: value.string_value for key, value in config.parameters.items()}
        if SERVICE_PARAMETER not in parameters:
            return None
        source = f"model '{config.name}' config.pbtxt parameters"
        feature_input = parameters.get(INPUT_PARAMETER, "")
        if feature_input not in {tensor.name for tensor in config.input}:
            raise InvalidArgumentError(
                f"{source}['{INPUT_PARAMETER}']: expected one of the model's inputs "
                f"{[tensor.name for tensor in config.input]}, got {feature_input!r}"
            )
        default = parameters.get(DEFAULT_PARAMETER)
        try:
            default_value = float(default) if default not in (None, "") else None
        except ValueError:
            raise InvalidArgumentError(f"{source}['{DEFAULT_PARAMETER}']: expected a number, got {default!r}") from None
        return cls(
            parameters[SERVICE_PARAMETER],
            feature_input,
            parameters.get(ENTITY_PARAMETER) or DEFAULT_ENTITY_PARAMETER,
            default_value,
        )


class FreshnessCollector(Collector):
    """Per feature view, read from the store at scrape time, across its entities (one fresh push must
    not make a view of stale entities look fresh):

    - ``weir_feature_view_entities``: entities with a value online;
    - ``weir_feature_view_stale_entities`` / ``weir_feature_view_stale_ratio``: how many (what share)
      have a value older than the view's freshness class allows (static views: none);
    - ``weir_feature_view_oldest_age_seconds`` and ``weir_feature_view_age_seconds``: the age of the
      oldest and of the newest value;
    - ``weir_feature_view_stale``: 1 when at least half the entities are stale (the median entity's
      value is too old), or nothing is online; a view turning stale is logged.

    A store without per-entity ages (an older one) is judged by its newest value alone."""

    def __init__(self, enricher: Enricher | Callable[[], Enricher | None], clock: Callable[[], float] = time.time):
        # A callable: the current enricher (a control plane may replace it with new definitions).
        self._current = enricher if callable(enricher) else (lambda: enricher)
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        enricher = self._current()
        if enricher is None:
            return
        age = GaugeMetricFamily(
            "weir_feature_view_age_seconds", "Age of the newest online value of a feature view.", labels=["view"]
        )
        oldest = GaugeMetricFamily(
            "weir_feature_view_oldest_age_seconds", "Age of the oldest online value of a feature view.",
            labels=["view"],
        )  # fmt: skip
        entities = GaugeMetricFamily(
            "weir_feature_view_entities", "Entities with a value of the feature view online.", labels=["view"]
        )
        stale_entities = GaugeMetricFamily(
            "weir_feature_view_stale_entities",
            "Entities whose online value is older than the view's freshness class allows.",
            labels=["view", "freshness"],
        )
        stale_ratio = GaugeMetricFamily(
            "weir_feature_view_stale_ratio",
            "Share of the view's online entities whose value is older than its freshness class allows.",
            labels=["view", "freshness"],
        )
        stale = GaugeMetricFamily(
            "weir_feature_view_stale",
            "1 when at least half a feature view's entities (or all, or nothing online) are older than its freshness "
            "class.",
            labels=["view", "freshness"],
        )  # fmt: skip
        now = self._clock()
        for name, view in sorted(enricher.definitions.views.items()):
            limit = FRESHNESS[view.freshness]
            try:
                newest = enricher.store.newest(name)
                ages = getattr(enricher.store, "ages", None)
                summary = ages(name, now - limit if limit is not None else float("-inf")) if ages else None
            except Exception:  # a scrape must not fail because the store is down
                continue
            seconds = now - newest if newest is not None else float("inf")
            age.add_metric([name], seconds)
            if summary is not None:
                count, stale_count, oldest_ts = summary
                entities.add_metric([name], count)
                stale_entities.add_metric([name, view.freshness], stale_count)
                ratio = stale_count / count if count else 1.0
                stale_ratio.add_metric([name, view.freshness], ratio)
                oldest.add_metric([name], now - oldest_ts if oldest_ts is not None else float("inf"))
                is_stale = limit is not None and (count == 0 or ratio >= 0.5)
            else:
                is_stale = limit is not None and seconds > limit
            stale.add_metric([name, view.freshness], 1.0 if is_stale else 0.0)
            if is_stale and name not in enricher.stale_views:
                log.warning(
                    "feature view is stale",
                    extra={"view": name, "age_seconds": seconds, "limit": limit,
                           "stale_entities": summary[1] if summary else None},
                )  # fmt: skip
            (enricher.stale_views.add if is_stale else enricher.stale_views.discard)(name)
        yield from (age, oldest, entities, stale_entities, stale_ratio, stale)


class Enricher:
    def __init__(self, definitions: Definitions, store: OnlineStore, store_name: str) -> None:
        self.definitions = definitions
        self.store = store
        self.stale_views: set[str] = set()
        self._store_name = store_name
        self._cache: dict[tuple[str, str], tuple[float, np.ndarray | None]] = {}
        self._read_async = getattr(store, "read_async", None)  # Redis: read on the loop itself
        self._views: dict[str, dict[str, dict[str, str]]] = {}  # per service: view -> {feature: dtype}

    async def aclose(self) -> None:
        close_async = getattr(self.store, "aclose", None)
        if close_async is not None:
            await close_async()
        await asyncio.to_thread(self.store.close)

    def feature_names(self, service_name: str) -> list[str]:
        return [feature for _, feature in self._service(service_name).features]

    def _service(self, name: str):  # type: ignore[no-untyped-def]
        service = self.definitions.services.get(name)
        if service is None:
            raise NotFoundError(f"feature service '{name}': not defined ({sorted(self.definitions.services)})")
        return service

    async def enrich(self, request: pb.ModelInferRequest, spec: EnrichmentSpec) -> None:
        """Add the feature input to ``request`` (raw when the request is raw, typed otherwise)."""
        if spec.feature_input in {tensor.name for tensor in request.inputs}:
            return  # the caller sent the features itself
        parameter = request.parameters.get(spec.entity_parameter)
        if parameter is None or parameter.WhichOneof("parameter_choice") is None:
            raise InvalidArgumentError(
                f"parameters['{spec.entity_parameter}']: expected the entity key for feature service "
                f"'{spec.service}', got none"
            )
        key = str(getattr(parameter, parameter.WhichOneof("parameter_choice")))
        if len(key) > MAX_ENTITY_KEY_CHARS:
            raise InvalidArgumentError(
                f"parameters['{spec.entity_parameter}']: expected an entity key of at most {MAX_ENTITY_KEY_CHARS} "
                f"characters, got '{clip(key)}'"
            )
        values = await self._values(spec, key)
        tensor = request.inputs.add(name=spec.feature_input, datatype="FP32", shape=[1, values.size])
        if request.raw_input_contents:
            request.raw_input_contents.append(values.tobytes())
        else:
            tensor.contents.fp32_contents.extend(values.reshape(-1).tolist())

    async def _values(self, spec: EnrichmentSpec, key: str) -> np.ndarray:
        now = time.monotonic()
        cached = self._cache.get((spec.service, key))
        if cached is not None and now - cached[0] < CACHE_SECONDS and cached[1] is not None:
            return cached[1]
        service = self._service(spec.service)
        views = self._views.get(spec.service)
        if views is None:  # once per service: the definitions do not change under an Enricher
            views = {}
            for view_name, feature in service.features:
                dtype = self.definitions.views[view_name].feature(feature).dtype  # type: ignore[union-attr]
                views.setdefault(view_name, {})[feature] = dtype
            self._views[spec.service] = views
        try:
            if self._read_async is not None:
                found = await self._read_async(key, views)
            else:
                found = await asyncio.to_thread(self.store.read, key, views)
        except Exception as error:  # redis.ConnectionError, TimeoutError, sqlite3 errors
            raise UnavailableError(
                f"feature service '{spec.service}': the online store ({self._store_name}) is unavailable: "
                f"{type(error).__name__}"
            ) from error
        values = []
        for view_name, feature in service.features:
            value = found[view_name][1].get(feature)
            if value is None:
                if spec.default is None:
                    raise NotFoundError(
                        f"parameters['{spec.entity_parameter}']: entity '{clip(key)}' has no value for feature "
                        f"'{view_name}:{feature}' in the online store"
                    )
                value = spec.default
            values.append(float(value))
        array = np.asarray([values], dtype=np.float32)
        if len(self._cache) >= CACHE_ENTRIES:
            self._cache.clear()  # bounded: a full cache starts over rather than growing
        self._cache[(spec.service, key)] = (now, array)
        return array
