"""Public dataset formats: independent writers here, the readers of fathom_sim read them back.

The writers encode msgpack extension types and tf.train.Example protos themselves (the protos
with TFDS's generated protobuf classes), so the readers are checked against the formats, not
against themselves.
"""

import json
import os
import re
import sqlite3
import zlib

import msgpack
import numpy as np
import pytest
from tensorflow_datasets.proto import tf_example_pb2, tf_feature_pb2

from fathom_sim.data import DataError
from fathom_sim.data.fedjax_sqlite import decode
from fathom_sim.data.prepare import prepare
from fathom_sim.data.prepared import load_prepared
from fathom_sim.data.tf_example import parse_example
from fathom_sim.data.tfds_store import LAYOUT_VERSION
from fathom_sim.data.vocab import html_sentences, tokenize

WORDS = ['the', 'beer', 'hops', 'is', 'good', '?']  # vocabulary order = frequency order
IDS = {w: i + 3 for i, w in enumerate(WORDS)}
OOV = len(WORDS) + 3


# ---- independent writers ------------------------------------------------------------------


def _counts(meta):
  """meta.json's splits without their records' digests (tests of those: test_real_data)."""
  return {name: {k: v for k, v in split.items() if k != 'records_sha256'}
          for name, split in meta['splits'].items()}


def _ext_array(a: np.ndarray) -> msgpack.ExtType:
  return msgpack.ExtType(1, msgpack.packb([list(a.shape), a.dtype.name, a.tobytes('C')]))


def _ext_scalar(v: np.generic) -> msgpack.ExtType:
  # As flax's serialization (which FedJAX uses) packs a numpy scalar: a 0-d array's fields.
  return msgpack.ExtType(3, msgpack.packb([[], v.dtype.name, v.tobytes()]))


def _ext_bytes(items: list) -> msgpack.ExtType:
  return msgpack.ExtType(4, msgpack.packb([[len(items)], list(items)]))


def write_fedjax(path, clients: dict, *, table='federated_data'):
  db = sqlite3.connect(path)
  db.execute(f'CREATE TABLE {table} (client_id BLOB NOT NULL PRIMARY KEY, data BLOB NOT NULL, '
             'num_examples INTEGER NOT NULL)')
  for i, (cid, (blob_features, n)) in enumerate(clients.items()):
    blob = zlib.compress(msgpack.packb(blob_features))
    db.execute(f'INSERT INTO {table} VALUES (?, ?, ?)', (f'{i:016x}:{cid}'.encode(), blob, n))
  db.commit()
  db.close()


def emnist_clients(seed, sizes):
  r = np.random.default_rng(seed)
  return {f'f{seed}{i:03d}_{n:02d}': (r.random((n, 28, 28), np.float32),
                                      r.integers(0, 62, n).astype(np.int32))
          for i, n in enumerate(sizes)}


def write_fedjax_emnist(folder, train, test):
  os.makedirs(folder, exist_ok=True)
  for split, clients in (('train', train), ('test', test)):
    write_fedjax(os.path.join(folder, f'federated_emnist_{split}.sqlite'),
                 {c: ({'pixels': _ext_array(x), 'label': _ext_array(y)}, len(y))
                  for c, (x, y) in clients.items()})


def _tf_example(**features) -> bytes:
  f = {}
  for name, value in features.items():
    if isinstance(value, list) and value and isinstance(value[0], bytes):
      f[name] = tf_feature_pb2.Feature(bytes_list=tf_feature_pb2.BytesList(value=value))
    elif np.asarray(value).dtype.kind == 'f':
      f[name] = tf_feature_pb2.Feature(float_list=tf_feature_pb2.FloatList(value=list(value)))
    else:
      f[name] = tf_feature_pb2.Feature(
          int64_list=tf_feature_pb2.Int64List(value=[int(v) for v in value]))
  return tf_example_pb2.Example(features=tf_feature_pb2.Features(feature=f)).SerializeToString()


def write_tff(path, splits: dict):
  """splits: name -> {client: [serialized examples]}."""
  db = sqlite3.connect(path)
  db.execute('CREATE TABLE examples (split_name TEXT NOT NULL, client_id TEXT NOT NULL, '
             'serialized_example_proto BLOB NOT NULL)')
  db.execute('CREATE TABLE client_metadata (client_id TEXT NOT NULL, split_name TEXT NOT NULL, '
             'num_examples INTEGER NOT NULL)')
  for split, clients in splits.items():
    for cid, examples in clients.items():
      db.execute('INSERT INTO client_metadata VALUES (?, ?, ?)', (cid, split, len(examples)))
      db.executemany('INSERT INTO examples VALUES (?, ?, ?)',
                     [(split, cid, e) for e in examples])
  db.commit()
  db.close()


def expected_sequences(sentence: str, length=20):
  # FedJAX's and TFF's tokenizers split on ' ' exactly (tf.strings.split(tokens, sep=' ')).
  ids = [IDS.get(w, OOV) for w in sentence.split(' ')]
  x = ([1] + ids)[:length]
  y = (ids + [2])[:length]
  return x + [0] * (length - len(x)), y + [0] * (length - len(y))


def write_vocab(path):
  with open(path, 'w') as f:
    f.write(''.join(f'{w} {1000 - i}\n' for i, w in enumerate(WORDS)))


