"""Stack Overflow next-word prediction: tokenisation, vocabulary and fixed-length sequences.

Ids: 0 pad, 1 bos, 2 eos, word i of the vocabulary -> i + 3, then one out-of-vocabulary id
(vocab_size + 3), so a vocabulary of 10,000 words gives 10,004 ids. A sentence becomes
x = [bos] + ids and y = ids + [eos], both cut or padded (with pad) to `length` tokens.
"""

from __future__ import annotations

import collections
import functools
import html
import re
import sys
import unicodedata
from typing import Iterable, Sequence

import numpy as np
from absl import logging

PAD, BOS, EOS = 0, 1, 2
NUM_SPECIAL = 4  # pad, bos, eos, oov



@functools.cache
def _token() -> re.Pattern:
  """A word is letters and digits of any script (Kölsch is one word, not k ö lsch), with the
  combining marks that follow them (Python's \\w has no vowel signs or viramas: हिन्दी was
  seven tokens) and inner apostrophes; every other visible character is a token of its own."""
  marks, start = [], None  # the ranges of Unicode's mark categories (Mn, Mc, Me)
  for c in range(sys.maxunicode + 2):
    is_mark = c <= sys.maxunicode and unicodedata.category(chr(c))[0] == 'M'
    if is_mark and start is None:
      start = c
    elif not is_mark and start is not None:
      marks.append(f'{re.escape(chr(start))}-{re.escape(chr(c - 1))}')
      start = None
  unit = rf"[^\W_][{''.join(marks)}]*"
  return re.compile(rf"(?:{unit})+(?:'(?:{unit})+)*|[^\s\w]|_")

# Tags that end a block of text end a sentence; inline ones (a, em, code, ...) only part words.
_BLOCK_TAG = re.compile(r'</?(?:p|br|div|li|ul|ol|h[1-6]|blockquote|pre|table|tr|td|th|hr|dl|dt|'
                        r'dd)\b[^>]*>', re.IGNORECASE)
_TAG = re.compile(r'<[^>]*>')
_CODE = re.compile(r'<pre\b.*?</pre>', re.DOTALL | re.IGNORECASE)
_SENTENCE_END = re.compile(r'(?<=[.!?])\s+|\n+')
_WHITESPACE = re.compile(r'\s+')


# Bumped whenever html_sentences or tokenize change the sentences or words of a post (2: inline
# tags no longer end sentences; 3: a line break inside a paragraph is a space; 4: text composed
# (NFC), and combining marks stay in their word). A dataset
# prepared from a Posts.xml records it (meta.json), and one made by an older version is
# refused (tfds_store.read_meta) rather than trained on other examples than a new one's.
TEXT_VERSION = 4


def tokenize(text: str) -> list[str]:
  """Lower-case words, with each punctuation mark split off as its own token. The text is
  composed first (NFC): a post stored decomposed spells ö as o and a mark, the same word."""
  text = unicodedata.normalize('NFC', text).lower().replace('\u2019', "'")
  return _token().findall(text)


def html_sentences(body: str) -> list[str]:
  """The sentences of an HTML post body, each tokenised and joined by single spaces.

  Code blocks are dropped: they are not the natural language the task predicts.
  """
  # HTML renders a line break in the source as a space: a hard-wrapped paragraph (common in
  # quotes) is one block, and only block tags (and a code block, which is one) end sentences.
  text = _WHITESPACE.sub(' ', _CODE.sub('<p>', body))
  text = html.unescape(_TAG.sub(' ', _BLOCK_TAG.sub('\n', text)))
  out = []
  for sentence in _SENTENCE_END.split(text):
    tokens = tokenize(sentence)
    if tokens:
      out.append(' '.join(tokens))
  return out


def ids_dtype(vocab_size: int) -> np.dtype:
  """The smallest integer type that holds every id (int16 halves a large dataset on disk)."""
  return np.dtype(np.int16 if vocab_size + NUM_SPECIAL <= np.iinfo(np.int16).max else np.int32)


