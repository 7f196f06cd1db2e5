"""Every table's Arrow schema, defined once (DESIGN.md "Tables").

Ids are strings and every row carries ``run_id``. Embeddings are ``fixed_size_list<float32>[d]``
so DuckDB reads them as ``FLOAT[d]``.
"""
from __future__ import annotations

import pyarrow as pa

SPLITS = ("train", "test", "query", "gallery")

BBOX_TYPE = pa.struct(
    [("x", pa.float32()), ("y", pa.float32()), ("w", pa.float32()), ("h", pa.float32())]
)

IMAGES_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("label", pa.int64()),
        ("class_name", pa.string()),
        ("split", pa.string()),
        ("bbox", BBOX_TYPE),
        ("width", pa.int32()),
        ("height", pa.int32()),
    ]
)

METRICS_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("stage", pa.string()),
        ("split", pa.string()),
        ("metric", pa.string()),
        ("k", pa.int32()),
        ("value", pa.float64()),
        # the map threshold of a per-threshold localization row (loc_acc); null on every other row
        ("threshold", pa.float64()),
    ]
)

ERRORS_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("stage", pa.string()),
        ("error", pa.string()),
    ]
)

# one row per embedded image: the incremental key, and the run that computed the embedding
EMBEDDING_KEYS_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("image_id", pa.string()),
        ("model_id", pa.string()),
        ("content_hash", pa.string()),
        ("embedded_run_id", pa.string()),
    ]
)


def embedding_type(dim: int) -> pa.DataType:
    """The Arrow type of one embedding vector of dimension ``dim``."""
    return pa.list_(pa.float32(), dim)


# the key columns of every per-image, per-model table
_IMAGE_MODEL_KEYS = [
    ("run_id", pa.string()),
    ("image_id", pa.string()),
    ("label", pa.int64()),
    ("split", pa.string()),
    ("model_id", pa.string()),
]


def embeddings_schema(dim: int) -> pa.Schema:
    """Schema of the ``embeddings`` table for embeddings of dimension ``dim``."""
    return pa.schema(
        [
            *_IMAGE_MODEL_KEYS,
            ("embedding", embedding_type(dim)),
            ("norm", pa.float32()),
        ]
    )


def feature_maps_schema(channels: int, dim: int) -> pa.Schema:
    """Schema of the ``feature_maps`` table: the last conv feature map A (fp16, C*H*W, C-major), its GAP
    feature and the head's bias for this input, so any pair's maps need no second backbone pass."""
    return pa.schema(
        [
            *_IMAGE_MODEL_KEYS,
            ("channels", pa.int32()),
            ("map_h", pa.int32()),
            ("map_w", pa.int32()),
            ("feature_map", pa.list_(pa.float16())),
            ("gap_feature", pa.list_(pa.float32(), channels)),
            ("bias", pa.list_(pa.float32(), dim)),
        ]
    )


ACTIVATION_MAPS_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("image_id", pa.string()),
        ("reference_id", pa.string()),
        ("reference_kind", pa.string()),
        ("method", pa.string()),
        ("map_h", pa.int32()),
        ("map_w", pa.int32()),
        ("map", pa.list_(pa.float32())),
        ("score", pa.float32()),
    ]
)


LOCALIZATION_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("image_id", pa.string()),
        ("method", pa.string()),
        ("reference_kind", pa.string()),
        ("threshold", pa.float32()),
        ("box", pa.list_(pa.float32(), 4)),
        ("iou", pa.float32()),
        ("correct", pa.bool_()),
    ]
)


NEIGHBORS_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("image_id", pa.string()),
        ("split", pa.string()),
        ("neighbor_ids", pa.list_(pa.string())),
        ("distances", pa.list_(pa.float32())),
        ("reciprocal_ids", pa.list_(pa.string())),
        ("batch_ids", pa.list_(pa.string())),
    ]
)


def validate_images(table: pa.Table) -> pa.Table:
    """Cast ``table`` to IMAGES_SCHEMA, raising a one-line error naming what is wrong."""
    missing = [n for n in IMAGES_SCHEMA.names if n not in table.column_names]
    if missing:
        raise ValueError(f"images table: missing columns {missing}")
    table = table.select(IMAGES_SCHEMA.names).cast(IMAGES_SCHEMA)
    bad = set(table.column("split").unique().to_pylist()) - set(SPLITS)
    if bad:
        raise ValueError(f"images table: unknown split values {sorted(bad)}; expected {SPLITS}")
    ids = table.column("image_id")
    if ids.null_count or len(ids.unique()) != len(ids):
        raise ValueError("images table: image_id must be non-null and unique")
    return table


# the columns each table must have, with their types (DESIGN.md "Tables"); tables whose vector widths depend on
# the model (embeddings, feature_maps, prototypes) are checked on their key columns
TABLE_CONTRACTS: dict[str, list[tuple[str, pa.DataType]]] = {
    "images": list(zip(IMAGES_SCHEMA.names, IMAGES_SCHEMA.types)),
    "metrics": list(zip(METRICS_SCHEMA.names, METRICS_SCHEMA.types)),
    "errors": list(zip(ERRORS_SCHEMA.names, ERRORS_SCHEMA.types)),
    "embedding_keys": list(zip(EMBEDDING_KEYS_SCHEMA.names, EMBEDDING_KEYS_SCHEMA.types)),
    "activation_maps": list(zip(ACTIVATION_MAPS_SCHEMA.names, ACTIVATION_MAPS_SCHEMA.types)),
    "localization": list(zip(LOCALIZATION_SCHEMA.names, LOCALIZATION_SCHEMA.types)),
    "neighbors": list(zip(NEIGHBORS_SCHEMA.names, NEIGHBORS_SCHEMA.types)),
    "embeddings": _IMAGE_MODEL_KEYS,
    "mpn_embeddings": _IMAGE_MODEL_KEYS,
    "feature_maps": _IMAGE_MODEL_KEYS,
    "prototypes": [("run_id", pa.string()), ("label", pa.int64()), ("model_id", pa.string())],
}


def check_contract(name: str, schema: pa.Schema) -> None:
    """Raise a one-line ValueError when a table about to be committed as ``name`` lacks a column of its
    contract or has it with another type; tables without a contract (user tables) pass."""
    for column, dtype in TABLE_CONTRACTS.get(name, []):
        if column not in schema.names:
            raise ValueError(f"table {name}: missing column {column!r} ({dtype})")
        found = schema.field(column).type
        if found != dtype:
            raise ValueError(f"table {name}: column {column!r} is {found}, expected {dtype}")
