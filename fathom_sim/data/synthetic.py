"""Generated federated data: Synthetic(alpha, beta) and a FEMNIST-shaped task.

Both are deterministic functions of (seed, client index), so client i's data does not depend on
how many clients are generated.
"""

from __future__ import annotations

import numpy as np

from fathom_sim.data.federated import ArrayClientDataset, GeneratedClientDataset, Task


def _client_rng(seed: int, client: int, stream: int) -> np.random.Generator:
  return np.random.default_rng([seed, client, stream])


def _split(n_total: int, test_fraction: float) -> int:
  """Train examples of a client with n_total examples (at least one of each when n_total > 1)."""
  n_test = int(np.floor(n_total * test_fraction))
  if test_fraction > 0 and n_total > 1:
    n_test = min(max(n_test, 1), n_total - 1)
  return n_total - n_test


SYNTHETIC_DIM = 60  # Synthetic(alpha, beta)'s features: an example is 60 float32 and a label


def synthetic_alpha_beta(*, num_clients: int = 1000, alpha: float = 1.0, beta: float = 1.0,
                         dim: int = SYNTHETIC_DIM, num_classes: int = 10, size_log_mean: float = 4.0,
                         size_log_sigma: float = 1.0, min_examples: int = 10,
                         max_examples: int = 2000, test_fraction: float = 0.2,
                         seed: int = 0) -> Task:
  """The Synthetic(alpha, beta) benchmark of the FedProx paper (Li et al., 2020), also in LEAF.

  Client k draws u_k ~ N(0, alpha) and b_k ~ N(0, beta); its own softmax-regression model
  W_k ~ N(u_k, 1) [dim x classes], c_k ~ N(u_k, 1); feature means v_k with entries ~ N(b_k, 1);
  inputs x ~ N(v_k, Sigma) with Sigma = diag(j^-1.2); labels y = argmax(x W_k + c_k). alpha
  controls how much the clients' models differ, beta how much their inputs do. Client sizes
  follow a power law: min_examples + lognormal(size_log_mean, size_log_sigma), capped.
  Each client's examples are split into train and test (test_fraction of them).
  """
  std = np.arange(1, dim + 1, dtype=np.float64) ** -0.6  # sqrt of Sigma's diagonal
  train, test = [], []
  for k in range(num_clients):
    r = _client_rng(seed, k, 0)
    n = int(min(max_examples, min_examples + np.floor(r.lognormal(size_log_mean,
                                                                   size_log_sigma))))
    u = r.normal(0.0, np.sqrt(alpha))
    b = r.normal(0.0, np.sqrt(beta))
    weights = r.normal(u, 1.0, (dim, num_classes))
    bias = r.normal(u, 1.0, num_classes)
    mean = r.normal(b, 1.0, dim)
    x = mean + std * r.standard_normal((n, dim))
    logits = x @ weights + bias
    if not (np.isfinite(logits).all() and (np.abs(x) <= np.finfo(np.float32).max).all()):
      # (else inf inputs, taken: nearly every round rejected, exit 0 and a NaN test loss)
      from fathom_sim.config import ConfigError
      raise ConfigError(f'config.data.alpha={alpha:g}, config.data.beta={beta:g}: client {k}\'s '
                        'generated inputs or labels overflow (float32 holds up to 3.4e+38); '
                        'lower them (the FedProx paper uses 0 to 1)')
    y = np.argmax(logits, axis=1)
    n_train = _split(n, test_fraction)
    train.append({'x': x[:n_train].astype(np.float32), 'y': y[:n_train].astype(np.int32)})
    test.append({'x': x[n_train:].astype(np.float32), 'y': y[n_train:].astype(np.int32)})
  ids = [f'synthetic_{k:05d}' for k in range(num_clients)]
  return Task(f'synthetic({alpha:g},{beta:g})', ArrayClientDataset.from_clients(ids, train),
              ArrayClientDataset.from_clients(ids, test), num_classes)


def _generated_split(ids: np.ndarray, sizes: np.ndarray, n_train: np.ndarray,
                     make) -> tuple[GeneratedClientDataset, GeneratedClientDataset]:
  """Train and test views of generated clients: client k's first n_train[k] examples train."""

  def rows(lo, hi):
    def client(k: int) -> dict:
      return {name: a[lo(k):hi(k)] for name, a in make(k).items()}
    return client

  train = GeneratedClientDataset(ids, n_train, rows(lambda k: 0, lambda k: n_train[k]))
  test = GeneratedClientDataset(ids, sizes - n_train,
                                rows(lambda k: n_train[k], lambda k: sizes[k]))
  return train, test


# FEMNIST facts (LEAF / TFF): 3,400 writers, ~671.6k train and ~77.5k test examples, so about
# 198 train examples a writer with a spread of roughly +-40%; digits are far more frequent than
# each letter.
FEMNIST_CLIENTS = 3400
FEMNIST_CLASSES = 62
_FEMNIST_LOG_MEAN = np.log(220.0) - 0.39 ** 2 / 2  # lognormal with mean ~220, cv ~0.4
_FEMNIST_LOG_SIGMA = 0.39


def _prototypes(seed: int, num_classes: int) -> np.ndarray:
  """Smooth random 28x28 'glyphs' in [0, 1], one per class."""
  r = np.random.default_rng([seed, 0x6C7])
  coarse = r.random((num_classes, 7, 7)) ** 3
  fine = np.kron(coarse, np.ones((4, 4)))
  blur = (fine + np.roll(fine, 1, 1) + np.roll(fine, -1, 1) + np.roll(fine, 1, 2)
          + np.roll(fine, -1, 2)) / 5.0
  return (blur / blur.max(axis=(1, 2), keepdims=True)).astype(np.float32)