class Vocabulary:
  """Word -> id for the most frequent words, in the order given."""

  def __init__(self, words: Sequence[str]):
    self.words = list(words)
    self._ids = {w: i + 3 for i, w in enumerate(self.words)}
    self.oov = len(self.words) + 3

  @property
  def num_ids(self) -> int:
    return len(self.words) + NUM_SPECIAL

  def encode(self, sentences: Iterable[str | bytes], length: int) -> tuple[np.ndarray, np.ndarray]:
    """x, y [n, length] for space-separated sentences (see the module docstring)."""
    sentences = list(sentences)
    dtype = ids_dtype(len(self.words))
    x = np.zeros((len(sentences), length), dtype)
    y = np.zeros((len(sentences), length), dtype)
    for row, s in enumerate(sentences):
      if isinstance(s, bytes):
        s = s.decode('utf-8', errors='replace')
      # Split on ' ' exactly, as FedJAX's and TFF's tokenizers (tf.strings.split, sep=' '): two
      # spaces give an empty word (out of vocabulary), a tab or no-break space stays in a word,
      # and an empty sentence is one empty word (TF's StringSplitV2 returns [''] too).
      ids = [self._ids.get(w, self.oov) for w in s.split(' ')]
      xs = ([BOS] + ids)[:length]
      ys = (ids + [EOS])[:length]
      x[row, :len(xs)] = xs
      y[row, :len(ys)] = ys
    return x, y


def read_word_counts(path: str, size: int) -> Vocabulary:
  """The first `size` words of a word-count file (one `word [count]` per line, most frequent
  first, as FedJAX's and TFF's `stackoverflow.word_count`)."""
  from fathom_sim.data.byo import DataError
  words, seen, joined = [], {}, []  # seen: word -> its line; joined: lines like 'word,count'
  try:
    # utf-8-sig: a byte-order mark made the most frequent word '\ufeffthe', and 'the' unknown.
    with open(path, encoding='utf-8-sig') as f:
      for number, line in enumerate(f, 1):
        parts = line.split()
        if not parts:
          continue
        if len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
          raise DataError(f'{path}: line {number} is {line.strip()[:60]!r}; a word-count file '
                          'has one "word count" (or just "word") per line')
        if parts[0] in seen:  # (its second id would never be used, and the file is no count)
          raise DataError(f'{path}: line {number} repeats the word {parts[0]!r} of line '
                          f'{seen[parts[0]]}; a word-count file names each word once')
        seen[parts[0]] = number
        if len(parts) == 1 and (_JOINED_COUNT.fullmatch(parts[0]) or (
            not words and _JOINED_HEADER.fullmatch(parts[0]))):
          joined.append((number, parts[0]))
        words.append(parts[0])
        if len(words) == size:
          break
  except (OSError, UnicodeDecodeError) as e:
    from fathom_sim.data import sniff
    found = sniff.kind(path)  # (TFF publishes it as stackoverflow.word_count.tar.bz2)
    raise DataError(f'{path}: cannot read the word-count file ({e})'
                    + (f'; it is {found}' if found else '')) from None
  if not words:
    raise DataError(f'{path}: no words in the word-count file')
  if len(words) < size:  # (a cut download gives a small vocabulary, said in one summary line)
    logging.warning('%s lists %d words, fewer than the %d asked for (--vocab_size): the '
                    'vocabulary has %d', path, len(words), size, len(words))
  # A CSV's 'the,1234' is one token: read as words, every word of the text would be out of
  # the vocabulary. A real word may look so ('3,000'), but not most of them.
  if 2 * len(joined) > len(words):
    number, word = joined[0]
    raise DataError(f'{path}: {len(joined)} of its {len(words)} words, such as {word!r} (line '
                    f'{number}), are a word and a count joined by a comma or semicolon; a '
                    'word-count file separates them by a space ("the 1234")')
  return Vocabulary(words)


_JOINED_COUNT = re.compile(r'.+[,;]\d+')
# A CSV's header ('word,count'), first: a file of it and one row was read as two words.
_JOINED_HEADER = re.compile(r'[^,;]+[,;][^,;]+')


def vocabulary_from(sentences: Iterable[str | bytes], size: int) -> Vocabulary:
  """The `size` most frequent words of the sentences (ties broken by first appearance), but
  those holding a line break: vocab.txt keeps a word per line (line i: id i + 3), and one such
  word shifted every word after it; they are out of the vocabulary."""
  counts: collections.Counter = collections.Counter()
  for s in sentences:
    text = s.decode('utf-8', errors='replace') if isinstance(s, bytes) else s
    # (split on ' ' alone: the words encode() looks up)
    counts.update(w for w in text.split(' ') if w and '\n' not in w and '\r' not in w)
  return Vocabulary([w for w, _ in counts.most_common(size)])
