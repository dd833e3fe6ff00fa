"""Data sources and cohort sampling: generated tasks, bring-your-own npz, sampling."""

import os
import zipfile

import numpy as np
import pytest

from fathom_sim.data import DataError, load_npz
from fathom_sim.data.federated import ArrayClientDataset
from fathom_sim.data.sampling import sample_cohort
from fathom_sim.data.synthetic import femnist_like, synthetic_alpha_beta
from fathom_sim.train import train_and_evaluate
from tests.common import tiny_config


def test_synthetic_is_deterministic_and_per_client_stable():
  a = synthetic_alpha_beta(num_clients=20, seed=4)
  b = synthetic_alpha_beta(num_clients=20, seed=4)
  c = synthetic_alpha_beta(num_clients=35, seed=4)
  for i in range(20):
    for name in ('x', 'y'):
      np.testing.assert_array_equal(a.train.client(i)[name], b.train.client(i)[name])
      np.testing.assert_array_equal(a.train.client(i)[name], c.train.client(i)[name])
  d = synthetic_alpha_beta(num_clients=20, seed=5)
  assert not np.array_equal(a.train.client(0)['x'][:1], d.train.client(0)['x'][:1])


def test_synthetic_inputs_past_float32_are_refused_naming_alpha_and_beta():
  """beta 1e80 generated inf inputs: the run rejected nearly every round and exited 0."""
  from fathom_sim.config import ConfigError
  with pytest.raises(ConfigError, match=r"config.data.alpha=1, config.data.beta=1e\+80: client "
                     r"0's generated inputs or labels overflow"):
    synthetic_alpha_beta(num_clients=3, beta=1e80)
  synthetic_alpha_beta(num_clients=3, alpha=1e6, beta=1e6)  # far out, still finite


def test_synthetic_shapes_sizes_and_label_skew():
  task = synthetic_alpha_beta(num_clients=200, min_examples=10, max_examples=300, seed=0)
  total = task.train.num_examples + task.test.num_examples
  assert total.min() >= 10 and total.max() <= 300
  assert np.all(task.test.num_examples >= 1) and np.all(task.train.num_examples >= 1)
  assert task.train.features['x'].shape[1:] == (60,) and task.num_classes == 10
  y = task.train.features['y']
  assert y.min() >= 0 and y.max() < 10
  # Power-law sizes: the largest clients are many times the median.
  assert total.max() > 4 * np.median(total)
  # Non-IID: a client's most common label covers far more than 1/10 of its examples.
  shares = [np.bincount(task.train.client(i)['y'], minlength=10).max() /
            task.train.num_examples[i] for i in range(200)]
  assert np.mean(shares) > 0.5


def test_femnist_like_matches_femnist_shapes_and_skew():
  task = femnist_like(num_clients=3400)
  assert len(task.train.client_ids) == 3400 and task.num_classes == 62
  n = task.train.num_examples
  assert 180 < n.mean() < 220  # FEMNIST: ~671.6k train examples over 3,400 writers
  assert n.std() > 0.25 * n.mean()
  ex = task.train.client(7)
  assert ex['x'].shape == (n[7], 28, 28) and ex['x'].dtype == np.float32
  assert ex['x'].min() >= 0.0 and ex['x'].max() <= 1.0
  assert np.median(ex['x']) > 0.7  # mostly white background, as FEMNIST
  assert ex['y'].min() >= 0 and ex['y'].max() < 62
  again = task.train.client(7)
  np.testing.assert_array_equal(ex['x'], again['x'])
  test_ex = task.test.client(7)
  assert len(test_ex['y']) == task.test.num_examples[7]


def _class_means(task, clients: int) -> np.ndarray:
  """Each class's mean training image over the first `clients` writers."""
  sums, counts = np.zeros((62, 28, 28)), np.zeros(62)
  for k in range(clients):
    ex = task.train.client(k)
    np.add.at(sums, ex['y'], ex['x'])
    counts += np.bincount(ex['y'], minlength=62)
  return sums / counts[:, None, None]


