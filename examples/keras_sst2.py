"""The classic sentiment model in Keras with the fused layer: frozen GloVe embedding ->
fusedlstm.keras.LSTM -> Dropout(0.2) -> Dense(2), trained on SST-2.

Same training recipe as `fusedlstm train`: Adam 1e-3 with the global gradient norm clipped at 5,
batch 32, up to 20 epochs, early stopping on dev accuracy (patience 5) keeping the best weights.

    python examples/keras_sst2.py [--data ../shared/data/sst2] [--epochs 20] [--train-embeddings]

Measured (seed 0, 2 threads): frozen 77.4% test (the NumPy pipeline frozen: 78.6% ± 0.3 over 3
seeds); with --train-embeddings 81.2% (the NumPy pipeline's default, fine-tuned: 81.3% ± 1.0).
(needs the extras [tf,glove]: pip install "fusedlstm[tf,glove]")
"""
import argparse
from pathlib import Path

import keras
import numpy as np

import fusedlstm.keras as fk
from fusedlstm.sentiment.data import LabelMap, load_data
from fusedlstm.sentiment.text import Vocabulary, default_max_len, tokenize
from fusedlstm.sentiment.vectors import embedding_from_vectors

ap = argparse.ArgumentParser()
ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"))
ap.add_argument("--epochs", type=int, default=20)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--train-embeddings", action="store_true",
                help="fine-tune the GloVe table (fusedlstm train's default); the classic model keeps it frozen")
args = ap.parse_args()
keras.utils.set_random_seed(args.seed)

splits = load_data(args.data)
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
h = keras.layers.Embedding(len(vocab), init.matrix.shape[1], mask_zero=True, trainable=args.train_embeddings,
                           embeddings_initializer=keras.initializers.Constant(init.matrix))(inp)
h = fk.LSTM(128)(h)  # was: keras.layers.LSTM(128)
h = keras.layers.Dropout(0.2)(h)
model = keras.Model(inp, keras.layers.Dense(2)(h))
model.compile(keras.optimizers.Adam(1e-3, global_clipnorm=5.0),
              keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
stop = keras.callbacks.EarlyStopping(monitor="val_accuracy", patience=5, restore_best_weights=True)
model.fit(xtr, ytr, validation_data=(xdev, ydev), epochs=args.epochs, batch_size=32, callbacks=[stop])
print(f"test accuracy (best dev epoch): {model.evaluate(xte, yte, verbose=0)[1]:.4f}")
