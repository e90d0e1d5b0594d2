"""`fusedlstm bench` end to end on a tiny config (what it measures, not how fast): the JSON
holds every mode, implementation and thread count asked for, with the FMA peak, the ratios and the
memory report, and is written only where --out says; --plot writes a PNG; bad arguments are
refused with a message; the onnxruntime column computes our LSTM; the bench scripts run."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.heavy


def bench(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "fusedlstm", "bench", *args], capture_output=True, text=True, timeout=600, cwd=cwd
    )


HAVE_ORT = all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx"))


def test_bench_bfloat16_rows(tmp_path):
    """--precision float32,bfloat16: every row twice, the bfloat16 rows with fusedlstm's
    bfloat16 products beside torch under autocast and their share of the bfloat16 peak; a CPU
    without AVX512_BF16 gets the float32 rows and a note saying why the others are missing."""
    import fusedlstm

    impls = ["fusedlstm", "fusedlstm.prepared", "numpy"]
    if importlib.util.find_spec("torch") is not None:
        impls.append("torch")
    r = bench(
        "--quick",
        "--config",
        "3,4,5,6",
        "--modes",
        "forward,forward+backward",
        "--threads",
        "1",
        "--precision",
        "float32,bfloat16",
        "--impls",
        ",".join(impls),
        "--out",
        str(tmp_path / "b.json"),
    )
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "b.json").read_text())
    precisions = {x["precision"] for x in rep["results"]}
    if fusedlstm.bf16_engine() is None:
        assert precisions == {"float32"} and any("bfloat16" in n for n in rep["left_out"])
        return
    assert precisions == {"float32", "bfloat16"}
    peaks = rep["bf16_peak_gflops"]["1"]
    assert peaks["engine"] == fusedlstm.bf16_engine() and peaks[peaks["engine"]] > 0
    for x in rep["results"]:
        if x["precision"] == "bfloat16":
            assert "numpy" not in x["impls"] and "fusedlstm" in x["impls"]  # the reference has no bfloat16
            assert x["impls"]["fusedlstm"]["pct_bf16_peak"] > 0
        else:
            assert "numpy" in x["impls"]
    assert "forward+backward bfloat16" in r.stdout and "bfloat16 peaks" in r.stdout


def test_bench_tiny_config(tmp_path):
    from fusedlstm.bench.implementations import IMPL_MODES, MODES
    from fusedlstm.bench.report import markdown_tables

    impls = ["fusedlstm", "numpy"]
    have_torch = importlib.util.find_spec("torch") is not None
    if have_torch:
        impls.append("torch")
    if HAVE_ORT:
        impls.append("onnxruntime")
    import fusedlstm

    if hasattr(fusedlstm, "prepare"):
        impls.append("fusedlstm.prepared")
    args = [
        "--quick",
        "--config",
        "2,3,4,5",
        "--threads",
        "1,2",
        "--impls",
        ",".join(impls),
        "--out",
        str(tmp_path / "b.json"),
    ]
    plot = have_torch and importlib.util.find_spec("matplotlib") is not None
    if plot:
        args += ["--plot", str(tmp_path / "b.png")]
    r = bench(*args)
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "b.json").read_text())
    got = {(tuple(x["config"]), x["threads"], x["mode"]) for x in rep["results"]}
    assert got == {((2, 3, 4, 5), t, m) for t in (1, 2) for m in MODES}  # a user config runs every mode
    for x in rep["results"]:
        assert x["precision"] == "float32"
        assert sorted(x["impls"]) == sorted(n for n in impls if x["mode"] in IMPL_MODES[n])
        for name, st in x["impls"].items():
            assert 0 < st["min_s"] <= st["median_s"] and st["gflops"] > 0
            for base in ("torch", "onnxruntime"):
                if base in x["impls"] and name != base:
                    ratio = x["impls"][base]["median_s"] / st["median_s"]
                    assert st[f"speedup_vs_{base}"] == pytest.approx(ratio)
                else:
                    assert f"speedup_vs_{base}" not in st
    assert set(rep["fma_peak_gflops"]) == {"1", "2"} and rep["fma_peak_gflops"]["1"] > 0
    mem = [x["memory"] for x in rep["results"] if "memory" in x]
    assert len(mem) == 1 and mem[0]["inference_cache"] is False
    # B=2, T=3, E=4, H=5: x, W, R, gates, h_{t-1} and c history, in float32.
    B, T, E, H = 2, 3, 4, 5
    floats = E * 4 * H + H * 4 * H + B * T * (E + 4 * H + H) + B * (T + 1) * H
    assert mem[0]["cache_bytes"] == 4 * floats
    assert mem[0]["training_step_peak_bytes"] >= mem[0]["cache_bytes"]
    assert "forward+backward" in r.stdout and "infer-last-state" in r.stdout and "cache" in r.stdout
    md = markdown_tables(rep)
    assert "| fusedlstm vs torch |" in md if have_torch else "vs torch" not in md
    assert ("| fusedlstm vs onnxruntime |" in md) == HAVE_ORT
    if plot:
        assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic writes left no temporary behind


def test_bench_writes_nothing_without_out(tmp_path):
    """Run from a checkout's root without --out: the table is printed, bench/results is untouched
    and no JSON appears anywhere in the working directory."""
    results = tmp_path / "bench" / "results"
    results.mkdir(parents=True)
    (results / "kernel.json").write_text("{}")
    r = bench(
        "--quick", "--config", "2,3,4,5", "--modes", "forward", "--threads", "1", "--impls", "fusedlstm", cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr
    assert "(2, 3, 4, 5)" in r.stdout and "no JSON written" in r.stderr
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["kernel.json"]
    assert (results / "kernel.json").read_text() == "{}"


def test_default_plan_has_the_small_batch_inference_rows():
    from fusedlstm.bench.implementations import (
        BIDIRECTIONAL_CONFIGS,
        BIDIRECTIONAL_IMPLS,
        DEFAULT_CONFIGS,
        IMPLS,
        SMALL_BATCH_CONFIGS,
        make_plan,
    )

    small = [
        (1, 20, 50, 128),
        (1, 50, 300, 256),
        (1, 100, 300, 512),
        (4, 30, 100, 256),
        (16, 20, 50, 128),
        (32, 20, 50, 128),
    ]
    assert SMALL_BATCH_CONFIGS == small
    assert BIDIRECTIONAL_CONFIGS == [(64, 50, 300, 128)]
    assert [tuple(r[:2]) for r in make_plan()] == (
        [(c, ("forward", "forward+backward")) for c in DEFAULT_CONFIGS]
        + [(c, ("infer-last-state",)) for c in small]
        + [(c, ("bidirectional",)) for c in BIDIRECTIONAL_CONFIGS]
    )
    # Every implementation runs in the standard rows; the bidirectional row has its own set.
    assert all(r.skip == () for r in make_plan() if r.modes != ("bidirectional",))
    bi = [r for r in make_plan() if r.modes == ("bidirectional",)]
    assert all(set(IMPLS) - set(r.skip) == set(BIDIRECTIONAL_IMPLS) for r in bi)
    assert [tuple(r[:2]) for r in make_plan(None, ["infer-last-state"])] == [(c, ("infer-last-state",)) for c in small]
    assert make_plan([(2, 3, 4, 5)], ["forward"]) == [((2, 3, 4, 5), ("forward",), ())]
    # --quick: the small-batch rows against onnxruntime only, no NumPy at the biggest config.
    quick = {(r.config, r.modes): set(IMPLS) - set(r.skip) for r in make_plan(quick=True)}
    assert all(quick[(c, ("infer-last-state",))] == {"fusedlstm", "fusedlstm.prepared", "onnxruntime"} for c in small)
    big = ("forward", "forward+backward")
    assert "numpy" not in quick[((128, 100, 256, 512), big)] and "numpy" in quick[((64, 50, 300, 128), big)]


def test_prepared_column_runs_exactly_when_fusedlstm_has_prepare():
    import fusedlstm
    from fusedlstm.bench.implementations import available

    run, notes = available(False, ["fusedlstm", "fusedlstm.prepared"])
    if hasattr(fusedlstm, "prepare"):
        assert run == ["fusedlstm", "fusedlstm.prepared"] and notes == []
    else:
        assert run == ["fusedlstm"] and len(notes) == 1 and "prepare()" in notes[0]


@pytest.mark.skipif(not HAVE_ORT, reason="onnxruntime and onnx are not installed (the bench extra installs them)")
@pytest.mark.parametrize("cfg", [(2, 3, 4, 5), (1, 20, 50, 128), (4, 30, 100, 256)])
def test_onnxruntime_lstm_matches_fusedlstm(cfg):
    """The benchmark's ONNX graph (gates reordered to i, o, f, c, bias in the W half, x
    time-major) computes our LSTM: its Y_h is our h_n and its Y our outputs."""
    import numpy as np

    import fusedlstm
    from fusedlstm.bench.implementations import make_inputs, onnx_lstm_model, onnx_session

    B, T, _, H = cfg
    inp = make_inputs(*cfg, seed=1)
    x, W, R, b = (inp[k] for k in ("x", "kernel", "recurrent_kernel", "bias"))
    outputs, h_n, _, _ = fusedlstm.lstm_forward(x, W, R, b, training=False)
    xt = np.ascontiguousarray(x.transpose(1, 0, 2))
    (y_h,) = onnx_session(onnx_lstm_model(W, R, b, T, B, last_state_only=True), 1).run(None, {"X": xt})
    assert y_h.shape == (1, B, H)
    np.testing.assert_allclose(y_h[0], h_n, rtol=0, atol=1e-5)
    (y,) = onnx_session(onnx_lstm_model(W, R, b, T, B, last_state_only=False), 1).run(None, {"X": xt})
    assert y.shape == (T, 1, B, H)
    np.testing.assert_allclose(y[:, 0].transpose(1, 0, 2), outputs, rtol=0, atol=1e-5)


def test_onnx_weights_reorder_the_gates():
    """i, f, c, o (ours) -> i, o, f, c (ONNX), transposed; the bias in the input half."""
    import numpy as np

    from fusedlstm.bench.implementations import onnx_weights

    H, E = 2, 3
    kernel = np.repeat(np.arange(4, dtype=np.float32), H)[None].repeat(E, 0)  # column block g holds g
    rec = np.repeat(np.arange(4, dtype=np.float32), H)[None].repeat(H, 0)
    bias = np.repeat(np.arange(4, dtype=np.float32), H)
    W, R, B = onnx_weights(kernel, rec, bias)
    assert W.shape == (1, 4 * H, E) and R.shape == (1, 4 * H, H) and B.shape == (1, 8 * H)
    gates = [0, 3, 1, 2]  # i, o, f, c
    np.testing.assert_array_equal(W[0, :, 0], np.repeat(gates, H))
    np.testing.assert_array_equal(R[0, :, 1], np.repeat(gates, H))
    np.testing.assert_array_equal(B[0], np.concatenate([np.repeat(gates, H), np.zeros(4 * H)]))


def test_write_json_is_atomic_and_keeps_the_old_file_on_failure(tmp_path):
    import os

    from fusedlstm.bench.report import write_atomic, write_json

    out = tmp_path / "sub" / "r.json"
    write_json(out, {"a": 1})
    assert json.loads(out.read_text()) == {"a": 1}
    umask = os.umask(0o022)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask

    def fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(out, fail)
    assert json.loads(out.read_text()) == {"a": 1}
    assert [p.name for p in out.parent.iterdir()] == ["r.json"]


def test_readme_table_renders_the_committed_report():
    """bench/readme_table.py renders bench/results/kernel.json (an older report: no precision,
    no stored ratios) through the subpackage's renderer."""
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "readme_table.py")], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("| (B, T, E, H) | mode | precision | fusedlstm ms (1 / 2 threads)")
    assert any("**" in line and "×" in line for line in lines[2:])
    bad = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "readme_table.py"), str(ROOT / "no-such.json")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0 and "no-such.json" in bad.stderr


