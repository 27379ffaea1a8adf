"""The quality harness: what each effort costs against the exact model, next to the peers' rules.

- ``rules``: selection rules on one matrix (default, original Effort, TEAL, WINA, int8, oracle)
- ``harness``: teacher-forced evaluation through the model's linear-layer hooks
- ``allocation`` / ``calibrate``: the budget split between matrices, calibrated on other text
- ``speed``: measured time per token, for comparisons at equal speed-up
- ``text``: the Botchan evaluation text; ``report``: markdown, JSON and plots
- ``cli``: ``pyeffort eval``; ``tiny``: a tiny random ``pyeffort.models`` Llama for tests
- ``torch_twin`` / ``torch_search``: the default rule in torch, to search budget splits on a GPU
"""
