"""Models by name (flax linen), exposed to the engine as pure functions of a params pytree."""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fathom_sim import conv_kernels, lstm
from fathom_sim.rng import INIT_LEAVES
from fathom_sim.types import Batch, Params

MODELS = ('logistic', 'mlp', 'emnist_cnn', 'stackoverflow_lstm', 'lstm')
SEQUENCE_MODELS = ('stackoverflow_lstm', 'lstm')  # next-token prediction (sequence_model)
# What each model reads per example, for the error when a dataset's examples do not fit it.
TAKES = {'logistic': 'x of any shape (flattened), y an integer label',
         'mlp': 'x of any shape (flattened), y an integer label',
         'emnist_cnn': 'x an image [H, W] or [H, W, 1] ([28, 28] in EMNIST), y an integer '
                       'label',
         'stackoverflow_lstm': 'x and y [L] integer token ids',
         'lstm': 'x and y [L] integer token ids'}
STACKOVERFLOW_LSTM = (96, 670, 96)  # embedding, LSTM, dense widths of the paper's model
PAD, BOS, EOS = 0, 1, 2  # token ids of fathom_sim.data.vocab (the last id: out of vocabulary)
LSTM_CELL = 'OptimizedLSTMCell_0'  # the LSTM's parameters' key: flax's name, kept in checkpoints


class Model(NamedTuple):
  """A model as pure functions.

  init(rng, batch) -> params; loss(params, batch, mask, rng) -> mean training loss over the
  masked-in examples (dropout on); eval_sums(params, batch, mask) -> sums of `loss`, `correct`
  and `count` over the masked-in examples (dropout off).
  """
  name: str
  init: Callable[[jax.Array, Batch], Params]
  loss: Callable[[Params, Batch, jax.Array, jax.Array], jax.Array]
  eval_sums: Callable[[Params, Batch, jax.Array], dict]


COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def _add_bias(y: jax.Array, bias: jax.Array, dtype) -> jax.Array:
  """y + bias, added in float32 and returned in `dtype`. Why: a bias's gradient sums over every
  example and position (13,520 terms for the CNN's first convolution at B 20), which a bfloat16
  sum would round at every term (15.9 % off float32's on XLA:CPU, against 6.8 % this way)."""
  return (y.astype(jnp.float32) + bias).astype(dtype)


class Dense(nn.Module):
  """nn.Dense's parameters (kernel, bias) and function, multiplying in `dtype` and adding the
  bias in float32 (_add_bias); the parameters stay float32."""
  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (x.shape[-1], self.features))
    bias = self.param('bias', nn.initializers.zeros_init(), (self.features,))
    return _add_bias(x.astype(self.dtype) @ kernel.astype(self.dtype), bias, self.dtype)


class MLP(nn.Module):
  hidden: Sequence[int]
  num_classes: int
  dtype: jnp.dtype = jnp.float32  # of the computation; parameters are float32 regardless

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape((x.shape[0], -1)).astype(self.dtype)
    for width in self.hidden:
      x = nn.relu(Dense(width, self.dtype)(x))
    return Dense(self.num_classes, self.dtype)(x)


CONV_IMPLS = ('xla', 'matmul')


def _conv_xla(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """XLA's own 3x3 'VALID' convolution (nn.Conv's), NHWC x HWIO."""
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), 'VALID',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _conv_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """The same convolution as one matrix product over the 9 shifted views of x (im2col)."""
  cin, cout = kernel.shape[-2:]
  h, w = x.shape[-3] - 2, x.shape[-2] - 2
  # Patch features in (row, column, channel) order: the order of kernel.reshape(9 cin, out).
  patches = jnp.concatenate([x[..., i:i + h, j:j + w, :] for i in range(3) for j in range(3)],
                            axis=-1)
  return patches @ kernel.reshape(9 * cin, cout)


