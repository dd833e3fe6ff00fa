"""benchmarks/xla_dump.py and benchmarks/h100.occupancy: a Pallas kernel's launch and ptxas's
figures read from XLA's dump (text as XLA 0.10.2 and ptxas 12.9 write it), and what an sm_90
SM holds at once."""

import pytest

from benchmarks.h100 import occupancy
from benchmarks.xla_dump import ptxas_figures, triton_launch

# A forward pass of the Pallas convolution at 50 lanes, as XLA dumped its thunk sequence.
THUNKS = """\
001: kCustomKernel [source       | next=002 (1)] loop_pad_fusion grid: [42569, 1, 1] threads: [128, 1, 1]  shared_memory: 0 bytes
002: kCustomKernel [prev=001 (1) | next=003 (1)] _shifted_sum_kernel grid: [212, 50, 1] threads: [64, 1, 1]  shared_memory: 8192 bytes
003: kCustomKernel [prev=002 (1) | sink        ] loop_slice_fusion grid: [72000, 1, 1] threads: [128, 1, 1]  shared_memory: 0 bytes
"""

PTXAS = """\
ptxas info    : Compiling entry function '_shifted_sum_kernel' for 'sm_90a'
ptxas info    : Function properties for _shifted_sum_kernel
    56 bytes stack frame, 56 bytes spill stores, 80 bytes spill loads
ptxas info    : Used 253 registers, used 1 barriers, 56 bytes cumulative stack size
"""


def test_the_pallas_kernel_is_found_among_the_fusions_with_its_whole_grid():
  assert triton_launch(THUNKS) == ('_shifted_sum_kernel', 212 * 50, 64, 8192)


def test_a_dump_without_exactly_one_pallas_kernel_is_refused():
  with pytest.raises(ValueError, match='expected one Pallas kernel .*, found 0'):
    triton_launch(THUNKS.replace('_shifted_sum_kernel', 'loop_add_fusion'))
  with pytest.raises(ValueError, match='expected one Pallas kernel .*, found 2'):
    triton_launch(THUNKS + THUNKS)


def test_ptxas_figures():
  assert ptxas_figures(PTXAS) == {'registers': 253, 'spill_stores': 56, 'spill_loads': 80}


@pytest.mark.parametrize('threads, registers, shared, expected', [
    # 253 registers round to 256 a thread: 8 warps' worth of the 64 K, so 4 CTAs of 2 warps.
    (64, 253, 8192, (4, 'registers')),
    # 1024 threads a CTA: 32 warps each, 64 an SM, whatever else.
    (1024, 16, 0, (2, 'warps')),
    # 96 KB of shared memory a CTA (+1 KB reserved) fit twice in 228 KB.
    (128, 56, 98304, (2, 'shared')),
    # One warp of few registers: the 32 CTAs an SM may hold bind first.
    (32, 16, 0, (32, 'ctas')),
])
def test_occupancy_follows_the_sm_90_limits(threads, registers, shared, expected):
  assert occupancy(threads, registers, shared) == expected
