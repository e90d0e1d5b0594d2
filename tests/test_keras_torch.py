"""fusedlstm.keras.LSTM on Keras's torch backend: runs tests/keras_torch_cases.py,
tests/test_keras_stateful.py and tests/test_keras_dropout_masks.py under KERAS_BACKEND=torch in a
process of its own (Keras fixes its backend at first import, and this process has keras on
TensorFlow). Skips without torch; CI installs torch==2.13.0."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.heavy

HERE = Path(__file__).resolve().parent


@pytest.mark.skipif(
    importlib.util.find_spec("torch") is None or importlib.util.find_spec("keras") is None,
    reason="needs torch and keras (CI installs torch==2.13.0 and keras)",
)
def test_layer_on_the_torch_backend():
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-rs",
            str(HERE / "keras_torch_cases.py"),
            str(HERE / "test_keras_stateful.py"),
            str(HERE / "test_keras_dropout_masks.py"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=HERE,
        env=dict(os.environ, KERAS_BACKEND="torch"),
    )
    print(r.stdout[-3000:])
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "skipped" not in r.stdout.splitlines()[-1]
