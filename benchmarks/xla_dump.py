"""What XLA dumps when it compiles a Pallas (Triton) kernel for a GPU (compiler option
xla_dump_to): the kernel's launch from the thunk sequence, its PTX's instructions, and ptxas -v's
registers and spills (benchmarks/kernel_ptx.py)."""

import functools
import glob
import os
import re
import shutil
import subprocess
import tempfile

from benchmarks.h100 import SMS, occupancy

_LAUNCH = re.compile(r'kCustomKernel .*?\] (_\w+_kernel) grid: \[(\d+), (\d+), (\d+)\] '
                     r'threads: \[(\d+), \d+, \d+\]\s+shared_memory: (\d+) bytes')


def ptxas_figures(report: str) -> dict:
  """Registers and spill bytes from ptxas -v's report of one kernel."""
  return {'registers': int(re.search(r'Used (\d+) registers', report)[1]),
          'spill_stores': int(re.search(r'(\d+) bytes spill stores', report)[1]),
          'spill_loads': int(re.search(r'(\d+) bytes spill loads', report)[1])}


@functools.cache
def _ptxas_binary() -> str:
  """The CUDA plugin's ptxas (pip's nvidia-cuda-nvcc), else one on PATH."""
  try:
    import nvidia
    found = [p for root in nvidia.__path__
             for p in sorted(glob.glob(os.path.join(root, '**', 'bin', 'ptxas'), recursive=True))]
  except ImportError:
    found = []
  binary = found[0] if found else shutil.which('ptxas')
  if binary is None:
    raise SystemExit('no ptxas: install the CUDA plugin of the pinned jax, '
                     'pip install "jax[cuda12]==0.10.2", or put CUDA\'s ptxas on PATH')
  return binary


def ptxas(ptx_path: str) -> dict:
  """ptxas_figures of the one kernel in `ptx_path`, assembled for sm_90a."""
  binary = _ptxas_binary()
  with tempfile.TemporaryDirectory() as tmp:
    return ptxas_figures(subprocess.run(
        [binary, '-arch=sm_90a', '-v', '-o', os.path.join(tmp, 'k.cubin'), ptx_path],
        capture_output=True, text=True, check=True).stderr)


def triton_launch(thunks: str) -> tuple[str, int, int, int]:
  """(kernel name, CTAs in its grid, threads a CTA, shared bytes a CTA) of the one Pallas
  kernel in a dumped thunk sequence."""
  found = _LAUNCH.findall(thunks)
  if len(found) != 1:
    raise ValueError(f'expected one Pallas kernel in the thunk sequence, found {len(found)}')
  (name, gx, gy, gz, threads, shared), = found
  return name, int(gx) * int(gy) * int(gz), int(threads), int(shared)


def account(dump: str) -> dict:
  """The Triton kernel of one dumped compilation: launch, ptxas figures, instruction counts."""
  def read(f: str) -> str:
    with open(os.path.join(dump, f)) as fh:
      return fh.read()

  files = os.listdir(dump)
  thunks, = [f for f in files if f.endswith('thunk_sequence.txt')]
  name, grid, threads, shared = triton_launch(read(thunks))
  (ptx, text), = [(f, read(f)) for f in files
                  if f.endswith('.ptx') and f'.entry {name}(' in read(f)]
  row = {'kernel': name, 'grid': grid, 'threads': threads, 'shared': shared,
         **ptxas(os.path.join(dump, ptx)),
         'mma_sync': len(re.findall(r'\bmma\.sync\.', text)),
         'wgmma': len(re.findall(r'\bwgmma\.mma_async\.', text)),
         'cp_async': len(re.findall(r'\bcp\.async\.(?:ca|cg)\.', text)),
         'barriers': len(re.findall(r'\bbar\.sync\b', text))}
  ctas, binding = occupancy(row['threads'], row['registers'], row['shared'])
  row.update(ctas_per_sm=ctas, bound_by=binding,
             warps_per_sm=ctas * -(-row['threads'] // 32),
             waves=row['grid'] / (ctas * SMS))
  return row