@pytest.mark.parametrize(
    "args,msg",
    [
        (["--config", "1,2,3"], "four positive integers"),
        (["--threads", "0"], "not a positive count"),
        (["--impls", "fusedlstm,cudnn"], "unknown ['cudnn']"),
    ],
)
def test_bench_rejects_bad_arguments(args, msg):
    r = bench(*args)
    assert r.returncode != 0 and msg in r.stderr


ROOT = Path(__file__).resolve().parents[1]
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
    vec.write_text("".join(f"{w} " + " ".join(f"{v:.3f}" for v in rng.standard_normal(6)) + "\n" for w in WORDS))
    return glue, mr, vec


def run_script(name, *args):
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / name), *args], capture_output=True, text=True, timeout=900
    )


def test_end_to_end_bench_scripts_run(tmp_path):
    """bench_sst2.py (with its PyTorch twin where torch is installed, in both embedding modes)
    and bench_mr.py on tiny synthetic data: they finish and write the JSON the README quotes."""
    glue, mr, vec = tiny_text_data(tmp_path)
    have_torch = importlib.util.find_spec("torch") is not None
    for extra in ([], ["--freeze-embeddings"], ["--torch-dense-embedding-adam"]):
        out = tmp_path / "sst2.json"
        r = run_script(
            "bench_sst2.py",
            "--data",
            str(glue),
            "--vectors",
            str(vec),
            "--seeds",
            "0,1",
            "--epochs",
            "2",
            "--out",
            str(out),
            *extra,
            *([] if have_torch else ["--no-torch"]),
        )
        assert r.returncode == 0, r.stderr
        rep = json.loads(out.read_text())
        assert set(rep["summary"]) == ({"fusedlstm", "torch"} if have_torch else {"fusedlstm"})
        for s in rep["summary"].values():
            assert 0 <= s["test_acc_mean"] <= 100 and s["epoch_s_median"] > 0
    out = tmp_path / "mr.json"
    r = run_script(
        "bench_mr.py", "--data", str(mr), "--vectors", str(vec), "--folds", "3", "--epochs", "2", "--out", str(out)
    )
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())
    assert len(rep["fold_acc"]) == 3 and 0 <= rep["mean"] <= 100


@pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is None, reason="TensorFlow is not installed (CI installs tensorflow-cpu)"
)
def test_keras_bench_script_runs(tmp_path):
    out = tmp_path / "keras.json"
    r = run_script("bench_keras.py", "--quick", "--config", "2,3,4,5", "--out", str(out))
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())
    assert [r["variant"] for r in rep["results"]] == ["plain", "recurrent_dropout", "holes"]
    for row in rep["results"]:
        assert row["config"] == [2, 3, 4, 5] and set(row["impls"]) == {"fusedlstm.keras", "keras"}


@pytest.mark.filterwarnings("error::ResourceWarning", "error::pytest.PytestUnraisableExceptionWarning")
def test_a_failing_worker_is_reported_with_its_stderr():
    """Workers keep TensorFlow's start-up chatter out of the terminal; when one dies, its stderr
    is in the error, and closing it releases its pipes (no unclosed-file warning)."""
    from fusedlstm.bench.workers import Worker

    w = Worker("fusedlstm", 1)
    try:
        assert w.ask(cmd="ready") == {}
        with pytest.raises(RuntimeError, match=r"(?s)worker 'fusedlstm' exited.*negative dimensions"):
            w.ask(cmd="setup", config=[-1, 2, 3, 4], warmup=0)
    finally:
        w.close()


@pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is None, reason="TensorFlow is not installed (CI installs tensorflow-cpu)"
)
def test_keras_workers_use_tensorflow_whatever_the_shell_exports(monkeypatch):
    from fusedlstm.bench.workers import Worker

    monkeypatch.setenv("KERAS_BACKEND", "torch")  # a user's shell may export this
    w = Worker("keras", 1)
    try:
        assert set(w.ask(cmd="setup", config=[2, 3, 4, 5], warmup=1)["number"]) == {"forward", "forward+backward"}
        assert w.ask(cmd="sample", mode="forward+backward")["seconds"] > 0
    finally:
        w.close()