def test_femnist_like_shared_glyphs_draws_both_cases_of_the_merged_letters_alike():
  """With shared_glyphs the small form of each letter EMNIST merges by case is drawn as its
  capital (its label no longer told by its image); every other class, and every label, is
  as without."""
  from fathom_sim.data.synthetic import CASE_MERGED_LETTERS
  own, shared = femnist_like(num_clients=250), femnist_like(num_clients=250, shared_glyphs=True)
  small = {36 + ord(c) - ord('a') for c in CASE_MERGED_LETTERS}
  for k in (0, 7, 249):
    a, b = own.train.client(k), shared.train.client(k)
    np.testing.assert_array_equal(a['y'], b['y'])
    kept = ~np.isin(a['y'], list(small))
    np.testing.assert_array_equal(a['x'][kept], b['x'][kept])
    assert not np.array_equal(a['x'][~kept], b['x'][~kept])

  # The config's field reaches the generator, made on demand and held in memory alike.
  from fathom_sim.config import base_config
  from fathom_sim.data import load_task
  c = base_config().data
  c.name, c.num_clients, c.test_fraction, c.shared_glyphs = 'femnist_synthetic', 8, 0.1, True
  for c.in_memory in (False, True):
    np.testing.assert_array_equal(load_task(c).train.client(7)['x'], shared.train.client(7)['x'])

  def corr(means, i, j):
    return np.corrcoef(means[i].ravel(), means[j].ravel())[0, 1]

  own_means, shared_means = _class_means(own, 250), _class_means(shared, 250)
  for letter in 'abcdefghijklmnopqrstuvwxyz':
    capital, lower = 10 + ord(letter) - ord('a'), 36 + ord(letter) - ord('a')
    assert corr(own_means, capital, lower) < 0.7, letter
    if letter in CASE_MERGED_LETTERS:
      assert corr(shared_means, capital, lower) > 0.95, letter
    else:
      assert corr(shared_means, capital, lower) < 0.7, letter


def test_femnist_like_in_memory_holds_the_generated_clients_exactly():
  from fathom_sim.config import base_config
  from fathom_sim.data import load_task
  c = base_config().data
  c.name, c.num_clients = 'femnist_synthetic', 12
  lazy = load_task(c)
  c.in_memory = True
  held = load_task(c)
  assert isinstance(held.train, ArrayClientDataset) and isinstance(held.test, ArrayClientDataset)
  for lazy_split, held_split in ((lazy.train, held.train), (lazy.test, held.test)):
    np.testing.assert_array_equal(lazy_split.num_examples, held_split.num_examples)
    for i in range(12):
      a, b = lazy_split.client(i), held_split.client(i)
      assert sorted(a) == sorted(b)
      for k in a:
        np.testing.assert_array_equal(a[k], b[k])
  # A sweep's settings share one read-only copy; another data seed makes its own.
  assert load_task(c) is held
  with pytest.raises(ValueError, match='read-only'):
    held.train.features['x'][0] = 0
  c.seed += 1
  other = load_task(c)
  assert other is not held and not np.array_equal(other.train.features['x'][:50],
                                                   held.train.features['x'][:50])


def test_in_memory_clients_refuse_misaligned_features_and_indices_past_them():
  """A client whose x and y differ in length shifted rows into the next client's labels; an
  index past the clients (or -1) read an empty client."""
  good = {'x': np.zeros((3, 2)), 'y': np.zeros(3)}
  data = ArrayClientDataset.from_clients(['a', 'b'], [good, {'x': np.ones((2, 2)),
                                                               'y': np.ones(2)}])
  np.testing.assert_array_equal(data.client(1)['y'], [1, 1])
  with pytest.raises(ValueError, match=r"client b: features \{'x': 2, 'y': 3\} are not"):
    ArrayClientDataset.from_clients(['a', 'b'], [good, {'x': np.ones((2, 2)),
                                                         'y': np.ones(3)}])
  for index in (-1, 2):
    with pytest.raises(IndexError, match=f'client {index} of 2'):
      data.client(index)


