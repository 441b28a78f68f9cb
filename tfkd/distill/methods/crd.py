"""``crd``: contrastive representation distillation (Tian et al., ICLR 2020), as RepDistiller and
mdistiller compute it: ``CE + 0.8 * (NCE(student -> teacher bank) + NCE(teacher -> student bank))``.

The pooled last-stage features of student and teacher are embedded (linear to 128, L2-normalized).
Two memory banks hold one embedding per training image (student's, teacher's), updated with
momentum 0.5 and renormalized after every step. Each example is contrasted with its own entry
(the positive) and 16,384 distinct entries of images of other classes (``exact`` mode; drawn
without replacement, as the authors do whenever a class has that many others: each example's set
is uniformly random, as theirs, though the examples of a batch read one shuffle of the bank at
independent offsets where the authors draw each set on its own): scores
``exp(v . m / 0.07) / Z`` with Z set from the first batch (mean score times the bank size), in
the NCE loss with the uniform noise distribution 1/N.

Scores are computed as one product of the bank with the batch's embeddings (N x B, then the
sampled entries picked), which equals the papers' gather-then-multiply without holding
B x K x 128 floats. Across replicas (MirroredStrategy) the banks stay identical: negatives are
drawn for the global batch from a seed of the step and each replica takes its rows; the bank
update gathers every replica's indices and embeddings and every replica applies the same update;
Z is set from the mean over replicas. The banks and Z are non-trainable weights, saved with the
backups, so a resumed run continues with them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from tfkd.distill.terms import Term
from tfkd.options import non_negative, option, positive

NAME = "crd"
SUMMARY = "CE + 0.8 * contrastive loss with memory banks of 16,384 negatives (exact mode), T 0.07"


@dataclass
class Options:
    """``distill.crd.*``"""

    weight: float = option(0.8, "weight of the contrastive term", **non_negative())
    ce_weight: float = option(1.0, "cross-entropy weight", **non_negative())
    dim: int = option(128, "embedding size", lambda v: v >= 1, ">= 1")
    negatives: int = option(16384, "negatives per example, K", lambda v: v >= 1, ">= 1")
    temperature: float = option(0.07, "NCE temperature", **positive())
    momentum: float = option(0.5, "memory-bank momentum", lambda v: 0 <= v < 1, "in [0, 1)")
    replacement: bool = option(False, "draw each example's negatives with replacement (cheaper; the "
                                      "authors draw without whenever K is at most the other classes' "
                                      "images, and with replacement otherwise, as here)")


def nce_loss(scores: Any, num_data: int, eps: float = 1e-7) -> Any:
    """RepDistiller's ContrastLoss on normalized scores (B, 1 + K): positive first."""
    from keras import ops

    m = float(scores.shape[1] - 1)
    noise = m / float(num_data)
    positive_ = ops.log(scores[:, 0] / (scores[:, 0] + noise + eps))
    negative_ = ops.log(noise / (scores[:, 1:] + noise + eps))
    return -(ops.sum(positive_) + ops.sum(negative_)) / ops.cast(ops.shape(scores)[0], scores.dtype)


def other_class_sampler(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training indices sorted by class, each class's start in that order, and its count."""
    order = np.argsort(labels, kind="stable").astype(np.int32)
    counts = np.bincount(labels).astype(np.int32)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int32)
    return order, starts, counts


def _replica() -> tuple[Any, int, Any]:
    import tensorflow as tf

    ctx = tf.distribute.get_replica_context()
    replicas = ctx.num_replicas_in_sync if ctx is not None else 1
    return ctx, replicas, (ctx.replica_id_in_sync_group if ctx is not None else 0)


class ContrastMemory:
    """Builds the Keras layer that holds the two banks and the two normalization constants."""

    @staticmethod
    def layer(size: int, dim: int, name: str = "crd_memory") -> Any:
        """A layer with ``memory_s``, ``memory_t`` (size x dim) and ``z`` (2,), non-trainable,
        updated by the first replica's value (all replicas compute the same one)."""
        import keras

        class Memory(keras.layers.Layer):
            def build(self, input_shape: Any = None) -> None:
                bound = 1.0 / np.sqrt(dim / 3.0)
                init = keras.initializers.RandomUniform(-bound, bound)
                kwargs = {"trainable": False, "aggregation": "only_first_replica"}
                self.memory_s = self.add_weight(shape=(size, dim), initializer=init, name="memory_s", **kwargs)
                self.memory_t = self.add_weight(shape=(size, dim), initializer=init, name="memory_t", **kwargs)
                self.z = self.add_weight(shape=(2,), initializer=keras.initializers.Constant(-1.0), name="z", **kwargs)
                self.built = True

        memory = Memory(name=name)
        memory.build()
        return memory


