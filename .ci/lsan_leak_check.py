"""LeakSanitizer leak check for the sanitizer build (.ci/sanitize): the same forward/backward/
inference loop runs in two child processes, N and 10*N iterations, with leak detection on.
The interpreter and NumPy leave a fixed amount unreleased at exit; a leak in the kernel or the
binding grows with the number of calls. Fails if the longer run leaks more than the shorter one
(beyond a small allowance) or if any leak's stack passes through fusedlstm's module."""

import os
import re
import subprocess
import sys

LOOP = r"""
import sys
import numpy as np
import fusedlstm
rng = np.random.default_rng(0)
x = rng.standard_normal((8, 20, 16)).astype(np.float32)
W = rng.standard_normal((16, 128)).astype(np.float32) * 0.3
R = rng.standard_normal((32, 128)).astype(np.float32) * 0.3
up = np.ones((8, 20, 32), np.float32)
for i in range(int(sys.argv[1])):
    out = fusedlstm.lstm_forward(x, W, R, lengths=rng.integers(0, 21, 8))
    fusedlstm.lstm_backward(out[3], d_outputs=up)
    fusedlstm.lstm_forward(x, W, R, training=False)
    if i % 7 == 0:
        fusedlstm.lstm_forward(x, W, R)  # a cache never used: freed when dropped
    if i % 11 == 0:
        try:
            fusedlstm.lstm_forward(x[:, :, :3], W, R)  # an error path
        except ValueError:
            pass
fusedlstm.empty_cache()
"""


def leaked(n: int, loop: str = LOOP) -> tuple:
    env = dict(os.environ)
    env["ASAN_OPTIONS"] = "detect_leaks=1:abort_on_error=0:exitcode=23"
    env["PYTHONMALLOC"] = "malloc"  # every object on the heap LeakSanitizer scans
    r = subprocess.run([sys.executable, "-c", loop, str(n)], capture_output=True, text=True, env=env, timeout=1200)
    m = re.search(r"SUMMARY: AddressSanitizer: (\d+) byte\(s\) leaked", r.stderr)
    ours = [b for b in r.stderr.split("\n\n") if "leak of" in b and ("fusedlstm/_core" in b or "fusedlstm::" in b)]
    if r.returncode not in (0, 23) or (r.returncode == 23 and not m):  # 23: LSan found leaks
        sys.exit(f"leak-check child failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    return (int(m.group(1)) if m else 0), ours


if "--self-test" in sys.argv:  # the check must see a leak of one reference per call
    bad = LOOP.replace(
        "    if i % 7 == 0:",
        "    import ctypes; ctypes.pythonapi.Py_IncRef(ctypes.py_object(out[0]))\n    if i % 7 == 0:",
    )
    a, _ = leaked(30, bad)
    b, _ = leaked(300, bad)
    print(f"self-test: an injected leak gives {a} then {b} bytes")
    sys.exit(0 if b > a + 4096 else "self-test failed: the injected leak was not seen")

small, ours_small = leaked(300)
large, ours_large = leaked(3000)
print(f"LeakSanitizer: {small} bytes unreleased after 300 rounds, {large} after 3,000 rounds")
if ours_small or ours_large:
    sys.exit("leaks through fusedlstm:\n" + "\n\n".join((ours_small + ours_large)[:5]))
if large > small + 4096:
    sys.exit(f"leak: {large - small} more bytes after 2,700 more rounds")
print("leak check: no growth")