def test_sample_cohort_distinct_deterministic_eligible_and_uniform():
  counts = np.array([0, 3, 5, 0, 2, 7, 1, 4, 6, 2], np.int64)
  data = ArrayClientDataset({'y': np.zeros(counts.sum(), np.int32)},
                            np.concatenate([[0], np.cumsum(counts)]),
                            np.array([f'c{i}' for i in range(10)]))
  seen = np.zeros(10)
  for t in range(1, 801):
    cohort = sample_cohort(data, 1, t, 3)
    assert len(set(cohort.tolist())) == 3
    assert not ({0, 3} & set(cohort.tolist()))
    seen[cohort] += 1
  np.testing.assert_array_equal(sample_cohort(data, 1, 5, 3), sample_cohort(data, 1, 5, 3))
  assert not np.array_equal(sample_cohort(data, 1, 5, 3), sample_cohort(data, 2, 5, 3))
  eligible = seen[counts > 0]
  expected = 800 * 3 / 8
  assert np.all(np.abs(eligible - expected) < 5 * np.sqrt(expected))  # uniform
  with pytest.raises(ValueError, match='cannot sample 9 clients out of 8'):
    sample_cohort(data, 1, 1, 9)


def _write_clients(path, counts, seed=0, num_classes=4, shape=(5,), **extra):
  r = np.random.default_rng(seed)
  n = int(np.sum(counts))
  arrays = {'x': r.normal(size=(n,) + shape).astype(np.float32),
            'y': r.integers(0, num_classes, n).astype(np.int64),
            'num_examples': np.asarray(counts, np.int64)}
  arrays.update(extra)
  np.savez(path, **arrays)
  return arrays


def test_npz_single_file_holds_out_test_examples_per_client(tmp_path):
  arrays = _write_clients(tmp_path / 'mine.npz', [5, 10, 1, 8],
                          client_ids=np.array(['a', 'b', 'c', 'd']))
  task = load_npz(str(tmp_path / 'mine.npz'), test_fraction=0.2, seed=0)
  assert list(task.train.client_ids) == ['a', 'b', 'c', 'd'] and task.num_classes == 4
  np.testing.assert_array_equal(task.train.num_examples + task.test.num_examples, [5, 10, 1, 8])
  np.testing.assert_array_equal(task.test.num_examples, [1, 2, 0, 1])
  offsets = np.concatenate([[0], np.cumsum([5, 10, 1, 8])])
  for i in range(4):
    both = np.concatenate([task.train.client(i)['x'], task.test.client(i)['x']])
    original = arrays['x'][offsets[i]:offsets[i + 1]]
    assert sorted(map(tuple, both.tolist())) == sorted(map(tuple, original.tolist()))


def test_npz_client_ids_saved_as_utf8_bytes_read_as_str(tmp_path):
  _write_clients(tmp_path / 'mine.npz', [2, 3],
                 client_ids=np.array(['été'.encode(), b'writer_7']))
  task = load_npz(str(tmp_path / 'mine.npz'))
  assert list(task.train.client_ids) == ['été', 'writer_7']


