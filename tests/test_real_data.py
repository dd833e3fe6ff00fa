"""Real samples convert and train; bad files are refused with one clear error; the Stack
Overflow model's masking and metrics; the configs of the paper's tasks."""

import glob
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import zlib

import jax
import msgpack
import numpy as np
import pytest

from fathom_sim import models
from fathom_sim.config import ConfigError, check_config
from fathom_sim.data import DataError, load_task
from fathom_sim.data.federated import ArrayClientDataset, Task, fingerprint
from fathom_sim.data import tfds_store
from fathom_sim.data.prepare import prepare
from fathom_sim.data.prepared import load_prepared
from fathom_sim.evaluation import make_evaluator
from fathom_sim.mesh import make_mesh
from fathom_sim.train import train_and_evaluate
from fathom_sim.workdir import WorkdirError
from tests.test_formats import (_counts, _ext_array, _tf_example, emnist_clients,
                                write_fedjax_emnist, write_tff)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, 'tests', 'data')


def _load_config(name):
  import importlib.util
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _small_femnist(data_dir):
  """The paper's FEMNIST config on the prepared folder `data_dir`, two rounds of a small MLP
  (the data is what these tests are about)."""
  config = _load_config('femnist')
  config.data.data_dir = data_dir
  config.num_rounds, config.cohort_size, config.eval_every, config.checkpoint_every = 2, 2, 2, 1
  config.model.name, config.model.hidden = 'mlp', (16,)
  return config


def _resumed_on_the_files_prepared_again(config, workdir, leaf, data):
  """Trains `config` (2 rounds), prepares `data` again from the same LEAF files, and resumes
  the run there to round 3: the same data."""
  train_and_evaluate(config, workdir)
  shutil.rmtree(data)
  prepare(leaf, data, fmt='leaf_json', task='emnist')
  config.num_rounds = 3
  assert train_and_evaluate(config, workdir)['rounds'] == 3


def test_real_femnist_leaf_sample_converts_and_trains(tmp_path):
  meta = prepare(os.path.join(DATA, 'femnist_leaf_sample'), str(tmp_path / 'femnist'),
                 fmt='leaf_json', task='emnist')
  assert _counts(meta) == {'train': {'clients': 5, 'examples': 78},
                           'test': {'clients': 5, 'examples': 89}}
  # The records' digest, against one of the records read back from the shards.
  from array_record.python import array_record_module
  for split in ('train', 'test'):
    digest = hashlib.sha256()
    shards = sorted(glob.glob(str(tmp_path / 'femnist' / tfds_store.BUILDER_DIR /
                                  f'*-{split}.array_record-*')))
    for shard in shards:
      reader = array_record_module.ArrayRecordReader(shard)
      for record in reader.read_all():
        digest.update(len(record).to_bytes(8, 'little') + record)
      reader.close()
    assert shards and meta['splits'][split]['records_sha256'] == digest.hexdigest()
  task = load_prepared('femnist', str(tmp_path / 'femnist'))
  x = task.train.client(0)['x']
  assert x.shape == (11, 28, 28) and np.median(x) == 1.0  # white background, as LEAF stores it
  config = _load_config('femnist')
  config.data.data_dir = str(tmp_path / 'femnist')
  # The paper's config flips the pixels, as FedJAX's loader does: ink 1 on a background of 0.
  flipped = load_task(config.data)
  np.testing.assert_array_equal(flipped.train.client(0)['x'], 1.0 - x)
  np.testing.assert_array_equal(flipped.test.client(4)['x'], 1.0 - task.test.client(4)['x'])
  assert np.median(flipped.train.client(0)['x']) == 0.0
  config.num_rounds, config.cohort_size, config.eval_every = 3, 2, 3
  summary = train_and_evaluate(config, str(tmp_path / 'run'))
  assert summary['final']['test_examples'] == 89
  assert np.isfinite(summary['final']['test_loss']) and summary['total_local_steps'] > 0


def test_a_run_resumed_on_data_prepared_again_from_other_files_is_refused(tmp_path):
  """The config names a folder, not what it holds: data prepared there again from other files
  would make the resumed rounds another run's. The same files prepared again are the same
  data, and the run goes on."""
  data, workdir = str(tmp_path / 'femnist'), str(tmp_path / 'run')
  leaf = os.path.join(DATA, 'femnist_leaf_sample')
  prepare(leaf, data, fmt='leaf_json', task='emnist')
  config = _small_femnist(data)
  _resumed_on_the_files_prepared_again(config, workdir, leaf, data)

  # Prepared again from other files of the same format: one writer fewer in train.json.
  other = tmp_path / 'other'
  other.mkdir()
  shutil.copy(os.path.join(leaf, 'test.json'), other / 'test.json')
  with open(os.path.join(leaf, 'train.json')) as f:
    train = json.load(f)
  gone = train['users'].pop()
  train['num_samples'].pop()
  del train['user_data'][gone]
  (other / 'train.json').write_text(json.dumps(train))
  shutil.rmtree(data)
  prepare(str(other), data, fmt='leaf_json', task='emnist')
  before = {p: open(p, 'rb').read() for p in glob.glob(os.path.join(workdir, '**'),
                                                       recursive=True) if os.path.isfile(p)}
  config.num_rounds = 4
  with pytest.raises(WorkdirError, match='trained on other data') as e:
    train_and_evaluate(config, workdir)
  assert f'data.data_dir={data}' in str(e.value) and 'use another workdir' in str(e.value)
  after = {p: open(p, 'rb').read() for p in glob.glob(os.path.join(workdir, '**'),
                                                      recursive=True) if os.path.isfile(p)}
  assert after == before


def _leaf_relabelled(leaf, out):
  """The LEAF sample with the same writers and sizes, every label moved by 7 (of 62)."""
  out.mkdir()
  for split in ('train', 'test'):
    with open(os.path.join(leaf, f'{split}.json')) as f:
      data = json.load(f)
    for user in data['user_data'].values():
      user['y'] = [(y + 7) % 62 for y in user['y']]
    (out / f'{split}.json').write_text(json.dumps(data))


def test_a_resume_on_other_examples_with_the_same_clients_and_sizes_is_refused(tmp_path):
  """Data prepared again from files whose writers and sizes were the same but whose labels
  were not: the run resumed and trained its last rounds on them (the fingerprint held ids and
  sizes only). Same for an npz file written again with other values."""
  data, workdir = str(tmp_path / 'femnist'), str(tmp_path / 'run')
  leaf = os.path.join(DATA, 'femnist_leaf_sample')
  prepare(leaf, data, fmt='leaf_json', task='emnist')
  config = _small_femnist(data)
  train_and_evaluate(config, workdir)
  _leaf_relabelled(leaf, tmp_path / 'relabelled')
  shutil.rmtree(data)
  prepare(str(tmp_path / 'relabelled'), data, fmt='leaf_json', task='emnist')
  config.num_rounds = 3
  with pytest.raises(WorkdirError, match='trained on other data'):
    train_and_evaluate(config, workdir)

  from tests.common import tiny_config
  path, workdir = str(tmp_path / 'd.npz'), str(tmp_path / 'npz_run')
  counts = np.full(12, 10)

  def write(seed):
    r = np.random.default_rng(seed)
    np.savez(path, x=r.normal(size=(counts.sum(), 8)).astype(np.float32),
             y=np.arange(counts.sum()) % 10, num_examples=counts)

  write(0)
  config = tiny_config(num_rounds=2, checkpoint_every=1, cohort_size=3)
  config.data.name, config.data.path, config.data.num_classes = 'npz', path, 0
  config.model.name = 'logistic'
  train_and_evaluate(config, workdir)
  write(0)  # the same file written again: the same data
  config.num_rounds = 3
  assert train_and_evaluate(config, workdir)['rounds'] == 3
  write(1)
  config.num_rounds = 4
  with pytest.raises(WorkdirError, match='trained on other data') as e:
    train_and_evaluate(config, workdir)
  assert f'data.path={path}' in str(e.value)


