"""The `slora` application: CLI, runs, training loop, data and model loading, embedded defaults, plots.

It uses the library (`slora_kernels.sensitivity`, `allocation`, `nn`, `ops`) through those public
modules; no library module imports anything from here.
"""