class Contrastive(Term):
    """The CRD term: embeddings, memory banks, negatives from other classes."""

    name = slot = "crd"
    needs_index = True

    def __init__(self, weight: float, dim: int, negatives: int, temperature: float, momentum: float,
                 teacher: str = "teacher", replacement: bool = False) -> None:
        super().__init__(weight, teacher)
        self.dim, self.negatives = int(dim), int(negatives)
        self.temperature, self.momentum = float(temperature), float(momentum)
        self.replacement = bool(replacement)

    def set_labels(self, labels: np.ndarray) -> None:
        """The training labels the negatives are drawn by (a bank entry per image)."""
        labels = np.asarray(labels).astype(np.int64)
        self.num_data = int(len(labels))
        self.train_labels = labels.astype(np.int32)
        self.order, self.starts, self.counts = other_class_sampler(labels)
        # without replacement only when every class has K other-class images (the authors' rule)
        self.distinct = not self.replacement and self.negatives <= self.num_data - int(self.counts.max())

    def build(self, ctx: Any) -> None:
        import keras

        from tfkd.errors import ModelError

        labels = ctx.labels()
        if labels is None or not len(labels):
            raise ModelError("crd needs the training labels (a memory entry per training image)")
        self.set_labels(labels)
        self.embed_s = keras.Sequential([keras.layers.Dense(self.dim)], name="crd_embed_s")
        self.embed_t = keras.Sequential([keras.layers.Dense(self.dim)], name="crd_embed_t")
        self.embed_s.build((None, ctx.shapes(ctx.student)[-1][-1]))
        self.embed_t.build((None, ctx.shapes(ctx.teacher(self.teacher))[-1][-1]))
        self.memory = ContrastMemory.layer(self.num_data, self.dim)
        self.layers = [self.embed_s, self.embed_t, self.memory]

    def sample(self, labels: Any, index: Any, step: Any) -> Any:
        """(B, 1 + K) bank indices: the example itself, then K images of other classes, drawn
        for the global batch from a seed of ``step`` (this replica's rows)."""
        import tensorflow as tf

        _, replicas, replica_id = _replica()
        local = tf.shape(labels)[0]
        seed = tf.stack([tf.cast(step, tf.int32), tf.constant(20200101, tf.int32)])
        labels = tf.cast(labels, tf.int32)
        if self.distinct:
            return tf.concat([tf.cast(index, tf.int32)[:, None], self._distinct(labels, seed, local, replicas,
                                                                                replica_id)], axis=1)
        draws = tf.random.stateless_uniform([local * replicas, self.negatives], seed=seed, dtype=tf.float32)
        draws = draws[replica_id * local:(replica_id + 1) * local]
        start = tf.gather(tf.constant(self.starts), labels)[:, None]
        count = tf.gather(tf.constant(self.counts), labels)[:, None]
        position = tf.cast(tf.floor(draws * tf.cast(self.num_data - count, tf.float32)), tf.int32)
        position = tf.minimum(position, self.num_data - count - 1)
        position = position + tf.cast(position >= start, tf.int32) * count  # skip the own class
        negatives = tf.gather(tf.constant(self.order), position)
        return tf.concat([tf.cast(index, tf.int32)[:, None], negatives], axis=1)

    def _distinct(self, labels: Any, seed: Any, local: Any, replicas: int, replica_id: Any) -> Any:
        """(B, K) distinct images of other classes per example, a uniformly random set of them
        (the authors' draw without replacement): the bank shuffled once per step, each example
        reading it from a random offset (cyclic) and keeping the first K images of other classes
        in a window long enough to hold them (K + the largest class). One shuffle and a search
        per step, where K of N random keys per example cost a top-K each; the examples of a
        batch share the shuffle (their windows are independent offsets into it)."""
        import tensorflow as tf

        n, k = self.num_data, self.negatives
        window = min(n, k + int(self.counts.max()))
        order = tf.random.experimental.stateless_shuffle(tf.range(n, dtype=tf.int32), seed=seed)
        offsets = tf.random.stateless_uniform([local * replicas], seed=seed + 1, maxval=n, dtype=tf.int32)
        offsets = offsets[replica_id * local:(replica_id + 1) * local]
        positions = (offsets[:, None] + tf.range(window, dtype=tf.int32)[None, :]) % n
        candidates = tf.gather(order, positions)  # (B, window)
        other = tf.not_equal(tf.gather(tf.constant(self.train_labels), candidates), labels[:, None])
        kept = tf.cumsum(tf.cast(other, tf.int32), axis=1)  # how many others up to each place
        wanted = tf.tile(tf.range(1, k + 1, dtype=tf.int32)[None, :], [tf.shape(labels)[0], 1])
        first = tf.searchsorted(kept, wanted, side="left")  # the place of the j-th other-class image
        return tf.gather(candidates, first, batch_dims=1)

    def compute(self, batch: Any) -> Any:
        import tensorflow as tf

        if batch.index is None:
            from tfkd.errors import ModelError

            raise ModelError("crd needs the examples' dataset indices (train with the index)")
        pooled_s = tf.reduce_mean(batch.student["features"][-1], axis=[1, 2])
        pooled_t = tf.reduce_mean(batch.teachers[self.teacher]["features"][-1], axis=[1, 2])
        v_s = tf.math.l2_normalize(self.embed_s(pooled_s, training=batch.training), axis=1, epsilon=1e-24)
        v_t = tf.math.l2_normalize(self.embed_t(pooled_t, training=batch.training), axis=1, epsilon=1e-24)
        idx = self.sample(batch.labels, batch.index, batch.step)
        memory = self.memory
        mem_s, mem_t = tf.stop_gradient(memory.memory_s.value), tf.stop_gradient(memory.memory_t.value)
        # student embedding against the teacher bank, teacher embedding against the student bank
        out_s = tf.exp(tf.gather(tf.matmul(v_s, mem_t, transpose_b=True), idx, batch_dims=1) / self.temperature)
        out_t = tf.exp(tf.gather(tf.matmul(v_t, mem_s, transpose_b=True), idx, batch_dims=1) / self.temperature)
        if not batch.training:
            return nce_loss(out_s, self.num_data) + nce_loss(out_t, self.num_data)
        ctx, replicas, _ = _replica()
        means = tf.stack([tf.reduce_mean(out_s), tf.reduce_mean(out_t)])
        if replicas > 1:
            means = ctx.all_reduce(tf.distribute.ReduceOp.MEAN, means)
        z = tf.where(memory.z.value < 0, tf.stop_gradient(means) * float(self.num_data), memory.z.value)
        memory.z.assign(z)
        loss = nce_loss(out_s / z[0], self.num_data) + nce_loss(out_t / z[1], self.num_data)
        with tf.control_dependencies([loss]):
            self.update(batch.index, tf.stop_gradient(v_s), tf.stop_gradient(v_t))
        return loss

    def update(self, index: Any, v_s: Any, v_t: Any) -> None:
        """Momentum update of both banks at the batch's entries (every replica's, on every one)."""
        import tensorflow as tf

        ctx, replicas, _ = _replica()
        index = tf.cast(index, tf.int32)
        if replicas > 1:
            index, v_s, v_t = (ctx.all_gather(x, axis=0) for x in (index, v_s, v_t))
        for variable, v in ((self.memory.memory_s, v_s), (self.memory.memory_t, v_t)):
            mixed = tf.gather(variable.value, index) * self.momentum + v * (1.0 - self.momentum)
            mixed = mixed / tf.norm(mixed, axis=1, keepdims=True)
            variable.value.scatter_update(tf.IndexedSlices(mixed, index))

    def config(self) -> dict[str, Any]:
        return {**super().config(), "dim": self.dim, "negatives": self.negatives,
                "temperature": self.temperature, "momentum": self.momentum, "replacement": self.replacement}


def terms(options: Options, run: Any) -> list[Any]:
    """CE and the contrastive term."""
    from tfkd.distill.terms import CrossEntropy

    return [CrossEntropy(options.ce_weight), Contrastive(options.weight, options.dim, options.negatives,
                                                         options.temperature, options.momentum,
                                                         replacement=options.replacement)]