def test_npz_inputs_that_are_not_finite_are_said_with_their_clients(tmp_path, caplog):
  """A client of NaN inputs was dropped from every round, and a NaN test example made the
  test loss NaN, shown only in dropped_clients and a null test_loss."""
  x = np.zeros((7, 2, 3), np.float32)
  x[1, 0, 2], x[5, 1, 1] = np.nan, -np.inf  # clients a (rows 0-2) and c (rows 4-6)
  np.savez(tmp_path / 'mine.npz', x=x, y=np.zeros(7, np.int64), num_examples=np.array([3, 1, 3]),
           client_ids=np.array(['a', 'b', 'c']))
  load_npz(str(tmp_path / 'mine.npz'))
  [warning] = [r.getMessage() for r in caplog.records if 'NaN or inf' in r.getMessage()]
  assert warning.startswith(f'{tmp_path / "mine.npz"}: 2 example(s) of 2 client(s) (a, c) hold '
                            'NaN or inf inputs')
  # A bad row in every client (b's is row 3) still loads: with E < 1 a client may read
  # around its own, and a run go on.
  x[3, 0, 0] = np.nan
  np.savez(tmp_path / 'every.npz', x=x, y=np.zeros(7, np.int64),
           num_examples=np.array([3, 1, 3]))
  assert len(load_npz(str(tmp_path / 'every.npz')).train.num_examples) == 3
  caplog.clear()
  _write_clients(tmp_path / 'fine.npz', [3, 4])
  load_npz(str(tmp_path / 'fine.npz'))
  assert 'NaN or inf' not in caplog.text


def test_npz_float64_inputs_past_float32s_range_are_refused_naming_the_file(tmp_path):
  """Cast to float32 they became inf, and the load warned of NaN or inf inputs the file did
  not hold; every client was then dropped from every round. NaN and inf themselves, and
  float64 values float32 holds, still load (the warning above is theirs)."""
  from fathom_sim.data import DataError
  x = np.zeros((5, 3), np.float64)
  x[3, 1], x[0, 0] = -2e300, np.nan
  np.savez(tmp_path / 'big.npz', x=x, y=np.zeros(5, np.int64), num_examples=np.array([2, 3]))
  with pytest.raises(DataError, match=r"big.npz: x holds values up to 2e\+300, past float32's "
                                      r'range \(3.4e\+38\) in which the simulator computes'):
    load_npz(str(tmp_path / 'big.npz'))
  x[3, 1] = 3e38
  np.savez(tmp_path / 'fits.npz', x=x, y=np.zeros(5, np.int64), num_examples=np.array([2, 3]))
  assert load_npz(str(tmp_path / 'fits.npz')).train.features['x'].dtype == np.float32


def test_npz_directory_with_train_and_test(tmp_path):
  _write_clients(tmp_path / 'train.npz', [3, 4], num_classes=3)
  _write_clients(tmp_path / 'test.npz', [2, 2], seed=1, num_classes=3)
  task = load_npz(str(tmp_path), num_classes=5)
  assert task.num_classes == 5
  np.testing.assert_array_equal(task.test.num_examples, [2, 2])
  assert list(task.train.client_ids) == ['client_000000', 'client_000001']
  # A label past the classes: the file that holds it is named, not the folder.
  _write_clients(tmp_path / 'test.npz', [2, 2], seed=1, num_classes=9)
  top = int(np.load(tmp_path / 'test.npz')['y'].max())
  with pytest.raises(DataError) as e:
    load_npz(str(tmp_path), num_classes=3)
  assert str(e.value) == (f'{tmp_path / "test.npz"}: label {top} does not fit '
                          'data.num_classes=3 (labels must be in [0, 2])')