def test_a_checkpoint_from_before_the_examples_digest_resumes_and_keeps_the_full_one(
    tmp_path):
  """A run whose checkpoints kept the fingerprint of ids and sizes alone (a dataset prepared
  by an earlier version, without records_sha256) resumes on the same files prepared now, and
  its checkpoints from then on keep the full fingerprint. Data generated from the config has
  no examples' digest: its fingerprint is what it was."""
  from fathom_sim.checkpoint import Checkpointer
  data, workdir = str(tmp_path / 'femnist'), str(tmp_path / 'run')
  leaf = os.path.join(DATA, 'femnist_leaf_sample')
  prepare(leaf, data, fmt='leaf_json', task='emnist')
  now = fingerprint(load_task(_small_femnist(data).data))
  meta_path = os.path.join(data, 'meta.json')
  with open(meta_path) as f:
    meta = json.load(f)
  for split in meta['splits'].values():
    del split['records_sha256']
  with open(meta_path, 'w') as f:
    json.dump(meta, f)
  before = fingerprint(load_task(_small_femnist(data).data))
  assert before != now and before == fingerprint(load_task(_small_femnist(data).data),
                                                 examples=False)
  config = _small_femnist(data)
  _resumed_on_the_files_prepared_again(config, workdir, leaf, data)
  checkpointer = Checkpointer(workdir, 3)
  try:
    assert checkpointer.saved_values('data') == {before, now}  # rounds 2 and 3
  finally:
    checkpointer.close()
  from tests.common import tiny_config
  generated = load_task(tiny_config().data)
  assert fingerprint(generated) == fingerprint(generated, examples=False)


def test_data_that_reshapes_the_model_is_said_as_other_data_not_unreadable_checkpoints(
    tmp_path):
  """An npz file written again with an eleventh class: the model's last layer no longer has
  the checkpoints' shape, and none read back. The error blamed the checkpoints and advised
  moving them out, which starts the run again on the other data."""
  from tests.common import tiny_config
  path, workdir = str(tmp_path / 'd.npz'), str(tmp_path / 'run')

  def write(num_classes):
    r = np.random.default_rng(0)
    counts = np.full(12, 10)
    np.savez(path, x=r.normal(size=(counts.sum(), 8)).astype(np.float32),
             y=np.arange(counts.sum()) % num_classes, num_examples=counts)

  write(10)
  config = tiny_config(num_rounds=2, checkpoint_every=1, cohort_size=3)
  config.data.name, config.data.path, config.data.num_classes = 'npz', path, 0
  config.model.name = 'logistic'
  train_and_evaluate(config, workdir)
  write(11)
  before = {p: open(p, 'rb').read() for p in glob.glob(os.path.join(workdir, '**'),
                                                       recursive=True) if os.path.isfile(p)}
  config.num_rounds = 3
  with pytest.raises(WorkdirError, match='trained on other data') as e:
    train_and_evaluate(config, workdir)
  assert f'data.path={path}' in str(e.value) and 'reads back' not in str(e.value)
  after = {p: open(p, 'rb').read() for p in glob.glob(os.path.join(workdir, '**'),
                                                      recursive=True) if os.path.isfile(p)}
  assert after == before


def test_the_data_fingerprint_follows_clients_sizes_classes_and_a_prepared_vocabulary(
    tmp_path):
  clients = [{'x': np.zeros((n, 2), np.float32), 'y': np.zeros(n, np.int32)} for n in (3, 5)]

  def task(ids=('a', 'b'), counts=(3, 5), num_classes=4):
    train = ArrayClientDataset.from_clients(
        ids, [{k: np.zeros((n, *v.shape[1:]), v.dtype) for k, v in clients[0].items()}
              for n in counts])
    return Task('npz', train, ArrayClientDataset.from_clients(['t'], clients[:1]), num_classes)

  base = fingerprint(task())
  assert fingerprint(task()) == base  # the same data: the same digest
  for changed in (task(ids=('a', 'c')), task(counts=(3, 6)), task(counts=(5, 3)),
                  task(num_classes=5)):
    assert fingerprint(changed) != base
  # A prepared Stack Overflow dataset's vocabulary decides its tokens: it is part of it.
  data = str(tmp_path / 'beer')
  prepare(os.path.join(DATA, 'beer.stackexchange.Posts.xml'), data, fmt='stackexchange_xml',
          task='stackoverflow', vocab_size=50)
  prepared = load_prepared('stackoverflow', data)
  first = fingerprint(prepared)
  with open(os.path.join(data, 'vocab.txt'), 'a', encoding='utf-8') as f:
    f.write('another\n')
  assert fingerprint(load_prepared('stackoverflow', data)) != first


def test_real_posts_xml_converts_and_trains(tmp_path):
  meta = prepare(os.path.join(DATA, 'beer.stackexchange.Posts.xml'), str(tmp_path / 'beer'),
                 fmt='stackexchange_xml', task='stackoverflow', vocab_size=1000)
  train, test = meta['splits']['train'], meta['splits']['test']
  assert 500 < train['clients'] < 782 and train['examples'] > 10000 and test['clients'] > 100
  assert meta['num_classes'] == 1004
  config = _load_config('stackoverflow')
  config.data.data_dir = str(tmp_path / 'beer')
  config.model.name, config.model.hidden = 'lstm', (16, 32, 16)
  config.num_rounds, config.cohort_size, config.eval_every, config.eval_clients = 3, 4, 3, 20
  summary = train_and_evaluate(config, str(tmp_path / 'run'))
  assert np.isfinite(summary['final']['test_loss'])
  assert 0 < summary['final']['test_examples']  # tokens counted: not pad, not eos
  assert 0 <= summary['final']['test_accuracy_no_oov'] <= 1  # the second SO metric
  with open(tmp_path / 'run' / 'metrics.jsonl') as f:
    last = [json.loads(line) for line in f][-1]
  assert 'test_accuracy_no_oov' in last


