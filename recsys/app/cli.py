"""`recsys`: one CLI for data, training, export, evaluation, serving, querying and benchmarks.

Each verb forwards its remaining arguments to the ``main(argv)`` of the module that owns the work,
so training code (torch) is imported only by the verbs that train.
"""

from __future__ import annotations

import argparse
import sys

from recsys.app import load_entry

# verb -> component -> "module:function"; a verb without components maps "" to its module.
COMMANDS: dict[str, dict[str, str]] = {
    "data": {"": "recsys.data.cli:main"},
    "train": {"recall": "recall_service.train:main", "rank": "rank_service.train:main"},
    "export": {"recall": "recall_service.export:main", "rank": "rank_service.export:main"},
    "eval": {"": "recsys.app.eval:main"},
    "serve": {
        "recall": "recall_service.__main__:main",
        "rank": "rank_service.__main__:main",
        "gateway": "gateway.__main__:main",
    },
    "query": {"": "gateway.query:main"},
    "bench": {"": "recsys.app.bench:main"},
    "run": {"": "recsys.app.run:main"},
    "bundle": {"": "recsys.bundle:main"},
}

HELP = {
    "data": "prepare, generate, download or describe datasets",
    "train": "train a model: recall (two-tower) or rank (Transformer ranker)",
    "export": "export a trained model to a serving bundle (ONNX, Faiss, id maps, manifest)",
    "eval": "offline evaluation under the leave-one-out full-ranking protocol; prints JSON path",
    "serve": "start a gRPC service: recall, rank or gateway",
    "query": "call the gateway: recommendations for a user, or send events",
    "bench": "latency/throughput benchmarks; prints JSON",
    "run": "prepare data, train, export and serve all three services (make run)",
    "bundle": "list, verify, publish, activate or roll back versioned bundles",
}


_resolve = load_entry  # kept: tests resolve every table entry through it


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="recsys", description=__doc__.splitlines()[0])
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="COMMAND")
    for verb, components in COMMANDS.items():
        sub = verbs.add_parser(verb, help=HELP[verb], add_help=False)
        if "" not in components:
            sub.add_argument("component", choices=sorted(components))
        sub.add_argument("rest", nargs=argparse.REMAINDER)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    verb = argv[0]
    if verb not in COMMANDS:
        parser.parse_args(argv)  # prints the usage error and exits 2
    components = COMMANDS[verb]
    if "" in components:
        target, rest = components[""], argv[1:]
    else:
        if len(argv) < 2 or argv[1] not in components:
            parser.exit(2, f"recsys {verb}: choose one of {', '.join(sorted(components))}\n")
        target, rest = components[argv[1]], argv[2:]
    result = _resolve(target)(rest)
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
