"""The NANN scoring model s_u(e_v): an item network, a user part and a score network.

The scorer is factored the way retrieval needs it. ``item_embeddings`` maps
item ids to e_v (computed once per item after training and stored beside the
graph). ``user_state`` does the per-user work once: it takes the behaviour
sequence as e_v rows, pools them and projects what does not depend on the
candidate. ``score`` then takes only candidate e_v rows, so a graph walk can
score thousands of candidates per user cheaply. Behaviour items go through the
same item tables as candidates, so serving needs nothing per user beyond the
behaviour ids.

Architectures (DESIGN.md section 2):
  two_sided:  <user_net(sum_pool(h)), e_v>
  dnn:        score_net([sum_pool(h), e_v, sum_pool(h) * e_v])
  din:        score_net([sum_pool(h), e_v, sum_pool(h) * e_v, att(e_v, h), att(e_v, h) * e_v])
where att is scaled dot-product target attention of e_v over the behaviour
sequence h with the padding masked out.

The score network has no BatchNorm on purpose: with batch statistics every
pair's score would depend on the other pairs of the batch, so the FGSM
gradient of eq. 6 would not be the gradient of s_u(e_v) alone, and training
and serving would score the same pair differently.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

ARCHS = ("din", "dnn", "two_sided")
PAD = -1


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape of the model; everything needed to rebuild it before loading weights."""

    num_items: int
    num_categories: int
    arch: str = "din"
    embedding_dim: int = 32
    item_layers: tuple[int, ...] = (64, 64, 64)
    score_layers: tuple[int, ...] = (128, 64, 32)

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        if self.num_items < 1 or self.num_categories < 1:
            raise ValueError("num_items and num_categories must be >= 1")

    @property
    def item_dim(self) -> int:
        """Dimension of e_v (the vectors the HNSW graph is built on)."""
        return self.item_layers[-1]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        raw = json.loads(text)
        raw["item_layers"] = tuple(raw["item_layers"])
        raw["score_layers"] = tuple(raw["score_layers"])
        return cls(**raw)


