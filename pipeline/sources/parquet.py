"""Parquet files with image bytes: one shard per file; the image column is binary or Hugging Face's
struct<bytes, path>; ids from an id column or ``<file>#<row>``; labels from a named column."""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa

from pipeline import storage
from pipeline.config import ConfigError, SourceConfig
from pipeline.sources.shards import RowBatcher, Shard, as_text, error_text, too_large
from pipeline.storage import StorageError

EXTENSIONS = (".parquet",)
IMAGE_NAMES = ("image", "img", "image_bytes", "bytes", "jpg", "jpeg", "png", "content")



def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t) or (
        hasattr(pa.types, "is_binary_view") and pa.types.is_binary_view(t)
    )


def _is_image_struct(t: pa.DataType) -> bool:
    return pa.types.is_struct(t) and t.get_field_index("bytes") >= 0 and _is_binary(t.field("bytes").type)


def _is_scalar_text(t: pa.DataType) -> bool:
    return (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)
            or pa.types.is_boolean(t) or pa.types.is_dictionary(t)
            or (hasattr(pa.types, "is_string_view") and pa.types.is_string_view(t)))


def columns_text(schema: pa.Schema) -> str:
    return ", ".join(f"{f.name} ({f.type})" for f in schema)


def resolve_image_column(schema: pa.Schema, image_column: str | None, where: str) -> str:
    """The Parquet column holding image bytes (binary, or struct<bytes, path>); ConfigError naming the fix."""
    if image_column:
        if image_column not in schema.names:
            raise ConfigError(
                f"image column '{image_column}' not found in {where}; available columns: "
                f"{columns_text(schema)}. Set source.image_column (--set source.image_column=NAME)"
            )
        t = schema.field(image_column).type
        if not (_is_binary(t) or _is_image_struct(t) or pa.types.is_null(t)):  # null: every cell missing
            raise ConfigError(
                f"image column '{image_column}' in {where} is {t}, not binary image bytes or "
                f"struct<bytes, path>; available columns: {columns_text(schema)}. Set source.image_column"
            )
        return image_column
    # a file whose image cells are all null stores the column as type null: its rows are `missing` rows
    named = [f.name for f in schema if f.name.lower() in IMAGE_NAMES
             and (_is_binary(f.type) or pa.types.is_null(f.type))]
    if len(named) == 1:
        return named[0]
    structs = [f.name for f in schema if _is_image_struct(f.type)]
    binaries = [f.name for f in schema if _is_binary(f.type)]
    candidates = named or structs or binaries
    if len(candidates) == 1:
        return candidates[0]
    what = "several possible image columns" if candidates else "no binary image column"
    raise ConfigError(
        f"{what} in {where}; available columns: {columns_text(schema)}. Set source.image_column "
        "(--set source.image_column=NAME)"
    )


def label_column(cfg: SourceConfig) -> str | None:
    if cfg.labels == "none":
        return None
    return "label" if cfg.labels == "folder" else cfg.labels


def _check_text_column(schema: pa.Schema, name: str, key: str, where: str, hint: str) -> None:
    if name not in schema.names:
        raise ConfigError(
            f"column '{name}' ({key}) not found in {where}; available columns: {columns_text(schema)}. "
            f"{hint}"
        )
    t = schema.field(name).type
    if not _is_scalar_text(t):
        raise ConfigError(
            f"column '{name}' ({key}) in {where} is {t}; it must hold strings or integers. {hint}"
        )


def _read_parquet_schema(uri: str) -> pa.Schema:
    import pyarrow.parquet as pq

    with storage.open_input(uri) as f:
        try:
            return pq.ParquetFile(f).schema_arrow
        except Exception as e:  # noqa: BLE001 - reported with the file it concerns
            raise ConfigError(f"cannot read the Parquet schema of '{uri}': {type(e).__name__}: {e}") from e



def check(cfg: SourceConfig, shard: Shard) -> None:
    """The first file's schema holds the image column and the id and label columns the config names."""
    where = f"'{shard.uris[0]}'"
    schema = _read_parquet_schema(shard.uris[0])
    resolve_image_column(schema, cfg.image_column, where)
    if cfg.id_column:
        _check_text_column(schema, cfg.id_column, "source.id_column", where,
                           "Set source.id_column to an existing column, or unset it for <file>#<row> ids")
    label = label_column(cfg)
    if label:
        hint = ("--labels folder reads the 'label' column of Parquet sources; pass --labels <column> or "
                "--labels none" if cfg.labels == "folder" else
                "Pass --labels <column> (source.labels) with an existing column, or --labels none")
        _check_text_column(schema, label, "source.labels", where, hint)


def read_parquet(shard: Shard, cfg: SourceConfig, rows: RowBatcher) -> Iterator[pa.Table | None]:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    uri, rel = shard.uris[0], shard.rels[0]
    try:
        fobj = storage.open_input(uri)
    except (StorageError, OSError) as e:
        yield rows.add(f"{rel}#<unreadable>", uri, None, None, "read_error", error_text(e))
        return
    with fobj:
        try:
            pf = pq.ParquetFile(fobj)
            schema = pf.schema_arrow
        except Exception as e:  # noqa: BLE001 - a bad file is data
            yield rows.add(f"{rel}#<unreadable>", uri, None, None, "read_error", error_text(e))
            return
        label_col = label_column(cfg)
        try:
            image_col = resolve_image_column(schema, cfg.image_column, f"'{uri}'")
            for name in (cfg.id_column, label_col):
                if name and name not in schema.names:
                    raise ConfigError(f"column '{name}' not found; columns: {columns_text(schema)}")
        except ConfigError as e:
            yield rows.add(f"{rel}#<schema>", uri, None, None, "schema_mismatch",
                           f"this file's schema differs from the first shard's: {e}")
            return
        columns = list(dict.fromkeys(c for c in (image_col, cfg.id_column, label_col) if c))
        index = 0
        try:
            for batch in pf.iter_batches(batch_size=rows.limit, columns=columns):
                images = batch.column(image_col)
                if pa.types.is_struct(images.type):
                    # HF datasets' Image feature: struct<bytes, path>; a null struct gives a null cell
                    images = pc.struct_field(images, "bytes")
                data = images.to_pylist()
                n = len(data)
                ids = as_text(batch.column(cfg.id_column)) if cfg.id_column else [None] * n
                labels = as_text(batch.column(label_col)) if label_col else [None] * n
                for i in range(n):
                    id_ = ids[i] if ids[i] is not None else f"{rel}#{index}"
                    blob = data[i]
                    if blob is None:
                        out = rows.add(id_, uri, labels[i], None, "missing", "null image cell")
                    elif len(blob) > cfg.max_bytes:
                        out = rows.add(id_, uri, labels[i], None, "too_large",
                                       f"image cell is {too_large(len(blob), cfg.max_bytes)}")
                    else:
                        out = rows.add(id_, uri, labels[i], blob)
                    index += 1
                    yield out
                del data, images, batch
        except Exception as e:  # noqa: BLE001 - keep the rows read so far, report the rest
            yield rows.add(f"{rel}#<corrupt>", uri, None, None, "shard_corrupt",
                           f"corrupt Parquet file after {index} rows: {error_text(e)}")