@pytest.mark.parametrize('problem,needle', [
    ('missing', "missing array(s) ['num_examples']"),
    ('counts', 'num_examples adds up to 7'),
    ('labels', 'does not fit data.num_classes=3'),
    ('negative', 'labels must be >= 0'),
    ('float_labels', 'y must be a 1-D integer label array'),
    ('string_inputs', 'x must hold real numbers'),
    # The imaginary part was dropped by the cast to float32, with numpy's ComplexWarning only.
    ('complex_inputs', 'x must hold real numbers (float inputs, or integer token ids), got '
                       'complex128'),
    # Every round rejected, eta halved each time, and the run's last line said to lower eta.
    ('all_nan', 'data.npz: every example holds NaN or inf inputs: no client can return a '
                'finite update'),
    ('train_npz_nan', 'train.npz: every example holds NaN or inf inputs'),
    ('not_npz', "not an .npz file (it starts with b'this i'); an .npz is the zip of arrays "
                'that np.savez writes'),
    ('npy', 'a single .npy array, not an .npz'),
    ('cut_npz', 'not a readable .npz file'),
    ('no_test', 'must hold train.npz and test.npz'),
    ('shapes', 'train inputs are (5,) but test inputs are (6,)'),
    ('empty', 'holds no examples (num_examples is empty or all 0)'),  # was a KeyError 'y'
    ('huge_label', 'labels must be below 2^31 - 1, found 2147483648'),  # wrapped to -2^31
    # Its classes, the label + 1, wrapped past int32 in the model.
    ('largest_label', 'labels must be below 2^31 - 1, found 2147483647'),
    # The counts' int64 sum wrapped round to the one row: it was copied into two clients.
    ('wrapping_counts', 'x has 1 rows, y 1, num_examples adds up to 18446744073709551617; all '
                        'three must agree'),
    ('uint64_counts', 'num_examples adds up to 18446744073709551617'),  # numpy's cast warning
    # Said as config.cohort_size past 0 clients with data, the file unnamed.
    ('empty_train_npz', 'train.npz: holds no examples'),
    ('dev_null', "data.path '/dev/null': neither a file nor a directory"),  # 'no such file'
    # A header giving a shape past the file's bytes: it was said as a config asking for too
    # much memory (data.num_clients, model widths), the file unnamed.
    ('huge_header', 'its arrays do not fit in the host\'s memory (Unable to allocate'),
    ('same_ids', "client_ids must be distinct; 'a' names 2 clients"),
    ('damaged_deflate', 'not a readable .npz file (Error -3 while decompressing'),  # zlib.error
    ('scalar_x', 'x must be an array [N, ...] with a row per example'),  # was len() TypeError
    ('scalar_ids', 'client_ids must be a 1-D array of strings, one per client, got shape ()'),
    ('latin1_ids', "client_ids are bytes that are not UTF-8 (invalid continuation byte at "
                   "byte 0 of b'\\xe9t\\xe9'); save them as str"),  # was a UnicodeDecodeError
])
def test_npz_problems_name_the_file_and_the_fix(tmp_path, problem, needle):
  path = tmp_path / 'data.npz'
  kwargs = {}
  if problem == 'missing':
    np.savez(path, x=np.zeros((3, 5)), y=np.zeros(3, np.int64))
  elif problem == 'counts':
    _write_clients(path, [3, 4])
    arrays = dict(np.load(path))
    arrays['x'] = arrays['x'][:5]
    arrays['y'] = arrays['y'][:5]
    np.savez(path, **arrays)
  elif problem == 'labels':
    _write_clients(path, [3, 4], num_classes=6)
    kwargs['num_classes'] = 3
  elif problem == 'negative':
    np.savez(path, x=np.zeros((2, 5)), y=np.array([0, -1]), num_examples=np.array([2]))
  elif problem == 'float_labels':
    np.savez(path, x=np.zeros((2, 5)), y=np.array([0.0, 1.0]), num_examples=np.array([2]))
  elif problem == 'string_inputs':
    np.savez(path, x=np.array([['a', 'b'], ['c', 'd']]), y=np.array([0, 1]),
             num_examples=np.array([2]))
  elif problem == 'complex_inputs':
    np.savez(path, x=np.ones((2, 5)) * 1j, y=np.array([0, 1]), num_examples=np.array([2]))
  elif problem == 'all_nan':
    np.savez(path, x=np.full((5, 3), np.nan), y=np.zeros(5, np.int64),
             num_examples=np.array([2, 0, 3]))
  elif problem == 'train_npz_nan':
    path = tmp_path / 'dir'
    path.mkdir()
    x = np.full((3, 5), np.nan, np.float32)
    x[2, 0] = np.inf
    np.savez(path / 'train.npz', x=x, y=np.zeros(3, np.int64), num_examples=np.array([2, 1]))
    _write_clients(path / 'test.npz', [3])
  elif problem == 'not_npz':
    path.write_bytes(b'this is not a zip archive')
  elif problem == 'npy':
    with open(path, 'wb') as f:
      np.save(f, np.zeros(3))
  elif problem == 'cut_npz':
    _write_clients(path, [3, 4])
    path.write_bytes(path.read_bytes()[:100])
  elif problem == 'no_test':
    path = tmp_path / 'dir'
    path.mkdir()
    _write_clients(path / 'train.npz', [3])
  elif problem == 'empty':
    np.savez(path, x=np.zeros((0, 5)), y=np.zeros(0, np.int64), num_examples=np.zeros(0, int))
  elif problem == 'huge_label':
    np.savez(path, x=np.zeros((2, 5)), y=np.array([0, 2**31]), num_examples=np.array([2]))
  elif problem == 'largest_label':
    np.savez(path, x=np.zeros((2, 5)), y=np.array([0, 2**31 - 1]), num_examples=np.array([2]))
  elif problem == 'wrapping_counts':
    np.savez(path, x=np.zeros((1, 5)), y=np.zeros(1, np.int64),
             num_examples=np.array([2**62] * 3 + [2**62 + 1], np.int64))
  elif problem == 'uint64_counts':
    np.savez(path, x=np.zeros((1, 5)), y=np.zeros(1, np.int64),
             num_examples=np.array([2**64 - 1, 2], np.uint64))
  elif problem == 'empty_train_npz':
    path = tmp_path / 'dir'
    path.mkdir()
    np.savez(path / 'train.npz', x=np.zeros((0, 5)), y=np.zeros(0, np.int64),
             num_examples=np.zeros(2, int))
    _write_clients(path / 'test.npz', [3])
  elif problem == 'dev_null':
    path = '/dev/null'
  elif problem == 'huge_header':
    header = {'descr': '<f4', 'fortran_order': False, 'shape': (10**12, 8)}
    with zipfile.ZipFile(path, 'w') as z:
      with z.open('x.npy', 'w') as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.write(np.zeros((40, 8), np.float32).tobytes())
      for name, array in (('y', np.zeros(40, np.int64)), ('num_examples', np.array([40]))):
        with z.open(f'{name}.npy', 'w') as f:
          np.lib.format.write_array(f, array)
  elif problem == 'same_ids':
    np.savez(path, x=np.zeros((3, 5)), y=np.array([0, 1, 0]), num_examples=np.array([1, 1, 1]),
             client_ids=np.array(['a', 'b', 'a']))
  elif problem == 'damaged_deflate':  # past the zip's headers: np.load opens it, reading fails
    np.savez_compressed(path, x=np.random.default_rng(0).random((2000, 30)),
                        y=np.zeros(2000, np.int64), num_examples=np.array([1000, 1000]))
    data = bytearray(path.read_bytes())
    data[100:164] = b'\xff' * 64
    path.write_bytes(bytes(data))
  elif problem == 'scalar_x':
    np.savez(path, x=np.float32(1), y=np.zeros(1, np.int64), num_examples=np.array([1]))
  elif problem == 'scalar_ids':
    np.savez(path, x=np.zeros((1, 5)), y=np.zeros(1, np.int64), num_examples=np.array([1]),
             client_ids=np.array('a'))
  elif problem == 'latin1_ids':
    np.savez(path, x=np.zeros((2, 5)), y=np.zeros(2, np.int64), num_examples=np.array([1, 1]),
             client_ids=np.array(['été'.encode('latin-1'), b'b']))
  elif problem == 'shapes':
    path = tmp_path / 'dir'
    path.mkdir()
    _write_clients(path / 'train.npz', [3])
    _write_clients(path / 'test.npz', [3], shape=(6,))
  with pytest.raises(DataError) as err:
    load_npz(str(path), **kwargs)
  assert needle in str(err.value) and str(path) in str(err.value)