# A mixed form 'F/X/W' computes the forward pass with CONV_IMPLS' F, the input's gradient with
# X and the kernel's gradient with W (each the transpose of that form's linear map). Why: under
# vmap the two forms cost differently per pass (a grouped convolution against a copy 9x the
# input), so the fastest step may take each pass from a different form.
CONV_FORMS = CONV_IMPLS + tuple(f'{f}/{x}/{w}' for f in CONV_IMPLS for x in CONV_IMPLS
                                for w in CONV_IMPLS) + ('pallas',)


def _conv_pallas(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """conv_kernels.conv3x3 (Pallas kernels reading the input in place) where its channel counts
  allow, else 'matmul' (the CNN's first convolution, 1 -> 32 channels, whose im2col copy is
  small). Not a part of mixed forms: its passes are kernels, not a linear map to transpose."""
  if not conv_kernels.supported(*kernel.shape[-2:]):
    return _conv_matmul(x, kernel)
  lead = x.shape[:-3]
  y = conv_kernels.conv3x3(x.reshape((-1,) + x.shape[-3:]), kernel)
  return y.reshape(lead + y.shape[1:])


# The whole forms by name; mixed forms take their passes from CONV_IMPLS' among them.
_CONVS = {'xla': _conv_xla, 'matmul': _conv_matmul, 'pallas': _conv_pallas}


@functools.lru_cache(maxsize=None)
def _mixed_conv(forward: str, input_grad: str, kernel_grad: str) -> Callable:
  """The mixed form's function: a custom_vjp, so reverse mode only (jax.jvp, jacfwd and
  hessian refuse it; training needs none of them)."""
  @jax.custom_vjp
  def conv(x, kernel):
    return _CONVS[forward](x, kernel)

  def conv_fwd(x, kernel):
    return conv(x, kernel), (x, kernel)

  def conv_bwd(residuals, dy):
    x, kernel = residuals
    dx, = jax.linear_transpose(lambda x: _CONVS[input_grad](x, kernel), x)(dy)
    dkernel, = jax.linear_transpose(lambda k: _CONVS[kernel_grad](x, k), kernel)(dy)
    return dx, dkernel

  conv.defvjp(conv_fwd, conv_bwd)
  return conv


def conv3x3(x: jax.Array, kernel: jax.Array, form: str) -> jax.Array:
  """A 3x3 'VALID' convolution of x [..., H, W, Cin] with kernel [3, 3, Cin, Cout] computed in
  `form` (CONV_FORMS); every form is the same function up to float rounding."""
  if form in _CONVS:
    return _CONVS[form](x, kernel)
  return _mixed_conv(*form.split('/'))(x, kernel)


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """nn.max_pool(x, (2, 2), strides=(2, 2)) of x [..., H, W, C] ('VALID': an odd last row or
  column is dropped), as a max over a reshape.

  Why: nn.max_pool's gradient is XLA's select-and-scatter, which XLA:GPU runs as a reduce-window
  that writes each window's argmax as five int32 arrays, a zero-filled buffer and a scatter
  into it: 11 % of the bytes a 50-lane local step of the CNN moves on an H100
  (benchmarks/gpu_aot.py). A max's gradient is a mask of where the input equals it, which
  fuses into the elementwise work around it. The two differ only where a window holds equal
  maxima: the mask shares the gradient among them, select-and-scatter gives it to the first,
  both subgradients of the max (after a ReLU the common tie is at 0, where ReLU's gradient is
  0 either way).
  """
  h, w = x.shape[-3] // 2, x.shape[-2] // 2
  x = x[..., :2 * h, :2 * w, :]
  return x.reshape(x.shape[:-3] + (h, 2, w, 2, x.shape[-1])).max(axis=(-4, -2))


class Conv3x3(nn.Module):
  """nn.Conv(features, (3, 3), padding='VALID')'s parameters (kernel HWIO, bias) and function,
  computed in `form` (conv3x3), multiplying in `dtype` and adding the bias in float32
  (_add_bias).

  Why forms: under vmap a per-client kernel turns XLA's convolution ('xla') into a grouped
  convolution with one group per client, slow on GPU and CPU, while 'matmul' (im2col) becomes
  a batched matrix product; and XLA:CPU runs 'xla' ~15x slower inside a loop, 'matmul' not
  (docs/benchmarks.md). The price of 'matmul' is memory: the 9 views are a copy 9x the
  input's size, kept for the backward pass (~0.66 MB an example for the second convolution;
  half that in bfloat16).
  """
  features: int
  form: str = 'xla'
  dtype: jnp.dtype = jnp.float32  # of the computation; the parameters stay float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (3, 3, x.shape[-1], self.features))
    bias = self.param('bias', nn.initializers.zeros_init(), (self.features,))
    y = conv3x3(x.astype(self.dtype), kernel.astype(self.dtype), self.form)
    return _add_bias(y, bias, self.dtype)


class EmnistCNN(nn.Module):
  """The EMNIST-62 CNN of the paper's FEMNIST task (about 1.2M parameters).

  conv: a form of Conv3x3 (CONV_FORMS); every form has the same parameters and function.
  """
  num_classes: int = 62
  conv: str = 'xla'
  dtype: jnp.dtype = jnp.float32  # of the computation; the parameters stay float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.astype(self.dtype)
    if x.ndim == 3:
      x = x[..., None]
    for i, width in enumerate((32, 64)):
      # Named as nn.Conv names itself, so both forms share one parameter tree.
      conv = Conv3x3(width, self.conv, self.dtype, name=f'Conv_{i}')
      x = nn.relu(conv(x))
    x = max_pool_2x2(x)
    x = nn.Dropout(0.25, deterministic=not train)(x)
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(Dense(128, self.dtype)(x))
    x = nn.Dropout(0.5, deterministic=not train)(x)
    return Dense(self.num_classes, self.dtype)(x)


def classifier(name: str, module: nn.Module) -> Model:
  """Wraps a logits module with masked softmax cross-entropy and accuracy (in float32 whatever
  the module computes in: a bfloat16 softmax loses the small probabilities)."""

  def init(rng: jax.Array, batch: Batch) -> Params:
    return module.init(rng, batch['x'][:1], train=False)['params']

  def per_example(params, batch, train, rng):
    rngs = {'dropout': rng} if train and rng is not None else {}
    logits = module.apply({'params': params}, batch['x'], train=train, rngs=rngs)
    logits = logits.astype(jnp.float32)
    labels = batch['y'].astype(jnp.int32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return losses, jnp.argmax(logits, axis=-1) == labels

  def loss(params, batch, mask, rng):
    losses, _ = per_example(params, batch, True, rng)
    mask = mask.astype(jnp.float32)
    return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)

  def eval_sums(params, batch, mask):
    losses, correct = per_example(params, batch, False, None)
    mask = mask.astype(bool)
    # Counts as integers: the evaluator adds them up over the whole test set, and float32
    # totals stop counting past 2^24 (16.8M) examples.
    return {'loss': jnp.sum(jnp.where(mask, losses, 0.0)),
            'correct': jnp.sum(correct & mask, dtype=jnp.int32),
            'count': jnp.sum(mask, dtype=jnp.int32)}

  return Model(name, init, loss, eval_sums)


class NextWordLSTM(nn.Module):
  """Embedding -> LSTM -> tanh -> dense -> dense over the token ids (Stack Overflow next-word),
  as FedJAX's model, which the paper's reference ran (TFF's Keras model has no tanh)."""
  num_ids: int
  embed: int = 96
  lstm: int = 670
  dense: int = 96
  dtype: jnp.dtype = jnp.float32  # of the computation; the parameters stay float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    # Rows looked up in float32, then cast: the table's gradient is a scatter-add of every
    # occurrence of a token, which bfloat16 would round at every term.
    h = nn.Embed(self.num_ids, self.embed)(x.astype(jnp.int32)).astype(self.dtype)
    if self.is_initializing():
      # Lays out and draws the cell's parameters as flax always has.
      h = nn.RNN(nn.OptimizedLSTMCell(self.lstm, dtype=self.dtype, name=LSTM_CELL))(h)
    else:
      # The same function, with a backward pass that is cheaper than autodiff's (lstm.py).
      h = lstm.lstm_layer(self.variables['params'][LSTM_CELL], h, self.dtype)
    h = Dense(self.dense, self.dtype)(jnp.tanh(h))
    return Dense(self.num_ids, self.dtype)(h)


def unit_forget_bias(params: Params) -> Params:
  """The LSTM's forget gate starts with bias 1 (flax starts every bias at 0), as in both
  public versions of the Stack Overflow model: TFF's Keras LSTM (unit_forget_bias) and
  FedJAX's Haiku LSTM (which adds 1 to the forget gate's input). The cell then keeps most of
  its memory early in training."""
  cell = params[LSTM_CELL]
  forget = {**cell['hf'], 'bias': jnp.ones_like(cell['hf']['bias'])}
  return {**params, LSTM_CELL: {**cell, 'hf': forget}}


def sequence_model(name: str, module: nn.Module, num_ids: int,
                   expected_length: float = 0.0) -> Model:
  """Next-token prediction: x, y [n, length] ids; loss over non-pad targets.

  The training loss is the mean over the batch's non-pad target tokens; with
  `expected_length` > 0, FedJAX's stackoverflow_word task's instead: each sentence's summed
  token loss divided by that constant (13.3 there), averaged over the batch's sentences. (The
  two agree on a batch of sentences of that mean length; otherwise a step's size differs by
  the batch's tokens / (expected_length B).)

  eval_sums: `correct`/`count` is the accuracy over targets that are neither pad nor eos;
  `loss`/`count_loss` averages over the non-pad targets, eos included, as FedJAX's token_loss
  and the default training loss do (so test_loss and train_loss compare). `correct_in_vocab`
  (over the same count) is the spec's accuracy without out-of-vocabulary predictions, as
  FedJAX's accuracy_in_vocab: the prediction is the most likely in-vocabulary word (pad, bos,
  eos and oov never predicted), so an oov target always counts as a miss.
  `correct_no_oov`/`count_no_oov` leave out oov targets instead (TFF's
  accuracy_without_out_of_vocab_or_end_of_sentence; its accuracy_no_oov counts eos targets).
  """
  oov = num_ids - 1
  # Logits of the ids that accuracy_in_vocab never predicts (FedJAX masks them with -inf).
  not_words = np.isin(np.arange(num_ids), [PAD, BOS, EOS, oov])

  def init(rng: jax.Array, batch: Batch) -> Params:
    return unit_forget_bias(module.init(rng, batch['x'][:1], train=False)['params'])

  def per_token(params, batch):
    logits = module.apply({'params': params}, batch['x'], train=False).astype(jnp.float32)
    labels = batch['y'].astype(jnp.int32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return losses, logits, labels

  def loss(params, batch, mask, rng):
    del rng  # no dropout
    losses, _, labels = per_token(params, batch)
    weights = (labels != PAD) * mask.astype(jnp.float32)[:, None]
    if expected_length > 0:
      sentences = jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)
      return jnp.sum(losses * weights) / (expected_length * sentences)
    return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)

  def eval_sums(params, batch, mask):
    losses, logits, labels = per_token(params, batch)
    correct = jnp.argmax(logits, axis=-1) == labels
    word = jnp.argmax(jnp.where(not_words, -jnp.inf, logits), axis=-1)
    tokens = (labels != PAD) & mask.astype(bool)[:, None]
    counted = tokens & (labels != EOS)
    no_oov = counted & (labels != oov)
    return {'loss': jnp.sum(losses * tokens), 'count_loss': jnp.sum(tokens),
            'correct': jnp.sum(correct & counted),
            'count': jnp.sum(counted), 'correct_in_vocab': jnp.sum((word == labels) & counted),
            'correct_no_oov': jnp.sum(correct & no_oov), 'count_no_oov': jnp.sum(no_oov)}

  return Model(name, init, loss, eval_sums)


