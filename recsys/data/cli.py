"""``recsys data``: prepare, generate, download or describe datasets.

- ``prepare --data synthetic|PATH --artifacts DIR [--quick]``: load (generating synthetic data
  when needed), write id maps and ``stats.json`` to ``DIR/<name>/data``; prints that folder.
- ``generate --out DIR [--preset tiny|quick|default] [--seed N]``: write a synthetic log.
- ``download beauty --out DIR``: fetch a public dataset, checksum-verified.
- ``stats --data PATH``: print a JSON description of a dataset.
- ``tile --data FOLDER --copies N --out DIR``: N disjoint copies of an S3-Rec log (a log N times
  the size with the same statistics, for capacity checks of training).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from recsys.data.dataset import Dataset, EventType
from recsys.data.download import REGISTRY, ChecksumError, download_dataset
from recsys.data.loaders import DatasetFormatError, save_id_maps, tile_s3rec
from recsys.data.prepare import dataset_artifacts, prepare_dataset
from recsys.data.synthetic import SyntheticConfig, generate

STATS_FILE = "stats.json"


def dataset_stats(dataset: Dataset) -> dict:
    """Counts and distributions of a dataset (``summary()`` plus lengths, events, catalog)."""
    lengths = np.array([len(s) for s in dataset.sequences], dtype=np.int64)
    stats: dict = dict(dataset.summary())
    stats["sequence_length"] = {
        "min": int(lengths.min()),
        "median": float(np.median(lengths)),
        "mean": round(float(lengths.mean()), 3),
        "max": int(lengths.max()),
        "users_evaluated": int((lengths >= 3).sum()),
    }
    item_counts = np.bincount(np.concatenate(dataset.sequences), minlength=dataset.num_items)
    stats["items_without_interactions"] = int((item_counts == 0).sum())
    if dataset.event_types is not None:
        events = np.bincount(np.concatenate(dataset.event_types).astype(np.int64), minlength=len(EventType))
        stats["event_types"] = {EventType(e).name: int(events[e]) for e in range(1, len(EventType))}
    if dataset.scenarios is not None:
        scenarios = np.bincount(
            np.concatenate(dataset.scenarios).astype(np.int64), minlength=len(dataset.scenario_names)
        )
        stats["scenarios"] = {name: int(scenarios[i]) for i, name in enumerate(dataset.scenario_names)}
    catalog = dataset.catalog
    stats["catalog"] = {
        "categories": len(catalog.category_names),
        "brands": len(catalog.brand_names),
        "with_price": int(np.isfinite(catalog.price).sum()) if catalog.price is not None else 0,
        "sponsored": int((catalog.bid > 0).sum()) if catalog.bid is not None else 0,
        "mean_attributes_per_item": round(float(np.mean([len(a) for a in catalog.attributes])), 3)
        if catalog.attributes
        else 0.0,
    }
    return stats


def _prepare(args: argparse.Namespace) -> int:
    dataset = prepare_dataset(args.data, args.artifacts, quick=args.quick)
    data_dir = dataset_artifacts(dataset, args.artifacts) / "data"
    save_id_maps(dataset, data_dir)
    stats = dataset_stats(dataset)
    (data_dir / STATS_FILE).write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(stats), file=sys.stderr)
    print(data_dir)
    return 0


def _generate(args: argparse.Namespace) -> int:
    config = SyntheticConfig.preset(args.preset, seed=args.seed)
    print(generate(args.out, config, progress=True))
    return 0


def _download(args: argparse.Namespace) -> int:
    print(download_dataset(args.name, args.out))
    return 0


def _stats(args: argparse.Namespace) -> int:
    dataset = prepare_dataset(args.data, args.artifacts, quick=args.quick)
    print(json.dumps(dataset_stats(dataset), indent=2))
    return 0


def _tile(args: argparse.Namespace) -> int:
    if args.copies < 1:
        print(f"recsys data tile: --copies must be >= 1, got {args.copies}", file=sys.stderr)
        return 2
    print(tile_s3rec(args.data, args.copies, args.out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recsys data", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    default_artifacts = Path("artifacts")

    prepare = commands.add_parser("prepare", help="load/generate a dataset and write its id maps and stats")
    prepare.add_argument("--data", default="synthetic", help="'synthetic' or a dataset folder/file")
    prepare.add_argument("--artifacts", type=Path, default=default_artifacts)
    prepare.add_argument("--quick", action="store_true", help="quick synthetic preset")
    prepare.set_defaults(handler=_prepare)

    gen = commands.add_parser("generate", help="write a seeded synthetic e-commerce log")
    gen.add_argument("--out", type=Path, required=True)
    gen.add_argument("--preset", choices=("tiny", "quick", "default"), default="default")
    gen.add_argument("--seed", type=int)
    gen.set_defaults(handler=_generate)

    fetch = commands.add_parser("download", help="download a public dataset (checksum-verified)")
    fetch.add_argument("name", choices=sorted(REGISTRY))
    fetch.add_argument("--out", type=Path, required=True)
    fetch.set_defaults(handler=_download)

    stats = commands.add_parser("stats", help="print a JSON description of a dataset")
    stats.add_argument("--data", required=True, help="'synthetic' or a dataset folder/file")
    stats.add_argument("--artifacts", type=Path, default=default_artifacts)
    stats.add_argument("--quick", action="store_true", help="quick synthetic preset")
    stats.set_defaults(handler=_stats)

    tile = commands.add_parser("tile", help="write N disjoint copies of an S3-Rec log (capacity checks)")
    tile.add_argument("--data", type=Path, required=True, help="S3-Rec folder or NAME.txt")
    tile.add_argument("--copies", type=int, required=True)
    tile.add_argument("--out", type=Path, required=True)
    tile.set_defaults(handler=_tile)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if not logging.getLogger().handlers:
        logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        return args.handler(args)
    except (DatasetFormatError, ChecksumError, OSError) as error:
        print(f"recsys data {args.command}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
