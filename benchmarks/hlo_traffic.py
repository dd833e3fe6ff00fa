"""Each kernel of a compiled XLA program, with the bytes it moves and the arithmetic it does.

Reads the optimized HLO text of a compiled program (`jax.jit(f).lower(...).compile().as_text()`):
every instruction of the entry computation, or of a loop's body, that runs on the device (a
fusion, a library call, a copy, ...) is one kernel. Its traffic is what it reads and writes in
device memory: its operands and its outputs, except where the fused computation reads only
part of an operand (a slice, a dynamic slice or a gather of it: those count their outputs) or
updates its output in place (a scatter or dynamic-update-slice at the root: the update counts,
not the buffer). Its arithmetic is 2 flops (a multiply and an add) per product term of its dots
and convolutions; elementwise work is not counted (it is small beside a step's memory traffic).
benchmarks/xla_cost.py reads XLA's own whole-program estimate instead, which a deviceless GPU
compile does not give.

Why this exists: a program compiled for an H100 without one (benchmarks/gpu_aot.py) shows how
XLA:GPU fuses a step and what each kernel moves, so the next GPU call measures a change that
was chosen by its bytes, not guessed. It is an account of the program, not a timing.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 'f8e4m3fn': 1, 'f8e5m2': 1, 's16': 2, 'u16': 2,
          'f16': 2, 'bf16': 2, 's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8,
          'c64': 8, 'c128': 16}
_ARRAY = re.compile(r'\b([a-z][a-z0-9]*)\[([0-9,]*)\]')
# Instructions that are views or bookkeeping, not kernels; and control flow, whose kernels are
# those of the computations it calls (a loop body: loop_bodies).
_FREE = {'parameter', 'get-tuple-element', 'bitcast', 'tuple', 'constant', 'after-all',
         'partition-id', 'replica-id', 'opt-barrier', 'add-dependency', 'while', 'conditional',
         'call'}
_PARTIAL_READS = {'slice', 'dynamic-slice', 'gather'}
_IN_PLACE = {'scatter', 'dynamic-update-slice'}


class Instr(NamedTuple):
  name: str
  type: str       # the result type, e.g. 'f32[50,20]{1,0}' or a tuple '(f32[2], s32[])'
  opcode: str
  operands: tuple[str, ...]
  args: str       # the text between the opcode's parentheses (a parameter's number)
  attrs: str      # everything after them
  root: bool


class Kernel(NamedTuple):
  name: str
  kind: str       # the fusion's kind (kLoop, kInput, kCustom, ...) or the opcode
  bytes: int      # read and written in device memory
  flops: int      # of its dots and convolutions
  op_name: str    # the JAX operation it came from (metadata), for reading


def shape_bytes(type_str: str) -> int:
  """Bytes of every array in an HLO type (a tuple's parts added up)."""
  total = 0
  for dtype, dims in _ARRAY.findall(type_str):
    size = math.prod(int(d) for d in dims.split(',') if d) if dims else 1
    total += size * _BYTES.get(dtype, 0)
  return total


def _dims(type_str: str) -> list[int]:
  m = _ARRAY.search(type_str)
  return [int(d) for d in m.group(2).split(',') if d] if m else []


def _closing(text: str, start: int) -> int:
  """Index just past the bracket that closes the one at `start`."""
  depth = 0
  for i in range(start, len(text)):
    if text[i] in '([{':
      depth += 1
    elif text[i] in ')]}':
      depth -= 1
      if depth == 0:
        return i + 1
  raise ValueError(f'unbalanced HLO text at {text[start:start + 80]!r}')


def _instruction(line: str) -> Instr | None:
  m = re.match(r'\s*(ROOT\s+)?%?([\w.\-]+) = ', line)
  if not m:
    return None
  rest = line[m.end():]
  end = _closing(rest, 0) if rest.startswith('(') else rest.index(' ')
  type_str, rest = rest[:end], rest[end:].lstrip()
  paren = rest.index('(')
  opcode = rest[:paren]
  close = _closing(rest, paren)
  args = rest[paren + 1:close - 1]
  operands = tuple(re.findall(r'%([\w.\-]+)', args))
  return Instr(m.group(2), type_str, opcode, operands, args, rest[close:], bool(m.group(1)))


def parse(hlo: str) -> tuple[dict[str, list[Instr]], str]:
  """{computation name: its instructions} and the entry computation's name."""
  computations, entry, current = {}, None, None
  for line in hlo.splitlines():
    header = re.match(r'(ENTRY\s+)?%([\w.\-]+) .*\{\s*$', line)
    if header and not line.startswith(' '):
      current = header.group(2)
      computations[current] = []
      if header.group(1):
        entry = current
    elif line.startswith('}'):
      current = None
    elif current is not None:
      instr = _instruction(line)
      if instr:
        computations[current].append(instr)
  if entry is None:
    raise ValueError('no ENTRY computation in the HLO text')
  return computations, entry


def _types(instrs: list[Instr]) -> dict[str, str]:
  """name -> result type of a computation's instructions."""
  return {i.name: i.type for i in instrs}


def _called(instr: Instr) -> str | None:
  m = re.search(r'calls=%([\w.\-]+)', instr.attrs)
  return m.group(1) if m else None


def _dot_flops(instr: Instr, types: dict[str, str]) -> int:
  lhs = _dims(types[instr.operands[0]])
  contracting = re.search(r'lhs_contracting_dims=\{([0-9,]*)\}', instr.attrs)
  k = math.prod(lhs[int(d)] for d in contracting.group(1).split(',') if d) if contracting else 1
  return 2 * math.prod(_dims(instr.type)) * k


def _conv_flops(instr: Instr, types: dict[str, str]) -> int:
  """Of a convolution (HLO's or a cuDNN call): each output element sums window x input
  features per group, which is the kernel's size over its output features."""
  kernel = _dims(types[instr.operands[1]])
  labels = re.search(r'dim_labels=\w+_(\w+)->', instr.attrs)
  out_features = kernel[labels.group(1).index('o')] if labels else kernel[-1]
  out = _dims(instr.type.lstrip('('))  # a cuDNN call returns (result, scratch)
  return 2 * math.prod(out) * (math.prod(kernel) // out_features)


def _flops(instrs: list[Instr], computations: dict[str, list[Instr]], types: dict) -> int:
  total = 0
  for instr in instrs:
    if instr.opcode == 'dot':
      total += _dot_flops(instr, types)
    elif instr.opcode == 'convolution' or (instr.opcode == 'custom-call'
                                           and 'cudnn$conv' in instr.attrs):
      total += _conv_flops(instr, types)
    elif instr.opcode == 'fusion' and _called(instr) in computations:
      inner = computations[_called(instr)]
      total += _flops(inner, computations, _types(inner))
  return total


def _fusion_bytes(instr: Instr, fused: list[Instr], types: dict[str, str]) -> int:
  """What a fusion reads and writes: see the module's docstring."""
  users: dict[str, list[Instr]] = {}
  for i in fused:
    for o in i.operands:
      users.setdefault(o, []).append(i)
  root = next(i for i in fused if i.root)
  written, in_place = shape_bytes(instr.type), None
  if root.opcode in _IN_PLACE:
    update = root.operands[2] if root.opcode == 'scatter' else root.operands[1]
    written, in_place = shape_bytes(_types(fused)[update]), root.operands[0]
  read, seen = 0, set()
  for p in (i for i in fused if i.opcode == 'parameter'):
    outer = instr.operands[int(p.args)]
    uses = users.get(p.name, [])
    if p.name == in_place or outer in seen:
      continue
    if uses and all(u.opcode in _PARTIAL_READS and u.operands[0] == p.name for u in uses):
      read += sum(shape_bytes(u.type) for u in uses)
      continue
    seen.add(outer)
    read += shape_bytes(types.get(outer, p.type))
  return read + written


def loop_bodies(hlo: str, computation: str | None = None) -> list[str]:
  """The body computations of the while loops in one computation (default: the entry's), in
  program order; loops nested in those are their bodies' own."""
  computations, entry = parse(hlo)
  return [re.search(r'body=%([\w.\-]+)', i.attrs).group(1)
          for i in computations[computation or entry] if i.opcode == 'while']


def kernels(hlo: str, computation: str | None = None) -> list[Kernel]:
  """The kernels of one computation (default: the entry's), in program order: a loop body's
  are one iteration's."""
  computations, entry = parse(hlo)
  return _kernels(computations, computation or entry)


def _kernels(computations: dict[str, list[Instr]], name: str) -> list[Kernel]:
  instrs = computations[name]
  types = _types(instrs)
  out = []
  for instr in instrs:
    if instr.opcode in _FREE:
      continue
    called = _called(instr)
    if instr.opcode == 'fusion' and called in computations:
      fused = computations[called]
      moved = _fusion_bytes(instr, fused, types)
      kind = re.search(r'kind=(\w+)', instr.attrs).group(1)
      flops = _flops(fused, computations, _types(fused))
    else:
      moved = shape_bytes(instr.type) + sum(shape_bytes(types[o]) for o in
                                            dict.fromkeys(instr.operands) if o in types)
      kind = instr.opcode
      flops = _flops([instr], computations, types)
    op_name = re.search(r'op_name="([^"]*)"', instr.attrs)
    out.append(Kernel(instr.name, kind, moved, flops, op_name.group(1) if op_name else ''))
  return out


_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def run_kernels(hlo: str, computation: str | None = None) -> list[Kernel]:
  """The kernels of one run of a computation (default: the entry's) with the loops nested in
  it unrolled: a loop's body, and its condition, as many times as XLA knows the loop runs (an
  LSTM's time steps inside a local step). Refuses a loop of unknown trip count and a
  conditional, whose runs the text cannot tell."""
  computations, entry = parse(hlo)

  def run(name: str) -> list[Kernel]:
    out, own = [], {k.name: k for k in _kernels(computations, name)}
    for instr in computations[name]:
      if instr.opcode == 'conditional':
        raise ValueError(f'{instr.name}: which branch runs is not in the program text')
      if instr.opcode == 'call':  # XLA:CPU wraps small loops in calls
        out += run(re.search(r'to_apply=%([\w.\-]+)', instr.attrs).group(1))
        continue
      if instr.opcode != 'while':
        out += [own[instr.name]] if instr.name in own else []  # views are not kernels
        continue
      trips = _TRIP_COUNT.search(instr.attrs)
      if not trips:
        raise ValueError(f'{instr.name}: a loop whose trip count XLA does not know')
      n = int(trips.group(1))
      body = re.search(r'body=%([\w.\-]+)', instr.attrs).group(1)
      condition = re.search(r'condition=%([\w.\-]+)', instr.attrs).group(1)
      out += run(body) * n + run(condition) * (n + 1)
    return out

  return run(computation or entry)


_CONTROL = re.compile(r'\b(?:body|condition|to_apply|true_computation|false_computation)='
                      r'%([\w.\-]+)')


def module_name(hlo: str) -> str:
  """The HloModule's name (`jit_f`): what a profiler trace's `hlo_module` says of its ops."""
  m = re.search(r'^HloModule ([\w.\-]+)', hlo, re.MULTILINE)
  return m.group(1) if m else ''


def all_kernels(hlo: str) -> dict[str, Kernel]:
  """Every kernel of the program by instruction name: the entry's and those of every
  computation it runs through control flow (loop bodies and conditions, conditional
  branches, calls), nested ones too. Each is one run's account; a profiler trace says how
  often it ran."""
  computations, entry = parse(hlo)
  out: dict[str, Kernel] = {}
  todo, seen = [entry], {entry}
  while todo:
    name = todo.pop()
    for k in _kernels(computations, name):
      out[k.name] = k
    for instr in computations[name]:
      if instr.opcode not in ('while', 'conditional', 'call'):
        continue
      called = _CONTROL.findall(instr.attrs)
      branches = re.search(r'branch_computations=\{([^}]*)\}', instr.attrs)
      if branches:
        called += re.findall(r'%([\w.\-]+)', branches.group(1))
      for c in called:
        if c in computations and c not in seen:
          seen.add(c)
          todo.append(c)
  return out