def test_npz_task_trains_end_to_end(tmp_path):
  r = np.random.default_rng(0)
  counts = r.integers(5, 30, size=16)
  centres = r.normal(size=(3, 12))
  y = r.integers(0, 3, counts.sum())
  x = (centres[y] + 0.3 * r.normal(size=(counts.sum(), 12))).astype(np.float32)
  np.savez(tmp_path / 'easy.npz', x=x, y=y, num_examples=counts)
  config = tiny_config(algorithm='fedavg', num_rounds=20, cohort_size=4, eta=0.1,
                       batch_size=8.0, epochs=1.0, eval_every=10)
  config.data.name = 'npz'
  config.data.path = str(tmp_path / 'easy.npz')
  summary = train_and_evaluate(config, str(tmp_path / 'run'))
  assert summary['final']['test_accuracy'] > 0.9  # separable clusters
  assert os.path.exists(tmp_path / 'run' / 'metrics.jsonl')


def test_data_that_does_not_fit_the_model_is_refused_in_one_line(tmp_path):
  from fathom_sim.run import build
  _write_clients(tmp_path / 'flat.npz', [4, 5], shape=(3,))
  config = tiny_config(cohort_size=2)
  config.data.name = 'npz'
  config.data.path = str(tmp_path / 'flat.npz')
  config.model.name = 'emnist_cnn'  # 3x3 convolutions cannot take 3-vectors
  with pytest.raises(DataError, match=r"examples \(x \(3,\) float32, y \(\) int32\) do not fit "
                                      r"config.model.name='emnist_cnn'") as err:
    build(config)
  assert '\n' not in str(err.value)
  from fathom_sim import models
  assert set(models.TAKES) == set(models.MODELS)
  # what it takes, not only the model's own words ("tuple index out of range")
  assert ("which takes x an image [H, W] or [H, W, 1] ([28, 28] in EMNIST), y an integer "
          'label per example (') in str(err.value)


