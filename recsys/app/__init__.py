"""The application layer: entry points that wire the services together (the `recsys` CLI, `make
run`, benchmarks, load generation, evaluation wiring, the in-process cascade).

It imports the services and the core; nothing imports it (tests/test_layers.py checks the graph).
"""
