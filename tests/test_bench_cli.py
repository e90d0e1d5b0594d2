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


ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
WORDS = ["great", "fun", "moving", "dull", "boring", "awful", "the", "film", "a", "plot"]


def tiny_text_data(tmp_path):
    """A GLUE-style directory, Pang & Lee files and a .vec file, all small and synthetic."""
    import numpy as np
    rng = np.random.default_rng(0)

    def sentence(pos):
        words = list(rng.choice(WORDS[:3] if pos else WORDS[3:6], 2)) + list(rng.choice(WORDS[6:], 2))
        rng.shuffle(words)
        return " ".join(words)

    glue = tmp_path / "glue"
    glue.mkdir()
    for split, n in (("train", 60), ("dev", 20), ("test", 20)):
        rows = [(sentence(i % 2 == 0), i % 2 == 0) for i in range(n)]
        (glue / f"{split}.tsv").write_text("sentence\tlabel\n" + "".join(f"{s}\t{int(p)}\n" for s, p in rows))
    mr = tmp_path / "mr"
    mr.mkdir()
    (mr / "rt-polarity.pos").write_text("".join(sentence(True) + "\n" for _ in range(30)))
    (mr / "rt-polarity.neg").write_text("".join(sentence(False) + "\n" for _ in range(30)))
    vec = tmp_path / "tiny.vec"
    vec.write_text("".join(f"{w} " + " ".join(f"{v:.3f}" for v in rng.standard_normal(6)) + "\n"
                           for w in WORDS))
    return glue, mr, vec


def run_script(name, *args):
    return subprocess.run([sys.executable, str(ROOT / "bench" / name), *args], capture_output=True,
                          text=True, timeout=900)


def test_end_to_end_bench_scripts_run(tmp_path):
    """bench_sst2.py (with its PyTorch twin where torch is installed, in both embedding modes)
    and bench_mr.py on tiny synthetic data: they finish and write the JSON the README quotes."""
    glue, mr, vec = tiny_text_data(tmp_path)
    have_torch = importlib.util.find_spec("torch") is not None
    for extra in ([], ["--freeze-embeddings"], ["--torch-dense-embedding-adam"]):
        out = tmp_path / "sst2.json"
        r = run_script("bench_sst2.py", "--data", str(glue), "--vectors", str(vec), "--seeds", "0,1",
                       "--epochs", "2", "--out", str(out), *extra, *([] if have_torch else ["--no-torch"]))
        assert r.returncode == 0, r.stderr
        rep = json.loads(out.read_text())
        assert set(rep["summary"]) == ({"fusedlstm", "torch"} if have_torch else {"fusedlstm"})
        for s in rep["summary"].values():
            assert 0 <= s["test_acc_mean"] <= 100 and s["epoch_s_median"] > 0
    out = tmp_path / "mr.json"
    r = run_script("bench_mr.py", "--data", str(mr), "--vectors", str(vec), "--folds", "3",
                   "--epochs", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())
    assert len(rep["fold_acc"]) == 3 and 0 <= rep["mean"] <= 100


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None,
                    reason="TensorFlow is not installed (CI installs tensorflow-cpu)")
def test_keras_bench_script_runs(tmp_path):
    out = tmp_path / "keras.json"
    r = run_script("bench_keras.py", "--quick", "--config", "2,3,4,5", "--out", str(out))
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())
    (row,) = rep["results"]
    assert row["config"] == [2, 3, 4, 5] and set(row["impls"]) == {"fusedlstm.keras", "keras"}


@pytest.mark.filterwarnings("error::ResourceWarning",
                            "error::pytest.PytestUnraisableExceptionWarning")
def test_a_failing_worker_is_reported_with_its_stderr():
    """Workers keep TensorFlow's start-up chatter out of the terminal; when one dies, its stderr
    is in the error, and closing it releases its pipes (no unclosed-file warning)."""
    from fusedlstm.bench.cli import _Worker

    w = _Worker("fusedlstm", 1)
    try:
        assert w.ask(cmd="ready") == {}
        with pytest.raises(RuntimeError, match=r"(?s)worker 'fusedlstm' exited.*negative dimensions"):
            w.ask(cmd="setup", config=[-1, 2, 3, 4], warmup=0)
    finally:
        w.close()


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None,
                    reason="TensorFlow is not installed (CI installs tensorflow-cpu)")
def test_keras_workers_use_tensorflow_whatever_the_shell_exports(monkeypatch):
    from fusedlstm.bench.cli import _Worker

    monkeypatch.setenv("KERAS_BACKEND", "torch")  # a user's shell may export this
    w = _Worker("keras", 1)
    try:
        assert set(w.ask(cmd="setup", config=[2, 3, 4, 5], warmup=1)["number"]) == {
            "forward", "forward+backward"}
        assert w.ask(cmd="sample", mode="forward+backward")["seconds"] > 0
    finally:
        w.close()
