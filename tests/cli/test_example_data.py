"""examples/data/make_causal_lm_text.py runs as written and reproduces the committed text files."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[2] / "examples" / "data"


@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="the committed files were written with Python 3.11")
def test_make_causal_lm_text_reproduces_the_committed_files(tmp_path: Path) -> None:
    script = shutil.copy(DATA / "make_causal_lm_text.py", tmp_path)  # it writes beside itself
    subprocess.run([sys.executable, str(script)], check=True, cwd=tmp_path, timeout=120)
    for name in ("causal_lm_train.txt", "causal_lm_eval.txt"):
        assert (tmp_path / name).read_text() == (DATA / name).read_text(), name