class MLP(keras.layers.Layer):
    """Dense -> [BatchNorm] -> PReLU blocks, optionally ending in a linear Dense layer.

    Sublayers are attributes (not a Python list) so that tf.train.Checkpoint
    tracks them: training resumes from tf.train checkpoints.
    """

    def __init__(self, units: tuple[int, ...], batch_norm: bool, out_units: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True  # the mask goes to BatchNorm statistics only
        self._order = []
        for i, n in enumerate(units):
            self._add(f"dense{i}", keras.layers.Dense(n, name=f"dense{i}"))
            if batch_norm:
                self._add(f"bn{i}", keras.layers.BatchNormalization(name=f"bn{i}"))
            self._add(f"prelu{i}", keras.layers.PReLU(name=f"prelu{i}"))
        if out_units is not None:
            self._add("out", keras.layers.Dense(out_units, name="out"))

    def _add(self, name: str, layer: keras.layers.Layer) -> None:
        setattr(self, name, layer)
        self._order.append(name)

    def call(self, x, training=False, mask=None):
        for name in self._order:
            layer = getattr(self, name)
            if isinstance(layer, keras.layers.BatchNormalization):
                x = layer(x, training=training, mask=mask)
            else:
                x = layer(x)
        return x


def _rows(table: keras.layers.Embedding, ids):
    """Rows ``ids`` of an embedding table, read from the variable itself (a sparse read).

    Keras' Embedding first converts the whole table to a tensor; while the step holds
    that tensor, the optimizer's in-place update of the variable must copy the table,
    which at a million items costs more than the rest of a training step.
    """
    return tf.gather(table.embeddings.value, ids)


class NannModel(keras.Model):
    """Item network + factored scorer. Build with :func:`build_model`."""

    def __init__(self, config: ModelConfig, item_category: np.ndarray, **kwargs):
        super().__init__(name=f"nann_{config.arch}", **kwargs)
        self.config = config
        item_category = np.asarray(item_category, dtype=np.int32)
        if item_category.shape != (config.num_items,):
            raise ValueError(
                f"item_category must have shape ({config.num_items},), got {item_category.shape}"
            )
        if item_category.size and (item_category.min() < 0 or item_category.max() >= config.num_categories):
            raise ValueError("item_category holds a category outside 0..num_categories-1")
        d = config.embedding_dim
        # The item -> category table is part of the model, so callers pass item ids only.
        self.item_category = tf.constant(item_category)
        self.item_table = keras.layers.Embedding(config.num_items, d, name="item_id_embedding")
        self.category_table = keras.layers.Embedding(config.num_categories, d, name="category_embedding")
        self.item_table.build()
        self.category_table.build()
        self.item_net = MLP(config.item_layers, batch_norm=True, name="item_net")
        dv = config.item_dim
        if config.arch == "two_sided":
            self.user_net = MLP(config.score_layers[:1], batch_norm=False, out_units=dv, name="user_net")
        else:
            h1, rest = config.score_layers[0], config.score_layers[1:]
            # First score layer split by input block: the pooled-user block is computed once
            # per user, the others per candidate.
            self.w_user = keras.layers.Dense(h1, name="score_in_user")
            self.w_item = self.add_weight(shape=(dv, h1), initializer="glorot_uniform", name="score_in_item")
            self.w_user_x_item = self.add_weight(
                shape=(dv, h1), initializer="glorot_uniform", name="score_in_user_x_item"
            )
            if config.arch == "din":
                self.w_key = keras.layers.Dense(dv, use_bias=False, name="attention_key")
                # Input [att, att * e_v]: both vary per candidate, so one matmul serves them.
                self.w_att = keras.layers.Dense(h1, use_bias=False, name="score_in_attention")
            self.score_act = keras.layers.PReLU(name="score_prelu0")
            self.score_net = MLP(rest, batch_norm=False, out_units=1, name="score_net")

    # -- item side ---------------------------------------------------------------
    def item_embeddings(self, item_ids, training: bool = False, mask=None):
        """e_v for item ids of any shape.

        Args:
          item_ids: int ids; entries where ``mask`` is False (padding) may hold any value.
          training: BatchNorm mode.
          mask: optional bool tensor of the ids' shape; padded entries are
            looked up as item 0, kept out of BatchNorm statistics and zeroed.
        """
        ids = tf.convert_to_tensor(item_ids, dtype=tf.int32)
        flat = tf.reshape(ids, [-1])
        flat_mask = None
        if mask is not None:
            flat_mask = tf.reshape(mask, [-1])
            flat = tf.where(flat_mask, flat, 0)
        cats = tf.gather(self.item_category, flat)
        x = tf.concat([_rows(self.item_table, flat), _rows(self.category_table, cats)], axis=-1)
        e = self.item_net(x, training=training, mask=flat_mask)
        if flat_mask is not None:
            e = e * tf.cast(flat_mask, e.dtype)[:, None]
        return tf.reshape(e, tf.concat([tf.shape(ids), [self.config.item_dim]], axis=0))

    def behaviour_embeddings(self, history, training: bool = False):
        """e_v of a padded behaviour matrix [B, L] -> ([B, L, D] zero at padding, mask [B, L])."""
        history = tf.convert_to_tensor(history, dtype=tf.int32)
        mask = history != PAD
        return self.item_embeddings(history, training=training, mask=mask), mask

    # -- user side ---------------------------------------------------------------
    def user_state(self, hist_e, mask) -> dict:
        """Per-user part of the scorer, computed once per user.

        Args:
          hist_e: [B, L, D] behaviour e_v (any values at padded positions).
          mask: [B, L] bool, True for real behaviours.
        Returns:
          A dict of tensors that :meth:`score` takes.
        """
        m = tf.cast(mask, hist_e.dtype)[..., None]
        hist_e = hist_e * m
        pooled = tf.reduce_sum(hist_e, axis=1)
        if self.config.arch == "two_sided":
            return {"user_vector": self.user_net(pooled)}
        # w_item(e) + w_user_x_item(pooled * e) == e @ (W_item + diag(pooled) W_user_x_item):
        # one [D, H] matrix per user replaces two per-candidate matmuls.
        item_matrix = self.w_item[None] + pooled[:, :, None] * self.w_user_x_item[None]
        state = {"user_bias": self.w_user(pooled), "item_matrix": item_matrix}
        if self.config.arch == "din":
            state["keys"] = self.w_key(hist_e) / math.sqrt(self.config.item_dim)
            state["values"] = hist_e
            state["mask"] = tf.convert_to_tensor(mask)
        return state

    def attention(self, state: dict, cand_e):
        """Target attention of candidates [B, N, D] over the behaviours -> [B, N, D]."""
        logits = tf.einsum("bnd,bld->bnl", cand_e, state["keys"])
        mask = state["mask"][:, None, :]
        logits = tf.where(mask, logits, tf.fill(tf.shape(logits), tf.constant(-1e9, logits.dtype)))
        # Zeroing after the softmax makes an all-padding row attend to nothing.
        weights = tf.nn.softmax(logits, axis=-1) * tf.cast(mask, logits.dtype)
        return tf.einsum("bnl,bld->bnd", weights, state["values"])

    def score(self, state: dict, cand_e):
        """s_u(e_v) for candidates [B, N, D] -> scores [B, N]."""
        if self.config.arch == "two_sided":
            return tf.einsum("bd,bnd->bn", state["user_vector"], cand_e)
        h = state["user_bias"][:, None, :] + tf.einsum("bnd,bdh->bnh", cand_e, state["item_matrix"])
        if self.config.arch == "din":
            att = self.attention(state, cand_e)
            h = h + self.w_att(tf.concat([att, att * cand_e], axis=-1))
        h = self.score_net(self.score_act(h))
        return tf.squeeze(h, axis=-1)

    def score_items(self, history, item_ids):
        """Convenience for tests and tools: scores [B, N] of item ids [B, N] for histories [B, L]."""
        hist_e, mask = self.behaviour_embeddings(history)
        return self.score(self.user_state(hist_e, mask), self.item_embeddings(item_ids))

    def call(self, inputs, training=False):
        history, items = inputs
        return self.score_items(history, items)


def build_model(config: ModelConfig, item_category: np.ndarray) -> NannModel:
    """Creates the model and its weights (one dummy forward pass)."""
    model = NannModel(config, item_category)
    model((tf.constant([[0, PAD]], tf.int32), tf.constant([[0]], tf.int32)))
    return model


WEIGHTS_FILE = "model.weights.h5"
CONFIG_FILE = "config.json"
CATEGORY_FILE = "item_category.npy"


def save_model_files(model: NannModel, directory: str | Path) -> None:
    """Writes weights, config and the item->category table into ``directory``."""
    directory = Path(directory)
    model.save_weights(directory / WEIGHTS_FILE)
    (directory / CONFIG_FILE).write_text(model.config.to_json() + "\n")
    np.save(directory / CATEGORY_FILE, model.item_category.numpy())


def load_model_files(directory: str | Path) -> NannModel:
    """Rebuilds a model saved by :func:`save_model_files` (checksums are checked by the caller)."""
    directory = Path(directory)
    config = ModelConfig.from_json((directory / CONFIG_FILE).read_text())
    model = build_model(config, np.load(directory / CATEGORY_FILE))
    model.load_weights(directory / WEIGHTS_FILE)
    return model
