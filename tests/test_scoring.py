"""fusedlstm.BatchScorer: a dict of NumPy arrays or a DataFrame in, the same kind out with label and
probability columns equal to SentimentClassifier.predict; pickled as its path and options only
(never the weights) and loaded again on unpickling; clear errors for a batch without the text
column or with unusable rows; and Ray Data's map_batches on a local two-CPU cluster (two actors,
numpy and pandas batches) giving the labels local predict gives."""

from __future__ import annotations

import importlib.util
import pickle

import numpy as np
import pytest

import fusedlstm
from fusedlstm import SentimentClassifier
from fusedlstm.sentiment.data import Split
from fusedlstm.sentiment.model import TrainOptions
from helpers import synthetic_sentences

requires_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None or importlib.util.find_spec("pandas") is None,
    reason="ray and pandas are not installed (pip install 'fusedlstm[ray]')",
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    rows = synthetic_sentences(400, 0)
    split = Split([t for t, _ in rows], [["neg", "pos"][y] for _, y in rows], [f"s:{i}" for i in range(len(rows))])
    m = SentimentClassifier.create(split, units=8, embedding_dim=8, seed=0, log=lambda *a: None)
    m.fit(split, None, TrainOptions(epochs=4, batch_size=16, lr=0.02, progress=False), log=lambda *a: None)
    path = tmp_path_factory.mktemp("scoring") / "model"
    m.save(path)
    return path


def sentences(n: int, seed: int = 5) -> list[str]:
    return [t for t, _ in synthetic_sentences(n, seed)]


def expected(model_dir, texts):
    rows = SentimentClassifier.load(model_dir).predict(texts)
    return [r["label"] for r in rows], np.array([r["probability"] for r in rows], np.float32)


def test_numpy_batch(model_dir):
    texts = sentences(300)
    scorer = fusedlstm.BatchScorer(model_dir, batch_size=16)
    batch = {"text": np.array(texts), "id": np.arange(300)}
    out = scorer(batch)
    labels, probs = expected(model_dir, texts)
    assert out["label"].tolist() == labels and set(labels) == {"neg", "pos"}
    np.testing.assert_array_equal(out["probability"], probs)
    np.testing.assert_array_equal(out["id"], np.arange(300))  # other columns kept, in order
    assert set(batch) == {"text", "id"}  # the caller's dict is not modified
    empty = scorer({"text": np.array([], dtype=str)})
    assert len(empty["label"]) == 0 and len(empty["probability"]) == 0


def test_dataframe_batch_other_column_name(model_dir):
    pd = pytest.importorskip("pandas", reason="pandas is not installed (pip install 'fusedlstm[ray]')")
    texts = sentences(120, 9)
    df = pd.DataFrame({"review": texts, "n": range(120)}, index=range(1000, 1120))
    out = fusedlstm.BatchScorer(model_dir, text_column="review")(df)
    labels, probs = expected(model_dir, texts)
    assert isinstance(out, pd.DataFrame) and list(out.index) == list(df.index)
    assert out["label"].tolist() == labels
    np.testing.assert_array_equal(out["probability"].to_numpy(), probs)
    assert list(df.columns) == ["review", "n"]  # the input frame is not modified


def test_pickles_as_its_path_not_its_weights(model_dir):
    scorer = fusedlstm.BatchScorer(model_dir, text_column="t", batch_size=8)
    blob = pickle.dumps(scorer)
    assert len(blob) < 1000  # path and options only: the embedding alone is bigger
    assert scorer.model.params["embedding"].tobytes()[:64] not in blob
    again = pickle.loads(blob)
    assert (again.model_dir, again.text_column, again.batch_size) == (model_dir, "t", 8)
    texts = sentences(40, 3)
    assert again({"t": np.array(texts)})["label"].tolist() == expected(model_dir, texts)[0]


def test_bad_batches_and_arguments(model_dir, tmp_path):
    scorer = fusedlstm.BatchScorer(model_dir)
    with pytest.raises(KeyError, match=r"no text column 'text'; its columns are \['sentence', 'id'\]"):
        scorer({"sentence": np.array(["good"]), "id": np.array([1])})
    with pytest.raises(ValueError, match=r"column 'text', row 1 of this batch: empty sentence"):
        scorer({"text": np.array(["good film", "  "])})
    with pytest.raises(ValueError, match=r"row 0 of this batch: expected a string, got NoneType"):
        scorer({"text": np.array([None, "good"], dtype=object)})
    with pytest.raises(TypeError, match="dict of NumPy arrays or a pandas DataFrame"):
        scorer(["good film"])
    with pytest.raises(ValueError, match="batch_size"):
        fusedlstm.BatchScorer(model_dir, batch_size=0)
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        fusedlstm.BatchScorer(tmp_path / "nowhere")


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@requires_ray
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray's own DataContext deprecations
@pytest.mark.parametrize("batch_format", ["numpy", "pandas"])
def test_ray_data_map_batches(model_dir, ray_cluster, batch_format):
    """A local two-CPU cluster, two scoring actors (each loading the model once), 3000 sentences
    in batches of 200: every row comes back with the label local predict gives it."""
    ray = ray_cluster
    ray.data.DataContext.get_current().enable_progress_bars = False
    texts = sentences(3000, 21)
    ds = ray.data.from_items([{"text": t, "row": i} for i, t in enumerate(texts)])
    scored = ds.map_batches(
        fusedlstm.BatchScorer,
        fn_constructor_args=(str(model_dir),),
        fn_constructor_kwargs={"batch_size": 64},
        batch_size=200,
        batch_format=batch_format,
        compute=ray.data.ActorPoolStrategy(size=2),
        num_cpus=1,
    )
    rows = sorted(scored.take_all(), key=lambda r: r["row"])
    labels, probs = expected(model_dir, texts)
    assert [r["row"] for r in rows] == list(range(3000))
    assert [r["text"] for r in rows] == texts
    assert [r["label"] for r in rows] == labels
    np.testing.assert_array_equal(np.array([r["probability"] for r in rows], np.float32), probs)
