"""The `slora` application: CLI, runs, training loop, data and model loading, embedded defaults, plots.

It uses the library (`slora_kernels.sensitivity`, `allocation`, `nn`, `ops`) through those public
modules; no library module imports anything from here.
"""

# How `slora train --ranks` and `runs.run` choose the ranks (besides a report file for --ranks).
RANK_CHOICES = ("uniform", "sensitivity", "adalora", "eva")
