"""The @triton.jit kernels and their launch helpers (nothing else lives here)."""