@pytest.mark.parametrize('dtype,top,warned', [(np.uint8, 255, True), (np.int32, 1, False),
                                               (np.float32, 255, False)])
def test_integer_pixels_for_a_float_input_model_are_warned_about(tmp_path, caplog, dtype, top,
                                                                 warned):
  """uint8 images given to a float-input model train at 255x FEMNIST's input scale: said
  once, with the fix; 0/1 integers and floats of any range are taken without a word."""
  from fathom_sim.run import build
  r = np.random.default_rng(0)
  counts = np.array([4, 5])
  x = r.integers(0, top + 1, size=(counts.sum(), 6)).astype(dtype)
  x[0, 0] = top
  np.savez(tmp_path / 'ints.npz', x=x, y=r.integers(0, 3, counts.sum()), num_examples=counts)
  config = tiny_config(cohort_size=2)
  config.data.name = 'npz'
  config.data.path = str(tmp_path / 'ints.npz')
  with caplog.at_level('WARNING'):
    build(config)
  said = [m.getMessage() for m in caplog.records if 'holds integers' in m.getMessage()]
  assert len(said) == int(warned)
  if warned:
    assert said[0].startswith('ints.npz: x holds integers (uint8) up to 255')
    assert 'scale them to [0, 1]' in said[0]


def test_stackoverflow_like_sentences_follow_the_so_pipeline():
  from fathom_sim.data.synthetic import SO_IDS, stackoverflow_like
  task = stackoverflow_like(num_clients=30, seed=2)
  assert task.num_classes == SO_IDS == 10_004
  ex = task.train.client(5)
  x, y = ex['x'], ex['y']
  assert x.shape == y.shape == (task.train.num_examples[5], 20)
  assert np.all(x[:, 0] == 1)  # bos
  np.testing.assert_array_equal(x[:, 1:][y[:, :-1] != 2], y[:, :-1][y[:, :-1] != 2])  # shifted
  for row in y:
    words = row[(row != 0) & (row != 2)]
    assert 4 <= len(words) <= 19 and words.min() >= 3 and words.max() <= SO_IDS - 2
    assert (row == 2).sum() == 1  # one eos, right after the words
    assert row[len(words)] == 2
  np.testing.assert_array_equal(task.train.client(5)['x'], x)
