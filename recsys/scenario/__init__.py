"""A scenario, one definition: the scenario file compiled into stages (recall -> rank -> re-rank
rules) that declare what they need and produce and run themselves on columnar candidates.

The gateway runs it against gRPC stubs; ``recsys eval --scenario`` and the ranker's training
lists run the same compiled scenario against the in-process engines. Transport-agnostic: a
backend is anything with the stubs' async methods. Modules: :mod:`~recsys.scenario.config`
(parse and validate the file), :mod:`~recsys.scenario.stages`, :mod:`~recsys.scenario.rules`,
:mod:`~recsys.scenario.pipeline` (run a scenario with deadlines and fallbacks),
:mod:`~recsys.scenario.candidates`, :mod:`~recsys.scenario.catalog`.
"""
