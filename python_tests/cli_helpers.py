"""Run `slora` in a subprocess as a user would; offline, so a missing model fails fast."""
import os
import subprocess
import sys
from pathlib import Path

from slora_kernels.app.data import rotten_tomatoes

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def slora(*args, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slora_kernels", *map(str, args)], capture_output=True, text=True,
                          env=ENV, cwd=cwd, timeout=timeout)


def tiny_csv(path: Path, n: int = 48) -> Path:
    """n Rotten Tomatoes training snippets as a CSV with columns text, label (fresh/rotten)."""
    train, _ = rotten_tomatoes()
    lines = ["text,label"] + [f'"{t.replace(chr(34), chr(39))}",{["rotten", "fresh"][y]}'
                              for t, y in zip(train.texts[:n], train.labels[:n])]
    path.write_text("\n".join(lines) + "\n")
    return path
