"""A minimal reader of serialized `tf.train.Example` protos (no TensorFlow needed).

Example { Features features = 1; }  Features { map<string, Feature> feature = 1; }
Feature { oneof { BytesList bytes_list = 1; FloatList float_list = 2; Int64List int64_list = 3; } }
BytesList { repeated bytes value = 1; }  FloatList { repeated float value = 1 [packed]; }
Int64List { repeated int64 value = 1 [packed]; }
Unpacked repeated floats and ints are accepted too, as protobuf parsers must.
"""

from __future__ import annotations

import numpy as np


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
  result = shift = 0
  while True:
    if pos >= len(buf):
      raise ValueError('truncated varint')
    b = buf[pos]
    pos += 1
    result |= (b & 0x7F) << shift
    if not b & 0x80:
      return result & 0xFFFFFFFFFFFFFFFF, pos  # a tenth byte's bits past 64 drop, as in protobuf
    shift += 7
    if shift > 63:
      raise ValueError('varint too long')


def _fields(buf: bytes):
  """(field number, wire type, value) of a message; value is an int or a bytes slice."""
  pos = 0
  while pos < len(buf):
    key, pos = _varint(buf, pos)
    number, wire = key >> 3, key & 7
    if wire == 0:
      value, pos = _varint(buf, pos)
    elif wire == 1:
      value, pos = buf[pos:pos + 8], pos + 8
    elif wire == 2:
      size, pos = _varint(buf, pos)
      value, pos = buf[pos:pos + size], pos + size
    elif wire == 5:
      value, pos = buf[pos:pos + 4], pos + 4
    else:
      raise ValueError(f'unsupported wire type {wire}')
    if pos > len(buf):
      raise ValueError('truncated message')
    yield number, wire, value


def _signed(v: int) -> int:
  return v - (1 << 64) if v >= 1 << 63 else v


def _length_delimited(what: str, wire: int) -> None:
  # A varint where bytes belong would otherwise be taken as a length: bytes(n) makes n zeros.
  if wire != 2:
    raise ValueError(f'{what} has wire type {wire}, not 2 (length-delimited)')


def _feature(buf: bytes):
  kind = None
  for number, wire, value in _fields(buf):
    if number in (1, 2, 3):
      _length_delimited('a Feature\'s list', wire)
      kind = (number, value)  # the last oneof member wins, as in protobuf
  if kind is None:
    return np.zeros(0, np.float32)
  number, body = kind
  if number == 1:
    return [v for n, w, v in _fields(body) if n == 1 and w == 2]
  if number == 2:
    parts = []
    for n, w, v in _fields(body):
      if n == 1:
        if w not in (2, 5):  # packed, or one fixed32 float
          raise ValueError(f'a FloatList value has wire type {w}, not 2 or 5')
        parts.append(np.frombuffer(v, '<f4'))
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)
  values = []
  for n, w, v in _fields(body):
    if n != 1:
      continue
    if w not in (0, 2):  # one varint, or packed
      raise ValueError(f'an Int64List value has wire type {w}, not 0 or 2')
    if w == 2:
      pos = 0
      while pos < len(v):
        x, pos = _varint(v, pos)
        values.append(_signed(x))
    else:
      values.append(_signed(v))
  return np.array(values, np.int64)


def parse_example(blob: bytes) -> dict:
  """{name: list of bytes | float32 array | int64 array} of one serialized tf.train.Example."""
  out = {}
  for number, wire, features in _fields(blob):
    if number != 1 or wire != 2:
      continue
    for n, w, entry in _fields(features):
      if n != 1 or w != 2:
        continue
      key, value = None, b''
      for m, w, v in _fields(entry):
        if m == 1:
          _length_delimited('a feature map entry\'s key', w)
          key = bytes(v).decode('utf-8')
        elif m == 2:
          _length_delimited('a feature map entry\'s value', w)
          value = v
      if key is None:
        raise ValueError('feature map entry without a key')
      out[key] = _feature(bytes(value))
  return out
