"""Shared core of the recommender: contract stubs (recsys.v1), serving bootstrap, data layer,
evaluation protocol and bundle format. Imported by recall_service, rank_service and gateway.

Nothing in this package imports torch when imported, but ``recsys.torch_layers`` (training code
only; ``recsys.training`` imports torch inside its functions): it is safe in serving processes.
"""

__version__ = "0.1.0"