def assert_emnist_roundtrip(task, train, test):
  for dataset, clients in ((task.train, train), (task.test, test)):
    assert list(dataset.client_ids) == list(clients)
    np.testing.assert_array_equal(dataset.num_examples, [len(y) for _, y in clients.values()])
    for i, (x, y) in enumerate(clients.values()):
      got = dataset.client(i)
      np.testing.assert_array_equal(got['x'], x.reshape(-1, 28, 28))
      np.testing.assert_array_equal(got['y'], y)
      assert got['x'].dtype == np.float32 and got['y'].dtype == np.int32


# ---- the formats, read back exactly -------------------------------------------------------

def test_msgpack_extension_types_decode():
  a = np.arange(6, dtype=np.int16).reshape(2, 3)
  blob = zlib.compress(msgpack.packb({'a': _ext_array(a), 's': _ext_scalar(np.float64(2.5)),
                                      'b': _ext_bytes([b'x y', b'z'])}))
  got = decode(blob)
  np.testing.assert_array_equal(got['a'], a)
  assert got['a'].dtype == np.int16 and got['s'] == 2.5 and got['s'].dtype == np.float64
  assert got['b'].dtype == object and list(got['b']) == [b'x y', b'z']


def test_fedjax_emnist_reads_back_exactly(tmp_path):
  train, test = emnist_clients(1, [3, 7, 1, 12]), emnist_clients(2, [2, 5, 4])
  write_fedjax_emnist(tmp_path / 'src', train, test)
  # The README downloads both tasks into one folder: the other task's files are not read.
  write_fedjax(tmp_path / 'src' / 'stackoverflow_train.sqlite',
               {'u1': ({'tokens': _ext_bytes([b'a b'])}, 1)})
  # Nor FedJAX's 10-class digits-only EMNIST, another task.
  digits = tmp_path / 'digits'
  write_fedjax_emnist(digits, *[{c: (x, y % 10) for c, (x, y) in emnist_clients(s, [4]).items()}
                                for s in (3, 4)])
  for split in ('train', 'test'):
    os.rename(digits / f'federated_emnist_{split}.sqlite',
              tmp_path / 'src' / f'federated_emnist_digitsonly_{split}.sqlite')
  meta = prepare(str(tmp_path / 'src'), str(tmp_path / 'out'), fmt='fedjax_sqlite',
                 task='emnist')
  assert _counts(meta) == {'train': {'clients': 4, 'examples': 23},
                           'test': {'clients': 3, 'examples': 11}}
  assert_emnist_roundtrip(load_prepared('femnist', str(tmp_path / 'out')), train, test)
  # Given alone, the digits-only files are refused, not taken as the 62-class task.
  from fathom_sim.data import DataError
  for split in ('train', 'test'):
    os.rename(tmp_path / 'src' / f'federated_emnist_digitsonly_{split}.sqlite',
              digits / f'federated_emnist_digitsonly_{split}.sqlite')
  with pytest.raises(DataError, match="digits-only EMNIST \\(10 classes\\) is not the FEMNIST "
                     'task'):
    prepare(str(digits), str(tmp_path / 'out_digits'), fmt='fedjax_sqlite', task='emnist')
  assert not os.path.exists(tmp_path / 'out_digits')


@pytest.mark.parametrize('fmt', ['fedjax_sqlite', 'leaf_json'])
def test_a_split_without_clients_is_one_data_error_and_leaves_nothing(tmp_path, fmt):
  """An empty test table (FedJAX) or users list (LEAF) reached TFDS's metadata writer, whose
  ValueError named no file and went out as a traceback."""
  train = emnist_clients(1, [3, 7])
  if fmt == 'fedjax_sqlite':
    write_fedjax_emnist(tmp_path / 'src', train, {})
  else:
    _write_leaf(tmp_path / 'src', {'train': train, 'test': {}})
  with pytest.raises(DataError, match=f"^{re.escape(str(tmp_path / 'src'))}: its test split holds no clients"):
    prepare(str(tmp_path / 'src'), str(tmp_path / 'out'), fmt=fmt, task='emnist')
  assert sorted(os.listdir(tmp_path)) == ['src']  # neither --out nor its scratch folder


def test_a_record_that_disagrees_with_the_index_is_named(tmp_path):
  """Rounds are planned from clients-<split>.npz's counts: a record holding another number of
  examples is a DataError naming the folder, the record and both counts, not a shape error
  later."""
  from fathom_sim.data import DataError
  train, test = emnist_clients(1, [3, 7]), emnist_clients(2, [2])
  write_fedjax_emnist(tmp_path / 'src', train, test)
  out = str(tmp_path / 'out')
  prepare(str(tmp_path / 'src'), out, fmt='fedjax_sqlite', task='emnist')
  index = os.path.join(out, 'clients-train.npz')
  with np.load(index) as f:
    ids, counts = f['client_ids'], f['num_examples']
  np.savez(index, client_ids=ids, num_examples=counts + [1, -1])  # the same total
  task = load_prepared('femnist', out)
  with pytest.raises(DataError, match=r'record 1 of split train .* holds 7 inputs and 7 '
                     r'targets, the index says 6 examples'):
    task.train.client(1)


@pytest.mark.parametrize('damage', ['more_counts', 'other_total', 'negative', 'strings', 'cut',
                                    'empty'])
