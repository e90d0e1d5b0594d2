"""The training loop's public pieces: fit's callbacks (per step and per epoch, stopping early,
no effect on the result) and the batches fit draws."""

import numpy as np
import pytest

from fusedlstm.sentiment import Callback, TrainOptions
from fusedlstm.sentiment.training import batches, clip_scale
from helpers import make_model, tiny_split

QUIET = dict(log=lambda *a: None)


class Recorder(Callback):
    def __init__(self, stop_at_epoch=None, stop_at_step=None):
        self.steps, self.epochs = [], []
        self.stop_at_epoch, self.stop_at_step = stop_at_epoch, stop_at_step

    def on_step_end(self, step, logs):
        self.steps.append((step, dict(logs)))
        return step == self.stop_at_step

    def on_epoch_end(self, epoch, logs):
        self.epochs.append((epoch, dict(logs)))
        return epoch == self.stop_at_epoch


def test_callbacks_see_every_step_and_epoch_and_change_nothing():
    opts = TrainOptions(epochs=3, batch_size=8, lr=0.05, seed=1, progress=False, patience=10)
    plain, watched = make_model(seed=3), make_model(seed=3)
    m0 = plain.fit(tiny_split(), tiny_split(20, seed=9), opts, **QUIET)
    rec = Recorder()
    m1 = watched.fit(tiny_split(), tiny_split(20, seed=9), opts, callbacks=[rec], **QUIET)
    for k in plain.params:
        np.testing.assert_array_equal(watched.params[k], plain.params[k])
    assert [r["train_loss"] for r in m1] == [r["train_loss"] for r in m0]
    assert [s for s, _ in rec.steps] == list(range(1, 3 * 5 + 1))  # 40 sentences, batches of 8
    assert [lg["epoch"] for _, lg in rec.steps] == [e for e in (1, 2, 3) for _ in range(5)]
    assert all(lg["batch_size"] == 8 and np.isfinite(lg["loss"]) for _, lg in rec.steps)
    assert [e for e, _ in rec.epochs] == [1, 2, 3]
    for (_, logs), row in zip(rec.epochs, m1):
        assert logs == row and {"dev_acc", "dev_loss", "train_loss", "seconds"} <= set(logs)
    # the losses a step reports average to the epoch's train_loss
    for e, row in enumerate(m1, 1):
        assert np.mean([lg["loss"] for _, lg in rec.steps if lg["epoch"] == e]) == pytest.approx(row["train_loss"])


def test_a_callback_can_stop_training():
    opts = TrainOptions(epochs=6, batch_size=8, lr=0.05, seed=1, progress=False, patience=10)
    rec = Recorder(stop_at_epoch=2)
    metrics = make_model().fit(tiny_split(), None, opts, callbacks=[rec], **QUIET)
    assert [m["epoch"] for m in metrics] == [1, 2] and len(rec.steps) == 10
    rec = Recorder(stop_at_step=7)
    metrics = make_model().fit(tiny_split(), None, opts, callbacks=[rec], **QUIET)
    assert [m["step"] for m in metrics] == [5, 7] and len(rec.steps) == 7


def test_any_object_with_one_method_is_a_callback():
    class OnlyEpochs:
        def __init__(self):
            self.seen = []

        def on_epoch_end(self, epoch, logs):
            self.seen.append(epoch)

    cb = OnlyEpochs()
    make_model().fit(tiny_split(), None, TrainOptions(epochs=2, batch_size=8, progress=False), callbacks=[cb], **QUIET)
    assert cb.seen == [1, 2]


def test_batches_cover_each_index_once_and_bucket_by_length():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 60, size=1003)
    for bucket in (False, True):
        got = batches(np.random.default_rng(5), lengths, 16, bucket, chunk_batches=4)
        flat = np.concatenate(got)
        assert sorted(flat.tolist()) == list(range(1003))
        assert all(len(b) <= 16 for b in got) and sum(len(b) < 16 for b in got) <= (1003 // 64 + 1 if bucket else 1)
        # seeded: the same generator state gives the same batches
        again = batches(np.random.default_rng(5), lengths, 16, bucket, chunk_batches=4)
        assert all(np.array_equal(a, b) for a, b in zip(got, again))
    spread = lambda bs: np.mean([np.ptp(lengths[b]) for b in bs])  # noqa: E731
    assert spread(batches(np.random.default_rng(5), lengths, 16, True)) < 0.5 * spread(
        batches(np.random.default_rng(5), lengths, 16, False)
    )


def test_fit_draws_the_batches_that_batches_gives():
    """What the docstring promises bench scripts: rng [seed, epoch] -> batches, in this order."""
    split = tiny_split(37)
    model = make_model()
    _, lengths = model.encode(split.texts)
    want = [len(b) for e in range(2) for b in batches(np.random.default_rng([4, e]), lengths, 8, True)]
    rec = Recorder()
    model.fit(split, None, TrainOptions(epochs=2, batch_size=8, seed=4, progress=False), callbacks=[rec], **QUIET)
    assert [lg["batch_size"] for _, lg in rec.steps] == want and 5 in want


def test_clip_scale():
    g = {"a": np.array([3.0]), "b": np.array([[4.0]])}
    assert clip_scale(g, None, None) == (5.0, 1.0)
    norm, scale = clip_scale(g, (np.array([0]), np.array([[12.0]])), 6.5)
    assert norm == 13.0 and scale == pytest.approx(0.5)


@pytest.mark.parametrize(
    "bad,msg",
    [
        (dict(average=1.0), "average must be in"),
        (dict(batch_size=0), "batch_size"),
        (dict(lr=0.0), "lr must be"),
        (dict(clip_norm=-1.0), "clip_norm"),
    ],
)
def test_bad_train_options(bad, msg):
    with pytest.raises(ValueError, match=msg):
        make_model().fit(tiny_split(), None, TrainOptions(progress=False, **bad), **QUIET)