INITS = ('flax', 'fedjax')


def fedjax_init(params: Params, rng: jax.Array) -> Params:
  """`params` drawn again as FedJAX's Haiku models draw them (the paper's reference ran those):
  every kernel (dense, convolution, LSTM) from a normal cut at +-2 std with std 1/sqrt(fan_in)
  and not rescaled after the cut (Haiku's TruncatedNormal: 0.88/sqrt(fan_in) in effect, where
  flax's lecun_normal rescales to 1/sqrt(fan_in)); embeddings the same with std 1 (flax: a
  normal of std 0.1); biases kept (0, and the LSTM's forget gate at 1, which Haiku adds in the
  cell). Haiku's LSTM has one [F + H, 4H] kernel, so its input and recurrent parts both have
  fan_in F + H."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  cell = params.get(LSTM_CELL)
  lstm_fan_in = (cell['ii']['kernel'].shape[0] + cell['hi']['kernel'].shape[0]
                 if cell is not None else None)
  # Under a stream of their own: split(key, n)[i] is fold_in(key, i) (threefry, partitionable),
  # and the init key is a round's too (rng.init_key), whose streams are small integers.
  keys = jax.random.split(jax.random.fold_in(rng, INIT_LEAVES), len(leaves))
  out = []
  for index, (path, leaf) in enumerate(leaves):
    names = [getattr(k, 'key', None) for k in path]
    if names[-1] == 'embedding':
      std = 1.0
    elif names[-1] == 'kernel':
      std = 1.0 / np.sqrt(lstm_fan_in if names[0] == LSTM_CELL else np.prod(leaf.shape[:-1]))
    else:
      out.append(leaf)
      continue
    draw = jax.random.truncated_normal(keys[index], -2.0, 2.0, leaf.shape, leaf.dtype)
    out.append((std * draw).astype(leaf.dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


def get_model(name: str, *, num_classes: int, hidden: Sequence[int] = (64,),
              conv: str = 'xla', compute_dtype: str = 'float32',
              expected_length: float = 0.0, init: str = 'flax') -> Model:
  """The model `name`; `conv` picks how emnist_cnn computes its convolutions (CONV_FORMS);
  `compute_dtype` the dtype of its activations and matrix products (COMPUTE_DTYPES). The
  parameters, and so the gradients, updates and FATHOM's statistics, are float32 either way.
  `expected_length`: the sequence models' training loss (sequence_model). `init`: flax's
  initial values, or FedJAX's (fedjax_init)."""
  if init not in INITS:
    raise ValueError(f'model.init must be one of {INITS}, got {init!r}')
  model = _get_model(name, num_classes=num_classes, hidden=hidden, conv=conv,
                     compute_dtype=compute_dtype, expected_length=expected_length)
  if init == 'flax':
    return model
  flax_init = model.init
  return model._replace(init=lambda rng, batch: fedjax_init(flax_init(rng, batch), rng))