def test_a_clients_index_that_is_damaged_or_disagrees_is_refused_when_the_data_is_opened(
    tmp_path, damage):
  """clients-<split>.npz: a count past the ids made sampling draw a client that is not
  there, hours into a run; a cut or empty file was a zipfile traceback naming no file."""
  from fathom_sim.data import DataError
  write_fedjax_emnist(tmp_path / 'src', emnist_clients(1, [3, 7]), emnist_clients(2, [2]))
  out = str(tmp_path / 'out')
  prepare(str(tmp_path / 'src'), out, fmt='fedjax_sqlite', task='emnist')
  index = os.path.join(out, 'clients-train.npz')
  with np.load(index) as f:
    ids, counts = f['client_ids'], f['num_examples']
  if damage in ('cut', 'empty'):
    os.truncate(index, 0 if damage == 'empty' else os.path.getsize(index) // 2)
    needle = f'{index} cannot be read ('
  else:
    counts = {'more_counts': np.r_[counts, 0], 'other_total': counts + [0, 1],
              'negative': counts + [10, -10], 'strings': counts.astype(str)}[damage]
    np.savez(index, client_ids=ids, num_examples=counts)
    total = '' if damage == 'strings' else f', summing to {counts.sum()}'
    needle = (f'{index}: num_examples ({counts.dtype} ({len(counts)},){total}) must be one '
              'count >= 0 per client id (2), summing to the 10 examples meta.json gives; '
              'prepare the dataset again')
  with pytest.raises(DataError) as e:
    load_prepared('femnist', out)
  assert str(e.value).startswith(needle), str(e.value)


def test_fedjax_stackoverflow_reads_back_exactly(tmp_path):
  sentences = {'u1': ['the beer is good ?', 'hops'],
               'u2': ['unknown words the beer ' * 6],  # longer than 20 tokens: cut
               # '' and 'beer\xa0is': out of vocab; an empty sentence is one empty word, as
               # TF's split with sep=' ' (StringSplitV2 returns [''], like Python's split)
               'u3': ['is', 'the  beer\xa0is good', '']}
  os.makedirs(tmp_path / 'src')
  for split in ('train', 'held_out', 'test'):
    write_fedjax(tmp_path / 'src' / f'stackoverflow_{split}.sqlite', {
        c: ({'tokens': _ext_bytes([t.encode() for t in s]),
             'score': _ext_array(np.arange(len(s), dtype=np.int64)),
             'title': _ext_bytes([b'title'] * len(s))}, len(s))
        for c, s in sentences.items()})
  write_vocab(tmp_path / 'wc')
  meta = prepare(str(tmp_path / 'src'), str(tmp_path / 'out'), fmt='fedjax_sqlite',
                 task='stackoverflow', vocab_path=str(tmp_path / 'wc'))
  assert meta['num_classes'] == len(WORDS) + 4 and set(meta['splits']) == {
      'train', 'held_out', 'test'}
  task = load_prepared('stackoverflow', str(tmp_path / 'out'))
  assert task.num_classes == len(WORDS) + 4
  for i, (cid, ss) in enumerate(sentences.items()):
    assert task.test.client_ids[i] == cid
    got = task.test.client(i)
    want = [expected_sequences(s) for s in ss]
    np.testing.assert_array_equal(got['x'], [w[0] for w in want])
    np.testing.assert_array_equal(got['y'], [w[1] for w in want])
  assert list(task.test.client(2)['x'][1][:6]) == [1, IDS['the'], OOV, OOV, IDS['good'], 0]
  assert list(task.test.client(2)['x'][2][:3]) == [1, OOV, 0]
  assert list(task.test.client(2)['y'][2][:3]) == [OOV, 2, 0]


def test_fedjax_stackoverflow_tokens_that_are_not_sentences_are_refused(tmp_path):
  """Token ids where the sentences belong: an AttributeError's traceback ('numpy.int64' object
  has no attribute 'split') from the vocabulary's count."""
  from fathom_sim.data import DataError
  os.makedirs(tmp_path / 'src')
  for split in ('train', 'test'):
    write_fedjax(tmp_path / 'src' / f'stackoverflow_{split}.sqlite', {
        'u1': ({'tokens': _ext_array(np.array([4, 7, 9], np.int64))}, 3)})
  with pytest.raises(DataError, match=r'stackoverflow_(train|test).sqlite: client u1: tokens '
                     r'must hold sentences as bytes or strings, found int64 np.int64\(4\)'):
    prepare(str(tmp_path / 'src'), str(tmp_path / 'out'), fmt='fedjax_sqlite',
            task='stackoverflow')
  assert not os.path.exists(tmp_path / 'out')


def test_tf_example_parser_matches_protobuf():
  blob = _tf_example(pixels=np.linspace(0, 1, 784, dtype=np.float32), label=[61],
                     neg=[-3, 2**40], tokens=[b'a b', b''])
  got = parse_example(blob)
  np.testing.assert_array_equal(got['pixels'], np.linspace(0, 1, 784, dtype=np.float32))
  assert got['label'].tolist() == [61] and got['neg'].tolist() == [-3, 2**40]
  assert got['tokens'] == [b'a b', b'']
  # Unpacked repeated int64 (wire type 0) is valid protobuf too: Int64List 5, 7 in key 'k'.
  int64_list = bytes([0x08, 0x05, 0x08, 0x07])
  feature = bytes([0x1a, len(int64_list)]) + int64_list
  entry = bytes([0x0a, 0x01]) + b'k' + bytes([0x12, len(feature)]) + feature
  features = bytes([0x0a, len(entry)]) + entry
  example = bytes([0x0a, len(features)]) + features
  assert parse_example(example)['k'].tolist() == [5, 7]
  with pytest.raises(ValueError, match='truncated'):
    parse_example(blob[:-3])


def test_tf_example_parser_refuses_a_varint_where_bytes_belong():
  """A damaged proto whose map key or value, or Feature list, is a varint: taken as a length,
  bytes(n) made n zero bytes (a key of 5 NULs, or the host's memory for a large n)."""
  def varint(n):
    out = bytearray()
    while n > 0x7F:
      out.append(n & 0x7F | 0x80)
      n >>= 7
    return bytes(out) + bytes([n])

  def field(number, payload):
    return varint(number << 3 | 2) + varint(len(payload)) + payload

  def example(entry):
    return field(1, field(1, entry))

  int64_list = field(3, bytes([0x08, 0x05]))
  assert parse_example(example(field(1, b'k') + field(2, int64_list)))['k'].tolist() == [5]
  key = field(1, b'k')
  for entry, said in [
      (varint(1 << 3) + varint(2**62) + field(2, int64_list), 'key has wire type 0, not 2'),
      (key + varint(2 << 3) + varint(5), 'value has wire type 0, not 2'),
      (key + field(2, varint(3 << 3) + varint(2**62)), 'list has wire type 0, not 2'),
      # a fixed64 in a FloatList was read as two floats; a varint there, a TypeError
      (key + field(2, field(2, bytes([0x09]) + bytes(8))), 'FloatList value has wire type 1'),
      (key + field(2, field(2, bytes([0x08, 0x05]))), 'FloatList value has wire type 0'),
      (key + field(2, field(3, bytes([0x0d]) + bytes(4))), 'Int64List value has wire type 5')]:
    with pytest.raises(ValueError, match=said):
      parse_example(example(entry))


def test_tff_emnist_and_stackoverflow_read_back_exactly(tmp_path):
  train, test = emnist_clients(3, [4, 9, 2]), emnist_clients(4, [3, 1])
  digits = emnist_clients(5, [6])
  # emnist_all.sqlite's split names: the 62-class all_* are FEMNIST; digits_only_* are not read.
  write_tff(tmp_path / 'emnist.sqlite', {
      split: {c: [_tf_example(pixels=x[k].reshape(-1), label=[y[k]]) for k in range(len(y))]
              for c, (x, y) in clients.items()}
      for split, clients in (('all_train', train), ('all_test', test),
                             ('digits_only_train', digits), ('digits_only_test', digits))})
  prepare(str(tmp_path / 'emnist.sqlite'), str(tmp_path / 'e'), fmt='tff_sqlite', task='emnist')
  # TFF lists clients sorted by id; these ids are already in sorted order.
  assert_emnist_roundtrip(load_prepared('femnist', str(tmp_path / 'e')), train, test)

  so = {'b': ['the hops ?', 'good beer'], 'a': ['zzz the']}
  write_tff(tmp_path / 'so.sqlite', {split: {c: [_tf_example(tokens=[s.encode()], score=[1])
                                                 for s in ss] for c, ss in so.items()}
                                     for split in ('train', 'heldout', 'test')})
  write_vocab(tmp_path / 'wc')
  prepare(str(tmp_path / 'so.sqlite'), str(tmp_path / 's'), fmt='tff_sqlite',
          task='stackoverflow', vocab_path=str(tmp_path / 'wc'))
  task = load_prepared('stackoverflow', str(tmp_path / 's'))
  assert list(task.train.client_ids) == ['a', 'b']
  got = task.train.client(1)
  np.testing.assert_array_equal(got['x'], [expected_sequences(s)[0] for s in so['b']])
  np.testing.assert_array_equal(got['y'], [expected_sequences(s)[1] for s in so['b']])


def test_sources_whose_paths_hold_uri_characters_or_commas_are_read(tmp_path):
  """A '#', '?' or '%' in a folder's name cut the SQLite URI (the path after '#' was dropped,
  and an empty database created at what was left); a '[' made the folder's glob match nothing;
  a comma in a folder's name made the check of --source look for the path before it."""
  train, test = emnist_clients(6, [3, 2]), emnist_clients(7, [2])
  odd = tmp_path / 'a#b?c%41 d[1]'
  write_fedjax_emnist(odd, train, test)
  prepare(str(odd), str(tmp_path / 'f'), fmt='fedjax_sqlite', task='emnist')
  assert_emnist_roundtrip(load_prepared('femnist', str(tmp_path / 'f')), train, test)
  write_tff(odd / 'emnist.sqlite', {
      split: {c: [_tf_example(pixels=x[k].reshape(-1), label=[y[k]]) for k in range(len(y))]
              for c, (x, y) in clients.items()}
      for split, clients in (('all_train', train), ('all_test', test))})
  prepare(str(odd / 'emnist.sqlite'), str(tmp_path / 't'), fmt='tff_sqlite', task='emnist')
  assert_emnist_roundtrip(load_prepared('femnist', str(tmp_path / 't')), train, test)
  assert sorted(os.listdir(tmp_path)) == sorted(['a#b?c%41 d[1]', 'f', 't'])  # no stray database
  comma = tmp_path / 'x,y'
  _write_leaf(comma, {'train': train, 'test': test})
  prepare(str(comma), str(tmp_path / 'l'), fmt='leaf_json', task='emnist')
  assert_emnist_roundtrip(load_prepared('femnist', str(tmp_path / 'l')), train, test)
  # FedJAX's files listed with commas: each one that is absent is named.
  files = [str(odd / f'federated_emnist_{s}.sqlite') for s in ('train', 'test')]
  with pytest.raises(DataError, match=r"no such file: .*nowhere_test\.sqlite$"):
    prepare(f'{files[0]},{tmp_path}/nowhere_test.sqlite', str(tmp_path / 'g'),
            fmt='fedjax_sqlite', task='emnist')
  prepare(','.join(files), str(tmp_path / 'g'), fmt='fedjax_sqlite', task='emnist')
  assert_emnist_roundtrip(load_prepared('femnist', str(tmp_path / 'g')), train, test)


def _write_leaf(folder, clients):
  os.makedirs(folder, exist_ok=True)
  for split, cs in clients.items():
    with open(os.path.join(folder, f'{split}.json'), 'w') as f:
      json.dump({'users': list(cs), 'num_samples': [len(y) for _, y in cs.values()],
                 'user_data': {c: {'x': x.reshape(len(y), -1).tolist(), 'y': y.tolist()}
                               for c, (x, y) in cs.items()}}, f)


def test_leaf_json_reads_back_exactly(tmp_path):
  train, test = emnist_clients(5, [2, 6]), emnist_clients(6, [3])
  _write_leaf(tmp_path / 'leaf', {'train': train, 'test': test})
  prepare(str(tmp_path / 'leaf'), str(tmp_path / 'out'), fmt='leaf_json', task='emnist')
  assert_emnist_roundtrip(load_prepared('femnist', str(tmp_path / 'out')), train, test)


def test_leaf_layout_of_many_files_names_the_file_and_refuses_a_writer_in_two(tmp_path):
  """LEAF's own layout spreads a split's users over train/*.json. An error in the second
  file named the first; a user in two files became two clients of one id; a writer with no
  images was refused as 'pixels have shape (0,)', where the other formats take it."""
  def write(folder, files):
    for name, users in files.items():
      os.makedirs(os.path.dirname(folder / name), exist_ok=True)
      (folder / name).write_text(json.dumps({
          'users': list(users), 'num_samples': [len(y) for y in users.values()],
          'user_data': {u: {'x': [[0.5] * 784] * len(y), 'y': y} for u, y in users.items()}}))

  test = {'test/all_0.json': {'t': [1]}}
  write(tmp_path / 'bad', {'train/all_0.json': {'a': [1, 2]}, 'train/all_1.json': {'b': [70]},
                           **test})
  with pytest.raises(DataError, match=r'train/all_1.json: client b: label 70 out of range'):
    prepare(str(tmp_path / 'bad'), str(tmp_path / 'out'), fmt='leaf_json', task='emnist')
  write(tmp_path / 'twice', {'train/all_0.json': {'a': [1]}, 'train/all_1.json': {'a': [2]},
                             **test})
  with pytest.raises(DataError, match=r'all_1.json: user a is also in .*train/all_0.json'):
    prepare(str(tmp_path / 'twice'), str(tmp_path / 'out'), fmt='leaf_json', task='emnist')
  assert not os.path.exists(tmp_path / 'out')
  write(tmp_path / 'good', {'train/all_0.json': {'a': [1, 2], 'e': []},
                            'train/all_1.json': {'b': [3]}, **test})
  prepare(str(tmp_path / 'good'), str(tmp_path / 'out'), fmt='leaf_json', task='emnist')
  train = load_prepared('femnist', str(tmp_path / 'out')).train
  assert list(train.client_ids) == ['a', 'e', 'b'] and list(train.num_examples) == [2, 0, 1]


POSTS = """<?xml version="1.0" encoding="utf-8"?>
<posts>
  <row Id="1" PostTypeId="1" CreationDate="2015-01-01T10:00:00.000" Score="3" OwnerUserId="7" Body="&lt;p&gt;The BEER is good? Hops, the beer!&lt;/p&gt;&#xA;&lt;pre&gt;&lt;code&gt;x = 1&lt;/code&gt;&lt;/pre&gt;" Title="t" Tags="&lt;a&gt;" />
  <row Id="2" PostTypeId="2" ParentId="1" CreationDate="2015-02-01T10:00:00.000" Score="1" OwnerUserId="3" Body="&lt;p&gt;It's good.&lt;/p&gt;" />
  <row Id="3" PostTypeId="2" ParentId="1" CreationDate="2016-03-01T10:00:00.000" Score="1" Body="&lt;p&gt;No owner.&lt;/p&gt;" />
  <row Id="4" PostTypeId="5" CreationDate="2015-03-01T10:00:00.000" OwnerUserId="3" Body="&lt;p&gt;Tag wiki.&lt;/p&gt;" />
  <row Id="5" PostTypeId="2" ParentId="1" CreationDate="2016-03-01T10:00:00.000" Score="1" OwnerUserId="7" Body="&lt;p&gt;Hops is the beer.&lt;/p&gt;" />
</posts>
"""


def test_tokenisation_lowercases_and_splits_punctuation():
  assert tokenize("The BEER, isn't it? (yes)") == ['the', 'beer', ',', "isn't", 'it', '?', '(',
                                                    'yes', ')']
  assert html_sentences('<p>One two. Three!</p><pre><code>a = b</code></pre>') == [
      'one two .', 'three !']
  # Inline tags sit inside a sentence; block tags end one.
  assert html_sentences('<p>I like <a href="x">this stout</a> a <em>lot</em>, and '
                        '<code>it</code> too</p><ul><li>Hops<li>Malt</ul>') == [
      'i like this stout a lot , and it too', 'hops', 'malt']
  # A line break in the source is a space in HTML: a hard-wrapped quote is one sentence.
  assert html_sentences('<blockquote><p>beer dates back to the dawn of cereal agriculture\n'
                        '  in ancient Mesopotamia.</p></blockquote>\n<p>Cheers</p>') == [
      'beer dates back to the dawn of cereal agriculture in ancient mesopotamia .', 'cheers']
  assert tokenize('Kölsch, Märzen & Weißbier_café') == [
      'kölsch', ',', 'märzen', '&', 'weißbier', '_', 'café']
  # Combining marks are not \w to Python's re: vowel signs and viramas split a word into
  # letters, and so did a post stored decomposed (NFD), where ö is o and a mark.
  import unicodedata
  assert tokenize(unicodedata.normalize('NFD', 'Kölsch café')) == ['kölsch', 'café']
  assert tokenize('हिन्दी भाषा, ภาษาไทย!') == ['हिन्दी', 'भाषा', ',', 'ภาษาไทย', '!']
  assert tokenize("o\u0308l isn\u0300't") == ['öl', "is\u01f9't"]  # ǹ composed


@pytest.mark.parametrize('damage', ['[1]', '{"task": "stackoverflow", "layout_version": %d}',
                                    '{"num_classes": "many", "layout_version": %d}'])
def test_a_damaged_meta_json_is_one_data_error(tmp_path, damage):
  """A list, no num_classes, or a num_classes of text: tracebacks (AttributeError, KeyError,
  ValueError) from reading the prepared dataset."""
  (tmp_path / 'Posts.xml').write_text(POSTS)
  write_vocab(tmp_path / 'wc')
  out = tmp_path / 'out'
  prepare(str(tmp_path / 'Posts.xml'), str(out), fmt='stackexchange_xml', task='stackoverflow',
          vocab_path=str(tmp_path / 'wc'), split_date='2016-01-01')
  load_prepared('stackoverflow', str(out))
  (out / 'meta.json').write_text(damage.replace('%d', str(LAYOUT_VERSION)))
  with pytest.raises(DataError, match=f'{out / "meta.json"}: not the meta.json prepare_data.py '
                                      'writes'):
    load_prepared('stackoverflow', str(out))


def test_a_posts_xml_prepared_by_an_older_reader_is_refused(tmp_path):
  (tmp_path / 'Posts.xml').write_text(POSTS)
  out = tmp_path / 'out'
  meta = prepare(str(tmp_path / 'Posts.xml'), str(out), fmt='stackexchange_xml',
                 task='stackoverflow', vocab_size=5, split_date='2016-01-01')
  load_prepared('stackoverflow', str(out))
  del meta['text_version']  # as prepared before the reader's text was versioned
  (out / 'meta.json').write_text(json.dumps(meta))
  with pytest.raises(DataError, match=f'{out}: its Posts.xml was split into sentences and '
                                      r'words by an older reader \(text version None.*prepare '
                                      f'it again from {tmp_path / "Posts.xml"} into a new or '
                                      'empty folder'):
    load_prepared('stackoverflow', str(out))


def test_stackexchange_posts_group_by_owner_and_split_by_date(tmp_path, monkeypatch):
  from fathom_sim.data import prepare as prepare_module
  (tmp_path / 'Posts.xml').write_text(POSTS)
  write_vocab(tmp_path / 'wc')
  scratch, readers, reader = [], [], prepare_module.StackExchangeXml

  def spy(source, folder, *args):
    scratch.append(folder)
    readers.append(reader(source, folder, *args))
    return readers[-1]

  monkeypatch.setattr(prepare_module, 'StackExchangeXml', spy)
  meta = prepare(str(tmp_path / 'Posts.xml'), str(tmp_path / 'out'), fmt='stackexchange_xml',
                 task='stackoverflow', vocab_path=str(tmp_path / 'wc'), split_date='2016-01-01')
  # The grouping table lives in <out>.partial (in /tmp a killed conversion left it for good,
  # where the next one clears it), and is dropped with the folder's mark before the rename.
  assert scratch == [str(tmp_path / 'out.partial' / 'scratch')]
  with pytest.raises(sqlite3.ProgrammingError):  # closed first (NFS keeps open files deleted)
    list(readers[0].sentences('train'))
  assert sorted(os.listdir(tmp_path / 'out')) == ['clients-test.npz', 'clients-train.npz',
                                                  'meta.json', 'tfds', 'vocab.txt']
  task = load_prepared('stackoverflow', str(tmp_path / 'out'))
  assert meta['split_date'] == '2016-01-01'
  assert list(task.train.client_ids) == ['3', '7'] and list(task.test.client_ids) == ['7']
  want = {'7': ['the beer is good ?', 'hops , the beer !'], '3': ["it's good ."]}
  for i, cid in enumerate(task.train.client_ids):
    got = task.train.client(i)
    np.testing.assert_array_equal(got['x'], [expected_sequences(s)[0] for s in want[cid]])
    np.testing.assert_array_equal(got['y'], [expected_sequences(s)[1] for s in want[cid]])
  np.testing.assert_array_equal(task.test.client(0)['y'],
                                [expected_sequences('hops is the beer .')[1]])
  # Without a word-count file the vocabulary is the train split's most frequent words.
  prepare(str(tmp_path / 'Posts.xml'), str(tmp_path / 'own'), fmt='stackexchange_xml',
          task='stackoverflow', vocab_size=2, split_date='2016-01-01')
  with open(tmp_path / 'own' / 'vocab.txt') as f:
    assert f.read().split() == ['the', 'beer']


def test_grouping_posts_by_user_keeps_sqlites_temporary_files_in_the_scratch_folder(tmp_path,
                                                                                  monkeypatch):
  """The clients' ORDER BY sorted each split's whole text into the system's temporary folder
  (a Stack Overflow dump's tens of GB, outside the conversion's scratch folder, which the next
  conversion clears); now the queries walk indexes, whose build sorts only keys, in scratch."""
  from fathom_sim.data import stackexchange
  rows = ''.join(f'  <row Id="{i}" PostTypeId="2" CreationDate="2015-{i % 12 + 1:02d}-01" '
                 f'OwnerUserId="{i * 7919 % 5003}" Body="&lt;p&gt;Post {i}.&lt;/p&gt;" />\n'
                 for i in range(1, 10001))
  (tmp_path / 'Posts.xml').write_text(f'<?xml version="1.0" encoding="utf-8"?>\n<posts>\n{rows}'
                                      '</posts>\n')
  seen, connect = set(), sqlite3.connect

  def temp_files() -> int:
    for fd in os.listdir('/proc/self/fd'):
      try:
        path = os.readlink(f'/proc/self/fd/{fd}')
      except OSError:
        continue
      if os.path.basename(path).startswith('etilqs_'):  # (SQLite's, opened and unlinked)
        seen.add(os.path.dirname(path))
    return 0

  def watched(*args, **kwargs):
    db = connect(*args, **kwargs)
    # Small pages and cache: SQLite's sorts spill to files from 250 pages on, not 2 MB.
    db.execute('PRAGMA page_size = 512')
    db.execute('PRAGMA cache_size = 1')
    db.set_progress_handler(temp_files, 1000)  # looks while a statement runs
    return db

  monkeypatch.setattr(stackexchange.sqlite3, 'connect', watched)
  scratch = tmp_path / 'scratch'
  scratch.mkdir()
  reader = stackexchange.StackExchangeXml(str(tmp_path / 'Posts.xml'), str(scratch))
  try:
    users = [[int(user) for user, _ in reader.clients(split)] for split in ('train', 'test')]
  finally:
    reader.close()
  assert seen == {str(scratch)}  # (the index builds spilled: the watch sees temporary files)
  for split in users:  # in the order of their numeric ids, as before
    assert len(split) > 1000 and split == sorted(split)
  with connect(':memory:') as db:  # the setting is the process's: given back
    assert db.execute('PRAGMA temp_store_directory').fetchall() in ([], [('',)])

@pytest.mark.parametrize('kind, said', [('missing', 'no such file'),
                                        ('folder', 'a folder, not a file'),
                                        # said 'no such file' of a pipe there
                                        ('fifo', 'not a regular file (a FIFO, a socket or a '
                                                 'device)'),
                                        ('link', 'a link to nothing')])
def test_a_vocab_that_is_no_regular_file_is_said_as_what_it_is(tmp_path, kind, said):
  (tmp_path / 'Posts.xml').write_text(POSTS)
  vocab = tmp_path / 'wc'
  if kind == 'folder':
    vocab.mkdir()
  elif kind == 'fifo':
    os.mkfifo(vocab)
  elif kind == 'link':
    vocab.symlink_to(tmp_path / 'gone')
  with pytest.raises(DataError, match=re.escape(f"--vocab '{vocab}': {said} (expected a "
                                                'word-count file, most frequent word first)')):
    prepare(str(tmp_path / 'Posts.xml'), str(tmp_path / 'out'), fmt='stackexchange_xml',
            task='stackoverflow', vocab_path=str(vocab), split_date='2016-01-01')
  assert not os.path.exists(tmp_path / 'out')

def test_a_word_holding_a_line_break_stays_out_of_the_vocabulary_written_a_word_a_line():
  """Sentences are split on ' ' alone (as FedJAX's are), so 'wor\\nld' was a word of the
  train split's vocabulary: vocab.txt then held more lines than words, every word after it a
  line off its id."""
  from fathom_sim.data.vocab import vocabulary_from
  vocab = vocabulary_from(['wor\nld wor\nld b\rc hops', 'wor\nld hops the'], 3)
  assert vocab.words == ['hops', 'the']
  x, y = vocab.encode(['wor\nld the'], 4)
  oov, the = len(vocab.words) + 3, 3 + 1
  assert (x[0].tolist(), y[0].tolist()) == ([1, oov, the, 0], [oov, the, 2, 0])  # 1 bos, 2 eos


def _bad_source(tmp_path, case: str) -> tuple[str, dict]:
  """A source of the public formats with one thing wrong; (src path, prepare's kwargs)."""
  src = tmp_path / 'src'
  train, test = emnist_clients(7, [3, 4]), emnist_clients(8, [2])
  if case == 'fedjax_no_label':
    os.makedirs(src)
    for split, clients in (('train', train), ('test', test)):
      write_fedjax(src / f'federated_emnist_{split}.sqlite',
                   {c: ({'pixels': _ext_array(x)}, len(y)) for c, (x, y) in clients.items()})
    return str(src), dict(fmt='fedjax_sqlite', task='emnist')
  if case == 'fedjax_so_no_tokens':
    os.makedirs(src)
    for split in ('train', 'test'):
      write_fedjax(src / f'stackoverflow_{split}.sqlite',
                   {'u1': ({'title': _ext_bytes([b'a title'])}, 1)})
    write_vocab(tmp_path / 'wc')
    return str(src), dict(fmt='fedjax_sqlite', task='stackoverflow',
                          vocab_path=str(tmp_path / 'wc'))
  if case == 'tff_no_pixels':
    write_tff(tmp_path / 'src', {split: {c: [_tf_example(label=[y[k]]) for k in range(len(y))]
                                         for c, (x, y) in clients.items()}
                                 for split, clients in (('all_train', train), ('all_test', test))})
    return str(src), dict(fmt='tff_sqlite', task='emnist')
  if case in ('tff_so_no_tokens', 'vocab_empty', 'vocab_unreadable', 'vocab_csv',
              'vocab_repeated'):
    write_tff(tmp_path / 'src', {split: {'a': [_tf_example(
        **({'score': [1]} if case == 'tff_so_no_tokens' else {'tokens': [b'the beer']}))]}
                                 for split in ('train', 'test')})
    vocab = tmp_path / 'wc'
    if case == 'vocab_empty':
      vocab.write_text('\n\n')
    elif case == 'vocab_unreadable':
      vocab.write_bytes(b'the 10\n\xff\xfe 9\n')
    elif case == 'vocab_csv':
      vocab.write_text('the,10\nbeer;9\n3,000x\n')
    elif case == 'vocab_repeated':
      vocab.write_text('the 10\nbeer 9\nthe 8\n')
    else:
      write_vocab(vocab)
    return str(src), dict(fmt='tff_sqlite', task='stackoverflow', vocab_path=str(vocab))
  _write_leaf(src, {'train': train, 'test': test})
  data = json.loads((src / 'train.json').read_text())
  user = data['users'][1]
  if case == 'leaf_no_y':
    del data['user_data'][user]['y']
  elif case == 'leaf_labels_short':
    data['user_data'][user]['y'].pop()
    data['num_samples'][1] -= 1
  else:  # leaf_count
    data['num_samples'][1] += 1
  (src / 'train.json').write_text(json.dumps(data))
  return str(src), dict(fmt='leaf_json', task='emnist')


def test_a_word_count_file_may_hold_numbers_written_with_commas(tmp_path):
  """Tokens such as '3,000' are words too (TFF's text is split on spaces): refused only
  when most words look like a CSV's 'word,count'."""
  from fathom_sim.data.vocab import read_word_counts
  path = tmp_path / 'wc'
  path.write_text('the\n3,000\nbeer\n')
  assert read_word_counts(str(path), 10).words == ['the', '3,000', 'beer']
  path.write_text('the 9\n3,000 8\n1,5 7\n')
  assert read_word_counts(str(path), 10).words == ['the', '3,000', '1,5']
  # A CSV's header and one row were two words (its header is no 'word,count' of its own).
  path.write_text('word,count\nthe,5\n')
  with pytest.raises(DataError, match=r"2 of its 2 words, such as 'word,count' \(line 1\)"):
    read_word_counts(str(path), 10)


@pytest.mark.parametrize('case, message', [
    ('leaf_labels_short', r'train\.json: client \S+: 4 images but labels of shape \(3,\)'),
    ('fedjax_no_label', r"federated_emnist_(train|test)\.sqlite: client \S+ lacks \['label'\]; "
                        r'FedJAX EMNIST clients have pixels and label'),
    ('fedjax_so_no_tokens', r'stackoverflow_(train|test)\.sqlite: client u1 lacks tokens'),
    ('tff_no_pixels', r'src: client \S+: EMNIST examples need pixels \(784 floats\) and label'),
    ('tff_so_no_tokens', r'src: client a: Stack Overflow examples need a tokens bytes feature'),
    ('leaf_no_y', r'train\.json: user \S+ has no "x" and "y" in user_data'),
    ('leaf_count', r'train\.json: user \S+: num_samples says 5 but "y" has 4 labels'),
    ('vocab_empty', r'wc: no words in the word-count file'),
    ('vocab_unreadable', r'wc: cannot read the word-count file \(.*utf-8'),
    ('vocab_csv', r"wc: 2 of its 3 words, such as 'the,10' \(line 1\), are a word and a count "
                  r'joined by a comma or semicolon; a word-count file separates them by a space'),
    ('vocab_repeated', r"wc: line 3 repeats the word 'the' of line 1; a word-count file names "
                       'each word once'),
])
def test_a_malformed_source_is_one_data_error_that_writes_nothing(tmp_path, case, message):
  """Each check of the readers on what the public files hold, hit by a source broken in that
  one way: a DataError naming the file (and client) and what is expected; no --out made."""
  src, kwargs = _bad_source(tmp_path, case)
  before = sorted(os.listdir(tmp_path))
  with pytest.raises(DataError, match=message):
    prepare(src, str(tmp_path / 'out'), **kwargs)
  assert sorted(os.listdir(tmp_path)) == before  # neither --out nor its scratch folder