# The 15 letters whose capital and small forms EMNIST's 'balanced' split merges because
# handwriting does not tell them apart (Cohen et al., 2017).
CASE_MERGED_LETTERS = 'cijklmopsuvwxyz'


def _glyph_of_class(shared_glyphs: bool) -> np.ndarray:
  """The prototype each of FEMNIST's classes draws (0-9 digits, 10-35 'A'-'Z', 36-61 'a'-'z'):
  its own, or with shared_glyphs the capital's for the small forms of CASE_MERGED_LETTERS."""
  glyph = np.arange(FEMNIST_CLASSES)
  if shared_glyphs:
    for letter in CASE_MERGED_LETTERS:
      glyph[36 + ord(letter) - ord('a')] = 10 + ord(letter) - ord('a')
  return glyph


def femnist_like(*, num_clients: int = FEMNIST_CLIENTS, test_fraction: float = 0.1,
                 seed: int = 0, shared_glyphs: bool = False) -> Task:
  """A FEMNIST-shaped task for throughput work: 28x28 grey images (1.0 background), 62 classes,
  3,400 writers with FEMNIST-like size skew and label skew. Examples are made on demand.

  shared_glyphs: the two cases of each of CASE_MERGED_LETTERS are drawn from one glyph, so that
  for a third of the examples (those 30 classes) the image tells the letter but not its case,
  as in FEMNIST, whose CNNs stop near 0.85 accuracy. Without it every class has a glyph of its
  own, a model reaches a training loss near 0 and SGD at the paper's eta 0.1 can diverge there
  (docs/benchmarks.md, "Fifteenth session"). Either way the labels, and the images of the
  classes outside those 15 pairs' small forms, are the same.
  """
  protos = _prototypes(seed, FEMNIST_CLASSES)[_glyph_of_class(shared_glyphs)]
  class_p = np.r_[np.full(10, 4.0), np.ones(52)]
  class_p /= class_p.sum()
  sizes = np.array([
      int(np.clip(np.rint(_client_rng(seed, k, 1).lognormal(_FEMNIST_LOG_MEAN,
                                                            _FEMNIST_LOG_SIGMA)), 2, 1000))
      for k in range(num_clients)])
  n_train = np.array([_split(n, test_fraction) for n in sizes])

  def make(k: int) -> dict:
    r = _client_rng(seed, k, 2)
    n = int(sizes[k])
    p = r.dirichlet(50.0 * class_p)  # each writer's own label mix
    y = r.choice(FEMNIST_CLASSES, n, p=p).astype(np.int32)
    ink = protos[y] * r.uniform(0.6, 1.0)
    ink = np.roll(ink, tuple(r.integers(-2, 3, 2)), axis=(1, 2))
    ink += 0.15 * r.standard_normal(ink.shape).astype(np.float32)
    return {'x': (1.0 - np.clip(ink, 0.0, 1.0)).astype(np.float32), 'y': y}

  ids = np.array([f'f{k:04d}_synthetic' for k in range(num_clients)])
  return Task('femnist_synthetic', *_generated_split(ids, sizes, n_train, make),
              FEMNIST_CLASSES)


# Stack Overflow facts: ~342k users, 135.8M train sentences (heavy-tailed per user), sentences
# cut to 20 tokens, 10,000 words + pad/bos/eos/oov = 10,004 ids.
SO_IDS = 10_004
SO_LENGTH = 20
_PAD, _BOS, _EOS = 0, 1, 2


def stackoverflow_like(*, num_clients: int = 1000, test_fraction: float = 0.1,
                       seed: int = 0) -> Task:
  """A Stack-Overflow-shaped next-word task for throughput work: random Zipf-distributed
  sentences of 4-19 words, x = [bos] + ids, y = ids + [eos], padded to 20; heavy-tailed
  sentences per user. Examples are made on demand."""
  sizes = np.array([int(np.clip(_client_rng(seed, k, 3).lognormal(np.log(60.0), 1.0), 2, 2000))
                    for k in range(num_clients)])
  n_train = np.array([_split(n, test_fraction) for n in sizes])
  words = np.arange(1, SO_IDS - 3, dtype=np.float64)
  word_p = 1.0 / words
  word_p /= word_p.sum()

  def make(k: int) -> dict:
    r = _client_rng(seed, k, 4)
    n = int(sizes[k])
    lengths = r.integers(4, SO_LENGTH, n)
    ids = r.choice(SO_IDS - 4, (n, SO_LENGTH), p=word_p) + 3  # word ids 3 .. 10,002
    ids[np.arange(SO_LENGTH)[None, :] >= lengths[:, None]] = _PAD
    x = np.concatenate([np.full((n, 1), _BOS), ids[:, :-1]], axis=1)
    y = ids.copy()
    y[np.arange(n), np.minimum(lengths, SO_LENGTH - 1)] = _EOS
    return {'x': x.astype(np.int32), 'y': y.astype(np.int32)}

  ids = np.array([f'so_{k:06d}_synthetic' for k in range(num_clients)])
  return Task('stackoverflow_synthetic', *_generated_split(ids, sizes, n_train, make), SO_IDS)