def test_sequence_model_masks_pad_eos_oov_and_padded_examples():
  num_ids = 9  # 5 words + pad, bos, eos, oov (id 8)
  model = models.get_model('lstm', num_classes=num_ids, hidden=(4, 6, 5))
  x = np.array([[1, 3, 8, 4, 0], [1, 5, 6, 7, 3], [1, 4, 0, 0, 0]], np.int32)
  y = np.array([[3, 8, 4, 2, 0], [5, 6, 7, 3, 4], [4, 2, 0, 0, 0]], np.int32)
  batch = {'x': x, 'y': y}
  params = model.init(jax.random.key(0), batch)
  # The output bias made to favour oov (8) and bos (1): a plain argmax then mostly says oov, and
  # the in-vocabulary accuracy, which never predicts pad, bos, eos or oov, differs from it.
  bias = params['Dense_1']['bias']
  params['Dense_1']['bias'] = bias.at[8].add(3.0).at[1].add(1.5)
  logits = np.asarray(models.NextWordLSTM(num_ids, 4, 6, 5).apply({'params': params}, x))
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, y[..., None], -1)[..., 0]
  right = logits.argmax(-1) == y
  mask = np.array([True, True, False])  # the third example is padding
  tokens = (y != 0) & mask[:, None]
  np.testing.assert_allclose(model.loss(params, batch, mask, None),
                             nll[tokens].mean(), rtol=1e-5)
  sums = jax.device_get(model.eval_sums(params, batch, mask))
  counted = tokens & (y != 2)
  in_vocab = counted & (y != 8)
  assert sums['count'] == counted.sum() == 8 and sums['count_no_oov'] == in_vocab.sum() == 7
  # The test loss is over the training loss's tokens (eos included), as FedJAX's token_loss.
  assert sums['count_loss'] == tokens.sum() == 9
  np.testing.assert_allclose(sums['loss'], nll[tokens].sum(), rtol=1e-5)
  assert sums['correct'] == right[counted].sum()
  assert sums['correct_no_oov'] == right[in_vocab].sum()
  words = logits.copy()
  words[..., [0, 1, 2, 8]] = -np.inf  # FedJAX's accuracy_in_vocab: only words are predicted
  word_right = words.argmax(-1) == y
  assert sums['correct_in_vocab'] == word_right[counted].sum()
  assert (logits.argmax(-1)[counted] == 8).any()  # the masking matters on this batch
  assert not word_right[counted & (y == 8)].any()  # an oov target is always a miss


def test_evaluator_reports_extra_accuracies(tmp_path):
  from fathom_sim.data.federated import ArrayClientDataset
  model = models.get_model('lstm', num_classes=9, hidden=(4, 6, 5))
  r = np.random.default_rng(0)
  y = r.integers(0, 9, (7, 5)).astype(np.int32)
  data = ArrayClientDataset({'x': y.copy(), 'y': y}, np.array([0, 3, 7]), np.array(['a', 'b']))
  params = model.init(jax.random.key(1), data.client(0))
  out = make_evaluator(model, make_mesh(1), 4)(params, data, [0, 1])
  sums = jax.device_get(model.eval_sums(params, data.features, np.ones(7, bool)))
  assert set(out) == {'accuracy', 'loss', 'count', 'accuracy_no_oov', 'accuracy_in_vocab'}
  np.testing.assert_allclose(out['accuracy'], sums['correct'] / sums['count'])
  np.testing.assert_allclose(out['accuracy_in_vocab'], sums['correct_in_vocab'] / sums['count'])
  np.testing.assert_allclose(out['loss'], sums['loss'] / sums['count_loss'], rtol=1e-6)
  assert sums['count_loss'] > sums['count']  # eos targets: in the loss, not in the accuracy
  np.testing.assert_allclose(out['accuracy_no_oov'], sums['correct_no_oov'] /
                             sums['count_no_oov'])


# ---- bad files ----------------------------------------------------------------------------

def _fedjax_dir(tmp_path):
  write_fedjax_emnist(tmp_path / 'src', emnist_clients(1, [3, 4]), emnist_clients(2, [2]))
  return str(tmp_path / 'src')


