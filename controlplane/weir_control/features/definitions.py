"""Feature definitions: the parser lives in ``weir_proto.feature_definitions`` so the data plane
(request enrichment) reads the same definitions; re-exported here for the control plane's modules."""

from weir_proto.feature_definitions import (
    DTYPES,
    FRESHNESS,
    VALUE_TYPES,
    Definitions,
    Entity,
    Feature,
    FeatureService,
    FeatureView,
    load_definitions,
    parse_definitions,
)

__all__ = [
    "DTYPES",
    "FRESHNESS",
    "VALUE_TYPES",
    "Definitions",
    "Entity",
    "Feature",
    "FeatureService",
    "FeatureView",
    "load_definitions",
    "parse_definitions",
]
