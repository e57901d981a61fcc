"""The softmax-kernels benchmark harness: ``python -m bench --help``.

Modules: ``grids`` (ops, traffic, shape grids, default plans, time model), ``providers`` (what is
run: ours and the peers), ``env`` (inputs, float64 reference, memory check per device),
``timing`` (CUDA-event and perf_counter timers), ``report`` (JSON, CSV, markdown, plots) and
``run`` (the command). See bench/NOTES.md for the measured numbers and predictions.
"""