def _corrupt_fedjax(tmp_path, problem):
  src = _fedjax_dir(tmp_path)
  path = os.path.join(src, 'federated_emnist_train.sqlite')
  db = sqlite3.connect(path)
  if problem == 'two_trains':  # a copy beside the original: which one is train?
    shutil.copy(path, os.path.join(src, 'old_emnist_train.sqlite'))
  elif problem == 'table':
    db.execute('ALTER TABLE federated_data RENAME TO clients')
  elif problem == 'damaged_page':  # the header reads well, a page of rows does not
    db.close()
    with open(path, 'r+b') as f:
      f.seek(4096)
      f.write(b'\xff' * 4096)
    return src, path
  elif problem == 'truncated':
    blob = db.execute('SELECT data FROM federated_data WHERE rowid = 2').fetchone()[0]
    db.execute('UPDATE federated_data SET data = ? WHERE rowid = 2', (blob[:len(blob) // 2],))
  else:
    x = np.ones((3, 27, 28), np.float32) if problem == 'shape' else np.ones((3, 28, 28), np.float32)
    if problem == 'bytes':  # 0..255 values, not the public files' [0, 1]
      x = np.full((3, 28, 28), 255, np.uint8)
    y = np.array([0, 62, 1], np.int32) if problem == 'labels' else np.zeros(3, np.int32)
    n = 5 if problem == 'count' else 3
    db.execute('UPDATE federated_data SET data = ?, num_examples = ? WHERE rowid = 1', (
        zlib.compress(msgpack.packb({'pixels': _ext_array(x), 'label': _ext_array(y)})), n))
  db.commit()
  db.close()
  return src, path


@pytest.mark.parametrize('problem,needle', [
    ('two_trains', 'old_emnist_train.sqlite hold the train split; give a --source with one'),
    ('table', 'no table federated_data'),
    ('truncated', 'corrupt data blob'),
    ('damaged_page', 'federated_emnist_train.sqlite: damaged past its start (database disk '
     'image is malformed); download the file again'),
    ('shape', 'pixels have shape (3, 27, 28); EMNIST clients need [N, 28, 28]'),
    ('labels', 'label 62 out of range; EMNIST-62 labels are integers 0..61'),
    ('bytes', 'pixel values span [255, 255]; EMNIST pixels are in [0, 1] in the public files'),
    ('count', 'num_examples is 5 but its features have'),
])
def test_bad_fedjax_files_are_refused_with_one_clear_error(tmp_path, problem, needle):
  src, path = _corrupt_fedjax(tmp_path, problem)
  with pytest.raises(DataError) as err:
    prepare(src, str(tmp_path / 'out'), fmt='fedjax_sqlite', task='emnist')
  assert needle in str(err.value) and path in str(err.value) and '\n' not in str(err.value)
  assert not os.path.exists(tmp_path / 'out') and not os.path.exists(tmp_path / 'out.partial')


def _varint(n: int) -> bytes:
  out = b''
  while n > 0x7F:
    out, n = out + bytes([n & 0x7F | 0x80]), n >> 7
  return out + bytes([n])


def _example_with_huge_label() -> bytes:
  """An Example of 784 pixels whose label's int64 varint holds 2**70 - 1 (10 bytes)."""
  from tensorflow_datasets.proto import tf_feature_pb2 as pb
  body = pb.Features(feature={'pixels': pb.Feature(
      float_list=pb.FloatList(value=[1.0] * 784))}).SerializeToString()
  int64_list = b'\x0a' + _varint(10) + b'\xff' * 9 + b'\x7f'  # packed value
  feature = b'\x1a' + _varint(len(int64_list)) + int64_list
  entry = b'\x0a\x05label\x12' + _varint(len(feature)) + feature
  body += b'\x0a' + _varint(len(entry)) + entry
  return b'\x0a' + _varint(len(body)) + body


def test_a_locked_sqlite_file_is_not_said_to_be_damaged(tmp_path):
  """'Download it again' is for a file SQLite finds malformed, not for one it finds locked."""
  from fathom_sim.data import sniff
  path = tmp_path / 'a.sqlite'
  write_tff(path, {'train': {'w1': [_tf_example(pixels=np.ones(784, np.float32), label=[3])]}})
  assert str(sniff.unreadable_sqlite(str(path), sqlite3.OperationalError('database is locked'),
                                     'lzma -d')) == (
      f'{path}: not a readable SQLite database (database is locked)')


@pytest.mark.parametrize('problem,needle', [
    ('compressed', 'not a readable SQLite database'),
    # a download cut short: it was said to need lzma -d
    ('cut_short', 'not a readable SQLite database (database disk image is malformed); it starts '
                  'as an SQLite file does, so it is damaged or cut short: download it again'),
    ('truncated', 'corrupt example proto'),
    ('count', 'has 2 examples but client_metadata says 3'),
    ('pixels', 'pixels have shape (2, 756); EMNIST clients need [N, 28, 28]'),
    # a writer of client_metadata with no examples was dropped without a word
    ('absent', "client_metadata lists 1 client(s) of split 'train' with no rows in examples "
               '(first: client w2, 4 examples listed)'),
    # said as 'client_metadata says None'
    ('unlisted', "client w1 has 1 example(s) in split 'train' but client_metadata does not list "
                 'it'),
    ('label_bytes', "labels are |S1 (e.g. np.bytes_(b'3')); EMNIST-62 labels are integers"),
    # a varint of 10 bytes: its bits past 64 drop, as in protobuf (it ended in OverflowError)
    ('overflow', 'label -1 out of range'),
    # its header and tables read well, a page of rows does not (sqlite3's traceback before)
    ('damaged_page', 'damaged past its start (database disk image is malformed)'),
    ('digits_only', "no train or test split found for --task=emnist (found []; passed over: "
                    "split 'digits_only_test', split 'digits_only_train')"),
])
def test_bad_tff_files_are_refused_with_one_clear_error(tmp_path, problem, needle):
  path = tmp_path / 'emnist.sqlite'
  good = _tf_example(pixels=np.ones(784, np.float32), label=[3])
  huge = _example_with_huge_label()
  if problem == 'compressed':
    path.write_bytes(b'\xfd7zXZ\x00' + bytes(100))  # an .lzma left compressed
  elif problem == 'cut_short':
    write_tff(path, {'train': {'w1': [good] * 20}, 'test': {'w1': [good]}})
    path.write_bytes(path.read_bytes()[:4106])
  elif problem == 'digits_only':
    write_tff(path, {'digits_only_train': {'w1': [good]}, 'digits_only_test': {'w1': [good]}})
  else:
    examples = {'truncated': [good, good[:-5]], 'count': [good, good], 'absent': [good],
                'unlisted': [good],
                'pixels': [_tf_example(pixels=np.ones(756, np.float32), label=[3])] * 2,
                'label_bytes': [_tf_example(pixels=np.ones(784, np.float32), label=[b'3'])],
                'overflow': [huge], 'damaged_page': [good] * 3}[problem]
    write_tff(path, {'train': {'w1': examples}, 'test': {'w1': [good]}})
    if problem == 'damaged_page':
      with open(path, 'r+b') as f:
        f.seek(3 * 4096)
        f.write(b'\xff' * 4096)
    db = sqlite3.connect(path)
    if problem == 'count':
      db.execute("UPDATE client_metadata SET num_examples = 3 WHERE split_name = 'train'")
    if problem == 'absent':
      db.execute("INSERT INTO client_metadata VALUES ('w2', 'train', 4)")
    if problem == 'unlisted':
      db.execute("UPDATE client_metadata SET client_id = 'w9' WHERE split_name = 'train'")
    db.commit()
    db.close()
  with pytest.raises(DataError) as err:
    prepare(str(path), str(tmp_path / 'out'), fmt='tff_sqlite', task='emnist')
  assert needle in str(err.value) and str(path) in str(err.value)
  assert not os.path.exists(tmp_path / 'out')


@pytest.mark.parametrize('problem,needle', [
    ('json', 'not a readable LEAF JSON file'),
    ('no_test', 'expected a LEAF directory with train.json and test.json'),
    ('labels', 'label -1 out of range'),
    ('str_labels', 'user a: "y" must be a list of whole-number labels, got ["3"]'),
    # zip() of users and a shorter num_samples dropped the last users without a word
    ('short_counts', '"num_samples" must list one count per user: 2 user(s), 1 count(s)'),
    ('users', '"users" must be a list of user ids (strings)'),
    # a JSON integer past float64: an OverflowError's traceback
    ('huge_pixel', 'user a: "x" must be lists of numbers (int too large to convert to float)'),
    # said as values to divide by 255 ('pixel values span [nan, nan]')
    ('null_pixel', 'client a: a pixel is NaN or infinite (a null in the file'),
    ('xml', 'not well-formed XML'),
    ('not_posts', 'expected a Stack Exchange Posts.xml'),
    ('post_id', "a row's Id is 'x1'; Posts.xml Ids are whole numbers"),
    # compared as text with the split date, a malformed date fell on either side, silently
    ('post_date', "the row of Id 1 has CreationDate 'garbage'; Posts.xml dates are "
                  'YYYY-MM-DDThh:mm:ss[.fff]'),
    ('post_date_zone', "the row of Id 1 has CreationDate '2015-01-01T00:00:00+02:00'"),
    ('post_day', "the row of Id 1 has CreationDate '2015-02-30T00:00:00.000'"),
])
def test_bad_leaf_and_posts_files_are_refused(tmp_path, problem, needle):
  src = tmp_path / 'leaf'
  src.mkdir()
  fmt, task = 'leaf_json', 'emnist'
  if problem == 'json':
    (src / 'train.json').write_text('{"users": ["a"], "user_data": {"a": {"x": [[1.0')
    (src / 'test.json').write_text('{}')
  elif problem == 'no_test':
    (src / 'train.json').write_text('{"users": [], "user_data": {}}')
  elif problem == 'labels':
    (src / 'train.json').write_text('{"users": ["a"], "num_samples": [1], "user_data": '
                                    '{"a": {"x": [[1.0]], "y": [-1]}}}'.replace(
                                        '[[1.0]]', str([[1.0] * 784])))
    (src / 'test.json').write_text('{"users": [], "user_data": {}}')
  elif problem in ('str_labels', 'short_counts', 'users'):
    user = {'x': [[0.5] * 784], 'y': ['3' if problem == 'str_labels' else 3]}
    (src / 'train.json').write_text(json.dumps(
        {'users': 'a' if problem == 'users' else ['a', 'b'],
         'num_samples': [1] if problem == 'short_counts' else [1, 1],
         'user_data': {'a': user, 'b': user}}))
    (src / 'test.json').write_text('{"users": [], "user_data": {}}')
  elif problem in ('huge_pixel', 'null_pixel'):
    (src / 'train.json').write_text('{"users": ["a"], "num_samples": [1], "user_data": '
                                    '{"a": {"x": [[%s]], "y": [3]}}}' % ', '.join(
                                        ['1' + '0' * 400 if problem == 'huge_pixel' else 'null']
                                        + ['0.5'] * 783))
    (src / 'test.json').write_text('{"users": [], "user_data": {}}')
  else:
    src = tmp_path / 'Posts.xml'
    src.write_text({'xml': '<posts><row Id="1" ', 'not_posts': '<users><row Id="1"/></users>',
                    'post_id': '<posts><row Id="x1" PostTypeId="1" OwnerUserId="5" '
                               'CreationDate="2015-01-01T00:00:00.000" Body="&lt;p&gt;Hi there'
                               '&lt;/p&gt;"/></posts>'}.get(problem) or (
        '<posts><row Id="1" PostTypeId="1" OwnerUserId="5" CreationDate="%s" Body="&lt;p&gt;'
        'Hi there&lt;/p&gt;"/></posts>' % {'post_date': 'garbage',
                                           'post_date_zone': '2015-01-01T00:00:00+02:00',
                                           'post_day': '2015-02-30T00:00:00.000'}[problem]))
    fmt, task = 'stackexchange_xml', 'stackoverflow'
  with pytest.raises(DataError) as err:
    prepare(str(src), str(tmp_path / 'out'), fmt=fmt, task=task)
  assert needle in str(err.value) and str(src) in str(err.value)


def _leaf_pair(src, user: dict, num_samples=None, users=('a',)) -> None:
  """A LEAF train.json with `user` as user a (and as any other of `users`), a test.json of
  one good user."""
  src.mkdir()
  good = {'x': [[0.5] * 784], 'y': [3]}
  (src / 'train.json').write_text(json.dumps({
      'users': ['a'], 'num_samples': num_samples or [1],
      'user_data': {u: user for u in users}}))
  (src / 'test.json').write_text(json.dumps({'users': ['a'], 'num_samples': [1],
                                             'user_data': {'a': good}}))


@pytest.mark.parametrize('problem,needle', [
    # len(y) of a number or null: a TypeError's traceback
    ('leaf_y_number', 'user a: "y" must be a list of whole-number labels, got 3'),
    ('leaf_y_null', 'user a: "y" must be a list of whole-number labels, got null'),
    # said 'label float64 out of range' of a label in range
    ('leaf_y_float', 'user a: "y" must be a list of whole-number labels, got [3.0]'),
    # parsed as pixels by np.asarray(..., float32), without a word
    ('leaf_x_strings', 'user a: "x" must be lists of numbers (they are strings)'),
    # said "num_samples says 1 but y has 1"
    ('leaf_count_string', 'user a: num_samples gives "1"; it lists whole numbers'),
    # dropped without a word
    ('leaf_unlisted', '"user_data" holds 1 user(s) with examples that "users" does not list '
                      '(first: b)'),
    # prepared, then refused by the run ("cohort_size must be at most ... (0)")
    ('leaf_no_examples', 'the 1 client(s) of its train split hold no examples'),
    # TFF parses tokens as one string: none was an empty sentence, several joined silently
    ('tff_no_tokens', "client w1: an example's tokens holds 0 values; TFF's Stack Overflow "
                      'examples hold one string'),
    ('tff_two_tokens', "client w1: an example's tokens holds 2 values"),
    ('tff_h5', "not a readable SQLite database (file is not a database); it is an HDF5 file "
               "(TFF's older .h5 release, which is not read"),
    ('tff_given_fedjax', 'it is a FedJAX .sqlite file: give --format=fedjax_sqlite'),
    ('tff_folder', 'a folder, not a file (expected a TFF .sqlite file'),
    ('fedjax_given_tff', 'it is a TFF .sqlite file: give --format=tff_sqlite'),
    # an OverflowError's traceback, inserting into SQLite
    ('posts_huge_id', "a row's Id is '99999999999999999999'; Posts.xml Ids are whole numbers "
                      '(of at most 64 bits)'),
    ('posts_bzip2', 'expected a Stack Exchange Posts.xml; it is bzip2-compressed: extract it '
                    'first (tar -xjf for a .tar.bz2, else bzip2 -d)'),
    # said 'no such file' of a file there
    ('posts_fifo', 'not a regular file (a FIFO, a socket or a device) (expected a Stack '
                   'Exchange Posts.xml)'),
])
def test_more_bad_source_files_are_refused_in_one_line(tmp_path, problem, needle):
  src, fmt, task = tmp_path / 'src', 'leaf_json', 'emnist'
  if problem.startswith('leaf_'):
    user = {'x': [[0.5] * 784], 'y': {'leaf_y_number': 3, 'leaf_y_null': None,
                                      'leaf_y_float': [3.0]}.get(problem, [3])}
    if problem == 'leaf_x_strings':
      user['x'] = [['0.5'] * 784]
    if problem == 'leaf_no_examples':
      user = {'x': [], 'y': []}
    _leaf_pair(src, user, num_samples=['1'] if problem == 'leaf_count_string' else (
        [0] if problem == 'leaf_no_examples' else None),
               users=('a', 'b') if problem == 'leaf_unlisted' else ('a',))
  elif problem.startswith('tff_'):
    fmt, task = 'tff_sqlite', 'stackoverflow'
    src = tmp_path / 'so.sqlite'
    if problem == 'tff_h5':
      src.write_bytes(b'\x89HDF\r\n\x1a\n' + bytes(200))
    elif problem == 'tff_given_fedjax':
      src = tmp_path / _fedjax_dir(tmp_path) / 'federated_emnist_train.sqlite'
    elif problem == 'tff_folder':
      src.mkdir()
    else:
      tokens = [] if problem == 'tff_no_tokens' else [b'a b', b'c']
      write_tff(src, {'train': {'w1': [_tf_example(tokens=tokens)]},
                      'test': {'w1': [_tf_example(tokens=[b'a b'])]}})
  elif problem == 'fedjax_given_tff':
    fmt, src = 'fedjax_sqlite', tmp_path / 'emnist_train.sqlite'
    write_tff(src, {'train': {'w1': [_tf_example(pixels=np.ones(784, np.float32), label=[3])]}})
  else:
    fmt, task, src = 'stackexchange_xml', 'stackoverflow', tmp_path / 'Posts.xml'
    if problem == 'posts_fifo':
      os.mkfifo(src)
    else:
      src.write_bytes(b'BZh91AY&SY' + bytes(50) if problem == 'posts_bzip2' else (
          b'<posts><row Id="99999999999999999999" PostTypeId="1" OwnerUserId="5" '
          b'CreationDate="2015-01-01T00:00:00.000" Body="&lt;p&gt;Hi there&lt;/p&gt;"/>'
          b'</posts>'))
  with pytest.raises(DataError) as err:
    prepare(str(src), str(tmp_path / 'out'), fmt=fmt, task=task)
  assert needle in str(err.value) and str(src) in str(err.value), str(err.value)
  assert '\n' not in str(err.value) and not os.path.exists(tmp_path / 'out')


@pytest.mark.parametrize('odd, needle', [
    # The index cut the NUL (numpy's str arrays drop trailing ones): the conversion ended
    # well, and every run then found record and index disagreeing, prepared again or not.
    ('f0\u0000', "client id 'f0\\x00' of its train split holds a NUL character"),
    # A 58-line TFDS traceback, exit status 1.
    ('f0\ud800', "client id 'f0\\ud800' of its train split is not valid Unicode (a lone "
                 'surrogate)'),
])
def test_client_ids_the_prepared_dataset_cannot_keep_are_refused(tmp_path, odd, needle):
  src = tmp_path / 'leaf'
  src.mkdir()
  user = {'x': [[0.5] * 784] * 2, 'y': [1, 2]}
  for split in ('train', 'test'):
    (src / f'{split}.json').write_text(json.dumps(
        {'users': [odd, 'f1'], 'num_samples': [2, 2], 'user_data': {odd: user, 'f1': user}}))
  with pytest.raises(DataError) as err:
    prepare(str(src), str(tmp_path / 'out'), fmt='leaf_json', task='emnist')
  assert str(err.value) == (f'{src}: {needle}; client ids must be distinct text without NUL '
                            'characters'), str(err.value)
  assert not os.path.exists(tmp_path / 'out') and not os.path.exists(tmp_path / 'out.partial')


def test_fedjax_ids_alike_once_their_prefixes_are_dropped_are_refused(tmp_path):
  """FedJAX's ids are '<16 hex digits>:<id>', read as <id>: two rows of one writer were
  prepared as two clients of the same id."""
  clients = emnist_clients(0, [3, 4])
  write_fedjax_emnist(tmp_path / 'src', clients, emnist_clients(1, [2]))
  db = sqlite3.connect(tmp_path / 'src' / 'federated_emnist_train.sqlite')
  first, second = sorted(clients)
  db.execute('UPDATE federated_data SET client_id = ? WHERE client_id = ?',
             (f'{1:016x}:{first}'.encode(), f'{1:016x}:{second}'.encode()))
  db.commit()
  db.close()
  with pytest.raises(DataError, match=f"client id '{first}' of its train split names two "
                                      'clients'):
    prepare(str(tmp_path / 'src'), str(tmp_path / 'out'), fmt='fedjax_sqlite', task='emnist')


def test_a_leaf_file_with_the_empty_entries_leafs_split_leaves_is_read(tmp_path):
  """LEAF's split_data.py makes an empty user_data entry for every user, then drops those with
  fewer than 2 samples from "users": such an entry is no unlisted data."""
  src = tmp_path / 'src'
  src.mkdir()
  good = {'x': [[0.5] * 784] * 2, 'y': [3, 4]}
  for split in ('train', 'test'):
    (src / f'{split}.json').write_text(json.dumps({
        'users': ['f0000'], 'num_samples': [2],
        'user_data': {'f0000': good, 'f0001': {'x': [], 'y': []}}}))
  meta = prepare(str(src), str(tmp_path / 'out'), fmt='leaf_json', task='emnist')
  assert _counts(meta)['train'] == {'clients': 1, 'examples': 2}


def test_a_word_count_file_with_a_byte_order_mark_or_still_compressed(tmp_path, caplog):
  """A BOM made the most frequent word '\\ufeffthe', and 'the' out of the vocabulary; TFF's
  stackoverflow.word_count.tar.bz2 given as it is said only 'can't decode byte'."""
  from fathom_sim.data.vocab import read_word_counts
  path = tmp_path / 'counts.txt'
  path.write_bytes('\ufeffthe 10\nbeer 9\nhops 8\n'.encode('utf-8'))
  with caplog.at_level('WARNING'):
    vocab = read_word_counts(str(path), 5)
  assert vocab.words[:3] == ['the', 'beer', 'hops']
  # a cut download: its fewer words said, not only in the summary's vocabulary size
  assert 'lists 3 words, fewer than the 5 asked for (--vocab_size)' in caplog.text
  path.write_bytes(b'BZh91AY&SY\xff\xfe' + bytes(50))
  with pytest.raises(DataError, match=r'cannot read the word-count file \(.*\); it is '
                                      r'bzip2-compressed: extract it first \(tar -xjf'):
    read_word_counts(str(path), 5)


@pytest.mark.parametrize('damage,needle', [
    ('meta_bytes', "not a prepared dataset ('utf-8' codec can't decode byte 0xe9"),
    ('meta_folder', 'not a prepared dataset ([Errno 21] Is a directory'),
    ('meta_splits', "meta.json: not the meta.json prepare_data.py writes (its \"splits\" gives "
                    '{"train": 5}'),
    ('info_cut', "split 'train' of the prepared dataset cannot be read ("),
])
def test_a_prepared_dataset_damaged_by_hand_is_a_data_error(tmp_path, damage, needle):
  """Each was a traceback (UnicodeDecodeError, AttributeError, protobuf's ParseError), or
  'no meta.json' with the commands to download the data."""
  out = tmp_path / 'out'
  prepare(_fedjax_dir(tmp_path), str(out), fmt='fedjax_sqlite', task='emnist')
  meta = out / 'meta.json'
  if damage == 'meta_bytes':
    meta.write_bytes(meta.read_bytes().replace(b'fedjax_sqlite', b'fedjax_sq\xe9ite'))
  elif damage == 'meta_folder':
    meta.unlink()
    meta.mkdir()
  elif damage == 'meta_splits':
    meta.write_text(json.dumps({**json.loads(meta.read_text()), 'splits': {'train': 5}}))
  else:
    info = glob.glob(str(out / '**' / 'dataset_info.json'), recursive=True)[0]
    with open(info, 'r+b') as f:
      f.truncate(100)
  before = sorted(glob.glob(str(out / '**'), recursive=True))
  with pytest.raises(DataError) as err:
    load_prepared('femnist', str(out))
  assert needle in str(err.value) and str(out) in str(err.value), str(err.value)
  assert sorted(glob.glob(str(out / '**'), recursive=True)) == before


def test_prepare_cli_summary_and_bad_input_exit(tmp_path):
  src = _fedjax_dir(tmp_path)
  cmd = [sys.executable, os.path.join(ROOT, 'launch', 'prepare_data.py'), '--format=fedjax_sqlite',
         '--task=emnist', f'--source={src}']
  ok = subprocess.run(cmd + [f'--out={tmp_path / "out"}'], capture_output=True, text=True)
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert 'train: 2 clients, 7 examples; examples per client min 3' in ok.stdout
  again = subprocess.run(cmd + [f'--out={tmp_path / "out"}'], capture_output=True, text=True)
  assert again.returncode == 2 and 'already exists and is not empty' in again.stderr
  _corrupt_fedjax(tmp_path / 'bad', 'labels')
  bad = subprocess.run(cmd[:-1] + [f'--source={tmp_path / "bad" / "src"}',
                                   f'--out={tmp_path / "out2"}'], capture_output=True, text=True)
  assert bad.returncode == 2 and not os.path.exists(tmp_path / 'out2')
  errors = [l for l in bad.stderr.splitlines() if l.startswith('error:')]
  assert len(errors) == 1 and 'label 62 out of range' in errors[0]


def test_paper_configs_and_missing_dataset_message(tmp_path):
  femnist, so = _load_config('femnist'), _load_config('stackoverflow')
  check_config(femnist)
  check_config(so)
  assert (femnist.cohort_size, femnist.eta, femnist.batch_size, femnist.upper_eta) == (
      10, 0.1, 20.0, 0.5)
  assert (so.cohort_size, so.eta, so.batch_size, so.upper_eta, so.model.name) == (
      50, 0.32, 16.0, 1.0, 'stackoverflow_lstm')
  # What FedJAX's EMNIST_CONV and STACKOVERFLOW_WORD tasks, which the reference ran, do.
  assert femnist.data.flip_pixels is True and so.model.expected_length == 13.3
  assert femnist.model.init == so.model.init == 'fedjax'  # Haiku's initial values
  so.data.data_dir = str(tmp_path / 'nowhere')
  with pytest.raises(DataError) as err:
    load_task(so.data)
  message = str(err.value)
  assert 'nowhere' in message and 'prepare_data.py' in message and 'curl' in message
  assert 'fedjax/stackoverflow/stackoverflow.word_count' in message  # every file's address
  assert f'--out={tmp_path / "nowhere"} ' in message and '\n' not in message
  # a folder holding the downloads: prepare_data.py writes only into a new or empty one
  downloads = tmp_path / 'downloads'
  downloads.mkdir()
  (downloads / 'stackoverflow_train.sqlite').write_bytes(b'')
  (downloads / 'stackoverflow.word_count').write_text('the 5\n')
  so.data.data_dir = str(downloads)
  with pytest.raises(DataError) as err:
    load_task(so.data)
  assert (f'python launch/prepare_data.py --format=fedjax_sqlite --task=stackoverflow '
          f'--source={downloads} --vocab={downloads / "stackoverflow.word_count"} '
          f'--out={downloads}_prepared, and give data.data_dir={downloads}_prepared'
          in str(err.value)), str(err.value)
  # a copy in another format that prepare_data.py reads: the command for that format
  leaf = tmp_path / 'leaf{x}'  # braces: the folder was once parsed as a format template
  leaf.mkdir()
  for split in ('train', 'test'):
    (leaf / f'{split}.json').write_text('{"users": [], "user_data": {}}')
  femnist.data.data_dir = str(leaf)
  with pytest.raises(DataError) as err:
    load_task(femnist.data)
  assert (f'from the leaf_json files there, python launch/prepare_data.py --format=leaf_json '
          f'--task=emnist --source={leaf} --out={leaf}_prepared, and give data.data_dir='
          f'{leaf}_prepared' in str(err.value)), str(err.value)
  # a file (a download, say): it suggested prepare_data.py --out=<that file>
  so.data.data_dir = str(downloads / 'stackoverflow_train.sqlite')
  with pytest.raises(DataError, match=r"stackoverflow_train.sqlite' is a file; give the folder "
                                      'that launch/prepare_data.py wrote'):
    load_task(so.data)
  femnist.data.data_dir = ''
  with pytest.raises(ConfigError, match='config.data.data_dir must be the prepared dataset'):
    check_config(femnist)


@pytest.mark.parametrize('problem', ['small_images', 'label_past_classes', 'label_wraps'])
def test_a_dataset_written_otherwise_is_checked_against_the_task(tmp_path, problem):
  """prepare_data.py checks what it converts; a dataset written by other code was trained on
  as it was: 14x14 images without a word, a label past the classes with a null loss each
  round and exit status 0."""
  r = np.random.default_rng(0)
  side = 14 if problem == 'small_images' else 28
  # int64 2**32 + 3 was cast to int32 before the check, and read as label 3: in range.
  labels = {'label_past_classes': [3, 70], 'label_wraps': [3, 2**32 + 3]}.get(problem, [3, 4])
  label_type = 'int64' if problem == 'label_wraps' else 'int32'
  clients = [(f'c{i}', {'x': r.random((2, side, side), np.float32),
                        'y': np.array([label, 0], label_type)}) for i, label in enumerate(labels)]
  out = str(tmp_path / 'femnist')
  tfds_store.write(out, {'train': iter(clients), 'test': iter(clients[:1])},
                   {'x': ((side, side), 'float32'), 'y': ((), label_type)},
                   {'task': 'emnist', 'format': 'other', 'source': 'elsewhere',
                    'num_classes': 62})
  if problem == 'small_images':
    with pytest.raises(DataError) as e:
      load_prepared('femnist', out)
    assert str(e.value) == (
        f"data.data_dir {out!r}: its examples are {{'x': ((14, 14), 'float32'), 'y': ((), "
        "'int32')}; the femnist task reads x (28, 28) of floats, y () of integers per "
        'example; prepare it again with launch/prepare_data.py')
  else:
    train = load_prepared('femnist', out).train
    train.client(0)
    with pytest.raises(DataError) as e:
      train.client(1)
    assert str(e.value) == (f'{out}: record 1 of split train (client c1) holds target '
                            f'{labels[1]}, outside the 62 classes its meta.json gives; prepare '
                            'the dataset again')


@pytest.mark.parametrize('damage', ['truncate', 'remove'])
def test_a_shard_missing_or_cut_before_the_run_is_refused_when_the_data_is_opened(tmp_path,
                                                                                    damage):
  """It was met by the round that first drew one of its clients: round 15 of a test run."""
  out = str(tmp_path / 'femnist')
  prepare(os.path.join(DATA, 'femnist_leaf_sample'), out, fmt='leaf_json', task='emnist')
  shard = os.path.join(out, 'tfds', 'federated_clients', '1.0.0',
                       'federated_clients-test.array_record-00000-of-00001')
  if damage == 'truncate':
    os.truncate(shard, 1000)
  else:
    os.remove(shard)
  with pytest.raises(DataError) as e:
    load_prepared('femnist', out)
  assert str(e.value).startswith(f'{out}: federated_clients-test.array_record-00000-of-00001 '
                                 'of split test is damaged or missing (its records: ')
  assert str(e.value).endswith('the dataset lists 5); prepare the dataset again with '
                               'launch/prepare_data.py')


@pytest.mark.parametrize('damage', ['flip', 'truncate', 'remove'])
def test_a_damaged_record_file_is_a_data_error_naming_the_record(tmp_path, damage):
  """array_record's own errors (a chunk's hash, a short file, a missing shard) came out as a
  RuntimeError traceback from the first client read."""
  out = str(tmp_path / 'femnist')
  prepare(os.path.join(DATA, 'femnist_leaf_sample'), out, fmt='leaf_json', task='emnist')
  task = load_prepared('femnist', out)
  shards = [os.path.join(root, name) for root, _, names in os.walk(out) for name in names
            if '-train.array_record' in name]
  assert len(shards) == 1
  if damage == 'flip':  # a byte inside the records: array_record's chunk hash catches it
    with open(shards[0], 'r+b') as f:
      f.seek(500)  # past the file's 64-byte signature chunk, in the first records' chunk
      byte = f.read(1)[0]
      f.seek(-1, os.SEEK_CUR)
      f.write(bytes([byte ^ 0xFF]))
  elif damage == 'truncate':
    os.truncate(shards[0], 1000)
  else:
    os.remove(shards[0])
  with pytest.raises(DataError, match=r'record \d of split train \(client f\w+\) cannot be '
                     r'read .* prepare the dataset again'):
    for i in range(len(task.train.client_ids)):
      task.train.client(i)


def test_an_evaluation_that_counts_no_token_is_nan_not_an_error():
  """Sampled test clients whose every target is eos (or, for accuracy_no_oov, out of
  vocabulary) count nothing: NaN, as an evaluation of no clients, instead of a
  ZeroDivisionError that would end the run at an evaluation round."""
  from fathom_sim.data.federated import ArrayClientDataset
  model = models.get_model('lstm', num_classes=9, hidden=(4, 6, 5))
  y = np.array([[2, 0, 0], [8, 2, 0]], np.int32)  # eos and pad only; then oov, eos, pad
  data = ArrayClientDataset({'x': np.ones_like(y), 'y': y}, np.array([0, 1, 2]),
                            np.array(['a', 'b']))
  params = model.init(jax.random.key(1), data.client(0))
  evaluate = make_evaluator(model, make_mesh(1), 4)
  only_eos = evaluate(params, data, [0])
  assert only_eos['count'] == 0 and np.isnan(only_eos['accuracy'])
  assert np.isfinite(only_eos['loss'])  # eos targets count in the loss
  only_oov = evaluate(params, data, [1])
  assert only_oov['count'] == 1 and np.isnan(only_oov['accuracy_no_oov'])
  assert only_oov['accuracy_in_vocab'] == 0.0  # an oov target is never predicted


def test_a_scratch_folder_left_by_a_killed_conversion_is_replaced_and_a_users_is_kept(tmp_path):
  """<out>.partial is where a conversion writes before renaming it to <out>. One left by a
  killed conversion (it holds the mark) is cleared; a user's folder of that name is refused,
  never deleted."""
  source = os.path.join(DATA, 'femnist_leaf_sample')
  out = tmp_path / 'femnist'
  mine = tmp_path / 'femnist.partial'
  mine.mkdir()
  (mine / 'notes.txt').write_text('mine')
  with pytest.raises(DataError, match='femnist.partial.* exists and was not made by a '
                     'conversion; move it away'):
    prepare(source, str(out), fmt='leaf_json', task='emnist')
  assert (mine / 'notes.txt').read_text() == 'mine' and not out.exists()
  (mine / 'notes.txt').unlink()
  (mine / '.fathom_sim_partial').write_text('')  # as a killed conversion leaves it
  prepare(source, str(out), fmt='leaf_json', task='emnist')
  assert not mine.exists() and not (out / '.fathom_sim_partial').exists()
  assert os.listdir(tmp_path) == ['femnist']  # the killed one's folder gone, under any name
  assert load_prepared('femnist', str(out)).train.client(0)['x'].shape == (11, 28, 28)


def test_a_conversion_into_an_out_another_one_is_writing_is_refused_and_leaves_it_be(tmp_path):
  """A second command into the same --out deleted the first one's scratch folder mid-write;
  the folder is held (flock) while a conversion lives, and a live holder is refused."""
  source = os.path.join(DATA, 'femnist_leaf_sample')
  out = str(tmp_path / 'femnist')
  with tfds_store.claimed(out) as partial:  # a conversion under way (flock: per open file)
    (tmp_path / 'femnist.partial' / 'train.shard0.tmp').write_text('half')
    with pytest.raises(DataError) as e:
      prepare(source, out, fmt='leaf_json', task='emnist')
    assert str(e.value) == (f'--out {out!r}: another conversion is writing it now (in '
                            f'{partial!r}); wait for it to finish, or choose another --out')
    assert (tmp_path / 'femnist.partial' / 'train.shard0.tmp').read_text() == 'half'
  prepare(source, out, fmt='leaf_json', task='emnist')  # no longer held: a left folder, cleared
  assert not os.path.exists(partial)
  assert load_prepared('femnist', out).train.client(0)['x'].shape == (11, 28, 28)


@pytest.mark.parametrize('where', ['link', 'cwd'])
def test_an_out_that_cannot_be_replaced_is_refused_before_reading(tmp_path, monkeypatch, where):
  """The dataset is built beside --out and renamed into place: a link to an empty folder (or
  a mount point) and the current directory were found after the whole conversion, in a
  traceback. The source here is not even readable: --out is refused first."""
  (tmp_path / 'empty').mkdir()
  if where == 'link':
    os.symlink(tmp_path / 'empty', tmp_path / 'out')
    out, what = str(tmp_path / 'out'), 'a symbolic link'
  else:
    monkeypatch.chdir(tmp_path / 'empty')
    out, what = '.', 'the current directory'
  (tmp_path / 'train.json').write_text('{not json')
  (tmp_path / 'test.json').write_text('{not json')
  with pytest.raises(DataError) as e:
    prepare(str(tmp_path), out, fmt='leaf_json', task='emnist')
  assert str(e.value) == (f'--out {out!r} is {what}, which the conversion cannot replace with '
                          'the folder it builds beside it; give a new folder inside it, e.g. '
                          f'--out={os.path.join(out, "prepared")}')
  assert os.listdir(tmp_path / 'empty') == [] and not (tmp_path / 'out.partial').exists()


def test_a_full_disk_while_writing_is_an_output_error_and_leaves_nothing(tmp_path, monkeypatch):
  from array_record.python import array_record_module
  from fathom_sim.errors import OutputError

  class FullDisk:
    def __init__(self, path, options):
      pass

    def write(self, record):
      raise RuntimeError('write() failed: No space left on device')

  monkeypatch.setattr(array_record_module, 'ArrayRecordWriter', FullDisk)
  out = str(tmp_path / 'femnist')
  with pytest.raises(OutputError) as e:
    prepare(os.path.join(DATA, 'femnist_leaf_sample'), out, fmt='leaf_json', task='emnist')
  assert str(e.value).startswith(f'--out {out!r}: ') and str(e.value).endswith(
      'train.shard0.tmp cannot be written (write() failed: No space left on device); nothing '
      'is left at --out')
  assert os.listdir(tmp_path) == []


def test_the_same_files_prepared_twice_give_the_same_bytes(tmp_path):
  """Records were serialized with their proto map in an order that varies between processes,
  and the client index stamped with the time: two conversions of one input differed."""
  outs = [str(tmp_path / f'femnist{i}') for i in range(2)]
  for out in outs:  # each in its own process: the order varied from one to the next
    code = ('from fathom_sim.data.prepare import prepare\n'
            f"prepare({os.path.join(DATA, 'femnist_leaf_sample')!r}, {out!r}, fmt='leaf_json', "
            "task='emnist')\n")
    p = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, JAX_PLATFORMS='cpu'))
    assert p.returncode == 0, p.stderr[-2000:]

  def files(out):
    found = {}
    for root, _, names in os.walk(out):
      for name in names:
        with open(os.path.join(root, name), 'rb') as f:
          found[os.path.relpath(os.path.join(root, name), out)] = f.read()
    return found

  first, second = files(outs[0]), files(outs[1])
  assert sorted(first) == sorted(second) and len(first) > 4
  differ = [name for name in first if first[name] != second[name]]
  assert differ == [], differ


def test_the_lstm_is_a_plain_lstm_whose_forget_gate_starts_at_bias_one():
  """The next-word model against a numpy unroll of the textbook LSTM on the same weights
  (random biases too, so each gate's parameters are told apart), and its initial forget-gate
  bias of 1 (TFF's unit_forget_bias, FedJAX's Haiku +1), every other bias 0."""
  num_ids, (e, hdim, d) = 9, (4, 6, 5)
  model = models.get_model('lstm', num_classes=num_ids, hidden=(e, hdim, d))
  x = np.array([[1, 3, 8, 4, 0], [1, 5, 6, 7, 3]], np.int32)
  params = model.init(jax.random.key(0), {'x': x, 'y': x})
  cell = params['OptimizedLSTMCell_0']
  np.testing.assert_array_equal(cell['hf']['bias'], np.ones(hdim))
  for gate in ('hi', 'hg', 'ho'):
    np.testing.assert_array_equal(cell[gate]['bias'], np.zeros(hdim))
  r = np.random.default_rng(0)
  params = jax.tree.map(lambda a: np.asarray(a) + 0.3 * r.standard_normal(a.shape), params)
  cell = params['OptimizedLSTMCell_0']
  sig = lambda z: 1 / (1 + np.exp(-z))
  gate = lambda g, inp, h: inp @ cell['i' + g]['kernel'] + h @ cell['h' + g]['kernel'] + (
      cell['h' + g]['bias'])
  h, c = np.zeros((2, hdim)), np.zeros((2, hdim))
  outs = []
  for t in range(x.shape[1]):
    inp = params['Embed_0']['embedding'][x[:, t]]
    i, f = sig(gate('i', inp, h)), sig(gate('f', inp, h))
    g, o = np.tanh(gate('g', inp, h)), sig(gate('o', inp, h))
    c = f * c + i * g
    h = o * np.tanh(c)
    dense = np.tanh(h) @ params['Dense_0']['kernel'] + params['Dense_0']['bias']  # FedJAX's tanh
    outs.append(dense @ params['Dense_1']['kernel'] + params['Dense_1']['bias'])
  want = np.stack(outs, axis=1)
  got = models.NextWordLSTM(num_ids, e, hdim, d).apply({'params': params}, x)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)
