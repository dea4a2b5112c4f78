"""Recall service: two-tower model (training in ``train``/``model``/``export``, torch), and the
serving side (``engine``, ``index``, ``sources``, ``servicer``, ``server``; no torch)."""
