"""``pyeffort eval``: what each effort costs against the exact model, next to the peers' rules.

- ``rules``: selection rules on one matrix (default, original Effort, TEAL, WINA, int8, oracle)
- ``harness``: teacher-forced evaluation through the model's linear-layer hooks
- ``speed``: measured time per token, for comparisons at equal speed-up
- ``report``: markdown, JSON and plots; ``cli``: the ``pyeffort eval`` command
- ``tiny``: a tiny random ``pyeffort.models`` Llama for tests and smoke runs

The budget split it applies is the model's shipped profile (``pyeffort.models.profiles``);
calibrating one, and every other research tool, lives in ``experiments/`` (not installed).
"""
