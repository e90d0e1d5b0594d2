"""`fusedlstm bench` end to end on a tiny config (what it measures, not how fast): the JSON
holds every mode, implementation and thread count asked for, with the FMA peak and the memory
report; --plot writes a PNG; bad arguments are refused with a message."""
import importlib.util
import json
import subprocess
import sys

import pytest


def bench(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fusedlstm", "bench", *args], capture_output=True,
                          text=True, timeout=600, cwd=cwd)


def test_bench_tiny_config(tmp_path):
    impls = ["fusedlstm", "numpy"]
    have_torch = importlib.util.find_spec("torch") is not None
    if have_torch:
        impls.append("torch")
    args = ["--quick", "--config", "2,3,4,5", "--threads", "1,2", "--impls", ",".join(impls),
            "--out", str(tmp_path / "b.json")]
    plot = have_torch and importlib.util.find_spec("matplotlib") is not None
    if plot:
        args += ["--plot", str(tmp_path / "b.png")]
    r = bench(*args)
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "b.json").read_text())
    got = {(tuple(x["config"]), x["threads"], x["mode"]) for x in rep["results"]}
    assert got == {((2, 3, 4, 5), t, m) for t in (1, 2) for m in ("forward", "forward+backward")}
    for x in rep["results"]:
        assert sorted(x["impls"]) == sorted(impls)
        for st in x["impls"].values():
            assert 0 < st["min_s"] <= st["median_s"] and st["gflops"] > 0
    assert set(rep["fma_peak_gflops"]) == {"1", "2"} and rep["fma_peak_gflops"]["1"] > 0
    mem = [x["memory"] for x in rep["results"] if "memory" in x]
    assert len(mem) == 1 and mem[0]["inference_cache"] is False
    # B=2, T=3, E=4, H=5: x, W, R, gates, h_{t-1} and c history, in float32.
    B, T, E, H = 2, 3, 4, 5
    floats = E * 4 * H + H * 4 * H + B * T * (E + 4 * H + H) + B * (T + 1) * H
    assert mem[0]["cache_bytes"] == 4 * floats
    assert mem[0]["training_step_peak_bytes"] >= mem[0]["cache_bytes"]
    assert "forward+backward" in r.stdout and "cache" in r.stdout
    if plot:
        assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args,msg", [(["--config", "1,2,3"], "four positive integers"),
                                      (["--threads", "0"], "not a positive count"),
                                      (["--impls", "fusedlstm,cudnn"], "unknown ['cudnn']")])
def test_bench_rejects_bad_arguments(args, msg):
    r = bench(*args)
    assert r.returncode != 0 and msg in r.stderr