def _get_model(name: str, *, num_classes: int, hidden: Sequence[int], conv: str,
               compute_dtype: str, expected_length: float) -> Model:
  if conv not in CONV_FORMS:
    raise ValueError(f'model.conv must be one of {CONV_FORMS}, got {conv!r}')
  if compute_dtype not in COMPUTE_DTYPES:
    raise ValueError(f'model.compute_dtype must be one of {tuple(COMPUTE_DTYPES)}, '
                     f'got {compute_dtype!r}')
  dtype = COMPUTE_DTYPES[compute_dtype]
  if name == 'logistic':
    return classifier(name, MLP(hidden=(), num_classes=num_classes, dtype=dtype))
  if name == 'mlp':
    return classifier(name, MLP(hidden=tuple(hidden), num_classes=num_classes, dtype=dtype))
  if name == 'emnist_cnn':
    return classifier(name, EmnistCNN(num_classes=num_classes, conv=conv, dtype=dtype))
  if name in SEQUENCE_MODELS:
    # num_classes is the number of token ids; 'lstm' takes its widths from `hidden`.
    embed, lstm, dense = STACKOVERFLOW_LSTM if name == 'stackoverflow_lstm' else hidden
    return sequence_model(name, NextWordLSTM(num_classes, embed, lstm, dense, dtype),
                          num_classes, expected_length)
  raise ValueError(f'model.name must be one of {MODELS}, got {name!r}')
