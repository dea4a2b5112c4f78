"""Load interaction logs into a :class:`~recsys.data.dataset.Dataset`.

Two formats:

- S3-Rec sequential (``NAME.txt``: ``user item item ...`` per line, oldest first, plus an optional
  ``NAME_item2attributes.json`` ``{"item": [attribute, ...]}``), as published for Amazon Beauty.
- Generic tables: ``interactions.csv`` or ``.parquet`` with ``user_id,item_id,timestamp`` and
  optional ``event_type,scenario``, plus an optional ``items.csv``/``.parquet`` with ``item_id`` and
  optional ``category,brand,price,title,bid``.

``load_dataset`` picks the format from what a path contains.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from recsys.data.dataset import DEFAULT_SCENARIOS, Dataset, EventType, IdMap, ItemCatalog

INTERACTION_COLUMNS = ("user_id", "item_id", "timestamp")
TABLE_SUFFIXES = (".csv", ".parquet")
PRICE_BUCKETS = 10
# Text files that sit beside data but are never an S3-Rec sequence file (id maps, notes).
_NOT_SEQUENCE_FILES = {"users.txt", "items.txt", "readme.txt", "license.txt", "requirements.txt"}


class DatasetFormatError(ValueError):
    """A path holds no dataset this module can read, or a file is malformed."""


# --------------------------------------------------------------------------------------------
# S3-Rec sequential format
# --------------------------------------------------------------------------------------------


def _natural_key(external_id: str) -> tuple[int, int | str]:
    """Numeric ids in numeric order, then the rest as strings (stable, human-friendly order)."""
    return (0, int(external_id)) if external_id.isdigit() else (1, external_id)


def _sequence_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.glob("*.txt")
        if p.is_file() and p.name.lower() not in _NOT_SEQUENCE_FILES and not p.name.startswith(".")
    )


def s3rec_sequence_file(folder: Path, name: str | None = None) -> Path:
    """The ``NAME.txt`` sequence file of an S3-Rec folder (or that file itself); ``name`` picks
    one when the folder holds several. DatasetFormatError when there is none or no single one."""
    folder = Path(folder)
    if folder.is_file():
        folder, name = folder.parent, name or folder.stem
    if name is None:
        candidates = _sequence_files(folder)
        if len(candidates) != 1:
            found = ", ".join(p.name for p in candidates) or "none"
            raise DatasetFormatError(f"{folder}: expected exactly one NAME.txt sequence file, found {found}")
        return candidates[0]
    sequence_file = folder / f"{name}.txt"
    if not sequence_file.is_file():
        raise DatasetFormatError(f"{sequence_file}: no such S3-Rec sequence file")
    return sequence_file


def load_s3rec(folder: Path, name: str | None = None) -> Dataset:
    """Load ``NAME.txt`` (+ optional ``NAME_item2attributes.json``) from ``folder``.

    ``name`` picks ``NAME`` when the folder holds several sequence files. Item, user and attribute
    ids keep their strings; items are numbered in natural id order (``"1"``, ``"2"``, ... ``"10"``),
    attributes likewise, users in file order. Items listed only in the attributes file are part
    of the catalog. Without the attributes file every item has an empty attribute bag.
    """
    sequence_file = s3rec_sequence_file(folder, name)
    folder, name = sequence_file.parent, sequence_file.stem

    user_ids: list[str] = []
    raw_sequences: list[list[str]] = []
    with sequence_file.open(encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 2:
                raise DatasetFormatError(
                    f"{sequence_file}:{line_number}: a user line needs at least one item"
                )
            user_ids.append(fields[0])
            raw_sequences.append(fields[1:])
    if not user_ids:
        raise DatasetFormatError(f"{sequence_file}: no users")

    attributes_file = folder / f"{name}_item2attributes.json"
    raw_attributes: dict[str, list[str]] = {}
    if attributes_file.is_file():
        with attributes_file.open(encoding="utf-8") as handle:
            loaded = json.load(handle)
        if not isinstance(loaded, dict):
            raise DatasetFormatError(f"{attributes_file}: expected a JSON object item -> [attribute, ...]")
        raw_attributes = {str(item): [str(a) for a in values] for item, values in loaded.items()}

    item_strings = {item for sequence in raw_sequences for item in sequence} | raw_attributes.keys()
    items = IdMap(sorted(item_strings, key=_natural_key))
    attribute_names = sorted({a for values in raw_attributes.values() for a in values}, key=_natural_key)
    attribute_index = {a: i for i, a in enumerate(attribute_names)}
    bags = [np.zeros(0, dtype=np.int64) for _ in range(len(items))]
    for item, values in raw_attributes.items():
        bag = sorted({attribute_index[a] for a in values})
        bags[items.dense(item)] = np.asarray(bag, dtype=np.int64)

    sequences = [items.dense_many(sequence) for sequence in raw_sequences]
    return Dataset(
        name=_dataset_name(name),
        users=IdMap(user_ids),
        items=items,
        sequences=sequences,
        catalog=ItemCatalog(attributes=bags, attribute_names=attribute_names),
    )


def tile_s3rec(source: Path, copies: int, out: Path, name: str | None = None) -> Path:
    """Write ``copies`` disjoint copies of an S3-Rec log into ``out`` (same format and file names):
    copy ``c`` renames every user, item and attribute id ``x`` to ``x~c`` (copy 0 keeps the ids),
    so the result is ``copies`` independent shops with the source's statistics: ``copies`` times
    its users, items, attributes and interactions. A capacity check (how training time and early
    stopping scale with a larger log) without another dataset. Returns the sequence file."""
    if copies < 1:
        raise ValueError(f"copies must be >= 1, got {copies}")
    sequence_file = s3rec_sequence_file(source, name)
    source, name = sequence_file.parent, sequence_file.stem
    lines = [line.split() for line in sequence_file.read_text(encoding="utf-8").splitlines() if line.strip()]

    def renamed(value: str, copy: int) -> str:
        return value if copy == 0 else f"{value}~{copy}"

    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{name}.txt"
    with target.open("w", encoding="utf-8") as handle:
        for copy in range(copies):
            for fields in lines:
                handle.write(" ".join(renamed(value, copy) for value in fields) + "\n")
    attributes_file = source / f"{name}_item2attributes.json"
    if attributes_file.is_file():
        loaded = json.loads(attributes_file.read_text(encoding="utf-8"))
        tiled = {
            renamed(str(item), copy): [renamed(str(a), copy) for a in values]
            for copy in range(copies)
            for item, values in loaded.items()
        }
        (out / attributes_file.name).write_text(json.dumps(tiled), encoding="utf-8")
    return target


# --------------------------------------------------------------------------------------------
# Generic CSV / Parquet tables
# --------------------------------------------------------------------------------------------


def _read_table(path: Path) -> dict[str, list[str]]:
    """Columns of a CSV or Parquet file as lists of stripped strings ('' for missing values).

    Parquet timestamp columns become epoch milliseconds, so they read like numeric CSV ones.
    """
    if path.suffix == ".parquet":
        return _read_parquet(path)
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            raise DatasetFormatError(f"{path}: empty file")
        rows = [row for row in reader if row]
    width = len(header)
    for row_number, row in enumerate(rows, start=1):  # blank lines skipped
        if len(row) != width:
            raise DatasetFormatError(
                f"{path}: data row {row_number}: expected {width} fields, got {len(row)}"
            )
    columns = zip(*rows, strict=True) if rows else ([] for _ in header)
    return {
        name.strip(): [value.strip() for value in column]
        for name, column in zip(header, columns, strict=True)
    }


def _read_parquet(path: Path) -> dict[str, list[str]]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as error:  # pyarrow is a dev/optional dependency
        raise DatasetFormatError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from error
    table = pq.read_table(path)
    columns: dict[str, list[str]] = {}
    for name in table.column_names:
        column = table.column(name)
        if pa.types.is_timestamp(column.type):
            column = column.cast(pa.timestamp("ms", tz=column.type.tz)).cast(pa.int64())
        columns[name] = ["" if value is None else str(value).strip() for value in column.to_pylist()]
    return columns


def _find_table(folder: Path, stem: str) -> Path | None:
    for suffix in TABLE_SUFFIXES:
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _parse_timestamps(values: list[str], path: Path) -> np.ndarray:
    """Numbers are kept as given (any unit); ISO-8601 strings become epoch milliseconds (UTC when
    they carry no offset)."""
    try:
        return np.asarray([int(v) for v in values], dtype=np.int64)
    except ValueError:
        pass
    parsed = np.empty(len(values), dtype=np.int64)
    for row, value in enumerate(values):
        try:
            parsed[row] = round(float(value))
        except ValueError:
            try:
                moment = datetime.fromisoformat(value)
                if moment.tzinfo is None:
                    moment = moment.replace(tzinfo=UTC)
                parsed[row] = round(moment.timestamp() * 1000)
            except ValueError as error:
                raise DatasetFormatError(f"{path}: row {row + 1}: bad timestamp {value!r}") from error
    return parsed


def _parse_event_types(values: list[str], path: Path) -> np.ndarray:
    cache: dict[str, int] = {}
    parsed = np.empty(len(values), dtype=np.int8)
    for row, value in enumerate(values):
        code = cache.get(value)
        if code is None:
            try:
                event = EventType.parse(value) if value else EventType.VIEW
            except (KeyError, ValueError) as error:
                raise DatasetFormatError(f"{path}: row {row + 1}: unknown event_type {value!r}") from error
            code = cache[value] = int(EventType.VIEW if event == EventType.UNSPECIFIED else event)
        parsed[row] = code
    return parsed


def _first_seen(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(values))


def _parse_float(value: str, default: float) -> float:
    try:
        return float(value) if value else default
    except ValueError:
        return default


def price_buckets(prices: np.ndarray, num_buckets: int = PRICE_BUCKETS) -> np.ndarray:
    """Quantile bucket (0..num_buckets-1) of each price over the known prices; -1 where unknown."""
    buckets = np.full(len(prices), -1, dtype=np.int64)
    known = np.isfinite(prices)
    if known.any():
        edges = np.quantile(prices[known], np.linspace(0, 1, num_buckets + 1)[1:-1])
        buckets[known] = np.searchsorted(edges, prices[known], side="right")
    return buckets


def _build_catalog(items: IdMap, table: dict[str, list[str]] | None) -> ItemCatalog:
    """Catalog columns aligned with ``items`` plus typed attribute tokens built from them."""
    num_items = len(items)
    rows = np.full(num_items, -1, dtype=np.int64)
    if table is not None:
        rows[items.dense_many(table["item_id"])] = np.arange(len(table["item_id"]))

    def column(name: str) -> list[str] | None:
        if table is None or name not in table:
            return None
        values = table[name]
        return [values[r] if r >= 0 else "" for r in rows]

    def categorical(name: str) -> tuple[np.ndarray | None, list[str]]:
        values = column(name)
        if values is None:
            return None, []
        names = _first_seen(v for v in values if v)
        index = {n: i for i, n in enumerate(names)}
        return np.asarray([index.get(v, -1) for v in values], dtype=np.int64), names

    category, category_names = categorical("category")
    brand, brand_names = categorical("brand")
    price_values = column("price")
    price = (
        None
        if price_values is None
        else np.asarray([_parse_float(v, np.nan) for v in price_values], dtype=np.float32)
    )
    bid_values = column("bid")
    bid = None if bid_values is None else np.asarray([_parse_float(v, 0.0) for v in bid_values], np.float32)
    title = column("title")

    attribute_names: list[str] = []
    attribute_index: dict[str, int] = {}
    bags: list[list[int]] = [[] for _ in range(num_items)]

    def add_tokens(prefix: str, codes: np.ndarray | None, names: list[str]) -> None:
        if codes is None:
            return
        for item, code in enumerate(codes):
            if code < 0:
                continue
            token = f"{prefix}={names[code]}"
            if token not in attribute_index:
                attribute_index[token] = len(attribute_names)
                attribute_names.append(token)
            bags[item].append(attribute_index[token])

    add_tokens("category", category, category_names)
    add_tokens("brand", brand, brand_names)
    if price is not None:
        add_tokens("price_bucket", price_buckets(price), [str(k) for k in range(PRICE_BUCKETS)])
    return ItemCatalog(
        attributes=[np.asarray(bag, dtype=np.int64) for bag in bags],
        attribute_names=attribute_names,
        category=category,
        category_names=category_names,
        brand=brand,
        brand_names=brand_names,
        price=price,
        title=title,
        bid=bid,
    )


def _check_ids(values: list[str], path: Path | None, column: str) -> None:
    """External ids must be non-empty single-line strings (id maps store one per line)."""
    distinct = set(values)
    if "" in distinct:
        raise DatasetFormatError(f"{path}: empty {column}")
    if any("\n" in value or "\r" in value for value in distinct):
        raise DatasetFormatError(f"{path}: {column} values must not contain line breaks")


def load_csv(folder_or_file: Path, items: Path | None = None, name: str | None = None) -> Dataset:
    """Load ``interactions.csv|.parquet`` (+ ``items.csv|.parquet``) into a Dataset.

    ``folder_or_file`` is a folder holding ``interactions.*`` (and maybe ``items.*``) or the
    interactions file itself. Each user's events are sorted by (timestamp, file order). Users are
    numbered in order of first appearance; items in ``items`` file order, then items seen only in
    interactions in order of first appearance. Event types default to VIEW when the column is
    absent (``event_types`` is then None); an empty scenario reads as the first default scenario.
    Scenarios outside :data:`DEFAULT_SCENARIOS` are appended to ``scenario_names``.
    """
    source = Path(folder_or_file)
    if source.is_dir():
        interactions_file = _find_table(source, "interactions")
        if interactions_file is None:
            raise DatasetFormatError(f"{source}: no interactions.csv or interactions.parquet")
        items = items if items is not None else _find_table(source, "items")
    elif source.is_file():
        interactions_file = source
        if items is None:
            items = _find_table(source.parent, "items")
    else:
        raise DatasetFormatError(f"{source}: no such file or folder")

    table = _read_table(interactions_file)
    missing = [c for c in INTERACTION_COLUMNS if c not in table]
    if missing:
        raise DatasetFormatError(f"{interactions_file}: missing column(s) {', '.join(missing)}")
    num_rows = len(table["user_id"])
    if num_rows == 0:
        raise DatasetFormatError(f"{interactions_file}: no interactions")
    for column_name in ("user_id", "item_id"):
        _check_ids(table[column_name], interactions_file, column_name)

    item_table = _read_table(Path(items)) if items is not None else None
    if item_table is not None and "item_id" not in item_table:
        raise DatasetFormatError(f"{items}: missing column item_id")
    catalog_ids = item_table["item_id"] if item_table is not None else []
    _check_ids(catalog_ids, items, "item_id")
    if len(set(catalog_ids)) != len(catalog_ids):
        raise DatasetFormatError(f"{items}: duplicate item_id")
    item_map = IdMap(_first_seen([*catalog_ids, *table["item_id"]]))
    user_map = IdMap(_first_seen(table["user_id"]))

    user_dense = user_map.dense_many(table["user_id"])
    item_dense = item_map.dense_many(table["item_id"])
    timestamps = _parse_timestamps(table["timestamp"], interactions_file)
    event_types = (
        _parse_event_types(table["event_type"], interactions_file) if "event_type" in table else None
    )

    scenario_names = list(DEFAULT_SCENARIOS)
    scenarios = None
    if "scenario" in table:
        raw = [s if s else DEFAULT_SCENARIOS[0] for s in table["scenario"]]
        scenario_names += [s for s in _first_seen(raw) if s not in DEFAULT_SCENARIOS]
        scenario_index = {s: i for i, s in enumerate(scenario_names)}
        scenarios = np.asarray([scenario_index[s] for s in raw], dtype=np.int16)

    # Group by user, then time, then file order (lexsort: last key is the primary one).
    order = np.lexsort((np.arange(num_rows), timestamps, user_dense))
    boundaries = np.flatnonzero(np.diff(user_dense[order])) + 1

    def per_user(values: np.ndarray) -> list[np.ndarray]:
        return np.split(values[order], boundaries)

    return Dataset(
        name=_dataset_name(name or _table_dataset_name(interactions_file)),
        users=user_map,
        items=item_map,
        sequences=per_user(item_dense),
        catalog=_build_catalog(item_map, item_table),
        event_types=per_user(event_types) if event_types is not None else None,
        scenarios=per_user(scenarios) if scenarios is not None else None,
        timestamps=per_user(timestamps),
        scenario_names=scenario_names,
    )


def _table_dataset_name(interactions_file: Path) -> str:
    """``retail.csv`` -> retail; ``shop/interactions.csv`` -> shop; ``artifacts/shop/data/...`` -> shop."""
    if interactions_file.stem != "interactions":
        return interactions_file.stem
    folder = interactions_file.resolve().parent
    return folder.parent.name if folder.name == "data" and folder.parent.name else folder.name


# --------------------------------------------------------------------------------------------
# Auto-detection and id maps
# --------------------------------------------------------------------------------------------


def _dataset_name(raw: str) -> str:
    """Lower-case, filesystem-safe dataset name (used as ``artifacts/<name>``)."""
    cleaned = re.sub(r"[^a-z0-9_.-]+", "-", raw.strip().lower()).strip("-.")
    return cleaned or "dataset"


def load_dataset(path: Path | str, name: str | None = None) -> Dataset:
    """Load whatever ``path`` holds: interactions CSV/Parquet (a folder or the file) or an S3-Rec
    folder/``.txt`` file. ``name`` overrides the name derived from the path."""
    path = Path(path)
    if not path.exists():
        raise DatasetFormatError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix in TABLE_SUFFIXES:
            return load_csv(path, name=name)
        if path.suffix == ".txt":
            dataset = load_s3rec(path.parent, path.stem)
            return _renamed(dataset, name)
        raise DatasetFormatError(f"{path}: unsupported file type (expected .csv, .parquet or S3-Rec .txt)")
    if _find_table(path, "interactions") is not None:
        return load_csv(path, name=name)
    candidates = _sequence_files(path)
    if len(candidates) == 1:
        return _renamed(load_s3rec(path), name)
    if len(candidates) > 1:
        found = ", ".join(p.name for p in candidates)
        raise DatasetFormatError(
            f"{path}: several S3-Rec sequence files ({found}); pass one of them as the path"
        )
    raise DatasetFormatError(
        f"{path}: no dataset found: expected interactions.csv / interactions.parquet (+ items.*) "
        "or one S3-Rec NAME.txt (+ NAME_item2attributes.json)"
    )


def _renamed(dataset: Dataset, name: str | None) -> Dataset:
    if name is not None:
        dataset.name = _dataset_name(name)
    return dataset


USERS_FILE = "users.txt"
ITEMS_FILE = "items.txt"


def save_id_maps(dataset: Dataset, folder: Path) -> None:
    """Write ``users.txt`` and ``items.txt`` (one external id per line, line number = dense id)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dataset.users.save(folder / USERS_FILE)
    dataset.items.save(folder / ITEMS_FILE)


def load_id_maps(folder: Path) -> tuple[IdMap, IdMap]:
    """The ``(users, items)`` id maps written by :func:`save_id_maps`."""
    folder = Path(folder)
    return IdMap.load(folder / USERS_FILE), IdMap.load(folder / ITEMS_FILE)
