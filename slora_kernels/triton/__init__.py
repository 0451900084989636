"""The @triton.jit kernels and their launch helpers (nothing else lives here)."""
import os

# Triton's CPU interpreter (tests without a GPU): autotuning runs only the first config there, and
# kernels work around what it mis-simulates.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
