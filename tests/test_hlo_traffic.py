"""benchmarks/hlo_traffic.py: each kernel's bytes and arithmetic, read from compiled HLO text."""

import re

import jax
import jax.numpy as jnp
import pytest

from benchmarks.hlo_traffic import all_kernels, kernels, loop_bodies, module_name, shape_bytes


def _compiled(f, *args, **jit_kwargs) -> str:
  return jax.jit(f, **jit_kwargs).lower(*args).compile().as_text()


def test_shape_bytes_adds_up_every_array_of_a_type():
  assert shape_bytes('f32[50,20]{1,0}') == 4000
  assert shape_bytes('(bf16[3,4]{1,0}, s32[], pred[8]{0}, u8[0]{0})') == 24 + 4 + 8
  assert shape_bytes('token[]') == 0


def test_an_elementwise_kernel_reads_and_writes_its_arrays_once():
  x = jnp.ones((1000, 1000))
  ks = kernels(_compiled(lambda x: x * 2 + 1, x))
  assert [(k.bytes, k.flops) for k in ks] == [(8_000_000, 0)]


def test_a_slice_reads_only_what_it_takes():
  x = jnp.ones((1000, 1000))
  ks = kernels(_compiled(lambda x: x[:10] * 2, x))
  assert sum(k.bytes for k in ks) == 2 * 10 * 1000 * 4


def test_an_in_place_update_moves_the_update_not_the_buffer():
  x, u = jnp.ones((1000, 1000)), jnp.ones((10, 1000))
  ks = kernels(_compiled(lambda x, u, i: jax.lax.dynamic_update_slice(x, u, (i, 0)), x, u, 5,
                         donate_argnums=0))
  assert sum(k.bytes for k in ks) == 2 * u.size * 4 + 4  # u read and written, and the index


def test_dot_and_convolution_arithmetic():
  a, b = jnp.ones((64, 128)), jnp.ones((128, 32))
  ks = kernels(_compiled(jnp.matmul, a, b))
  assert sum(k.flops for k in ks) == 2 * 64 * 32 * 128
  assert sum(k.bytes for k in ks) == (a.size + b.size + 64 * 32) * 4
  x, w = jnp.ones((2, 10, 10, 3)), jnp.ones((3, 3, 3, 8))
  conv = lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), 'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  ks = kernels(_compiled(conv, x, w))
  assert sum(k.flops for k in ks) == 2 * (2 * 8 * 8 * 8) * (3 * 3 * 3)


def test_a_loop_body_holds_one_iteration_s_kernels():
  x = jnp.ones((1000, 1000))
  hlo = _compiled(lambda x, n: jax.lax.fori_loop(0, n, lambda i, c: c * 2 + 1, x), x, 3)
  body, = loop_bodies(hlo)
  moved = [k.bytes for k in kernels(hlo, body)]
  assert 8_000_000 in moved  # the carried array read and written once an iteration
  assert all(k.kind != 'while' for k in kernels(hlo))  # control flow is not a kernel


def test_every_kernel_the_program_runs_through_its_control_flow_is_listed_once():
  """all_kernels: the entry's, a loop body's and those of a conditional's branches inside it
  (a trace times them all, by instruction name)."""
  x, w = jnp.ones((64, 64)), jnp.ones((64, 64))

  def f(x, w, n):
    step = lambda i, c: jax.lax.cond(i % 2 == 0, lambda c: jnp.sin(c) @ w, lambda c: c @ w.T, c)
    return jax.lax.fori_loop(0, n, step, x * 3)

  hlo = _compiled(f, x, w, 4)
  listed = all_kernels(hlo)
  body, = loop_bodies(hlo)
  assert {k.name for k in kernels(hlo)} | {k.name for k in kernels(hlo, body)} < set(listed)
  branch_flops = [k.flops for k in listed.values() if 'cond' in k.op_name or 'branch' in k.op_name]
  assert 2 * 64 ** 3 in branch_flops  # a branch's product, which neither list above holds
  assert module_name(hlo) == 'jit_f'
  for name, k in listed.items():
    assert k.name == name and k.kind not in ('while', 'conditional')


# XLA:GPU's forms, written as it prints them: a Triton GEMM fusion whose dot sits in a nested
# computation, a multi-output fusion whose root is a tuple, a scatter updating its buffer in
# place, and a grouped cuDNN convolution that returns (result, scratch).
_GPU_HLO = """
HloModule m, is_scheduled=true

%gemm_inner (p0: f32[8,16], p1: f32[16,4]) -> f32[8,4] {
  %p0 = f32[8,16]{1,0} parameter(0)
  %p1 = f32[16,4]{1,0} parameter(1)
  ROOT %dot.1 = f32[8,4]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%gemm_fusion_computation (param_0: f32[8,16], param_1: f32[16,4]) -> f32[8,4] {
  %param_0 = f32[8,16]{1,0} parameter(0)
  %param_1 = f32[16,4]{1,0} parameter(1)
  ROOT %nested = f32[8,4]{1,0} fusion(%param_0, %param_1), kind=kCustom, calls=%gemm_inner
}

%fused_pair (param_0.1: f32[8,4]) -> (f32[8], f32[8,4]) {
  %param_0.1 = f32[8,4]{1,0} parameter(0)
  %constant_0 = f32[] constant(0)
  %reduce.1 = f32[8]{0} reduce(%param_0.1, %constant_0), dimensions={1}, to_apply=%add
  %neg.1 = f32[8,4]{1,0} negate(%param_0.1)
  ROOT %tuple.1 = (f32[8], f32[8,4]) tuple(%reduce.1, %neg.1)
}

%fused_scatter (param_0.2: f32[100,4], param_1.2: s32[8,1], param_2.2: f32[8,4]) -> f32[100,4] {
  %param_0.2 = f32[100,4]{1,0} parameter(0)
  %param_1.2 = s32[8,1]{1,0} parameter(1)
  %param_2.2 = f32[8,4]{1,0} parameter(2)
  ROOT %scatter.1 = f32[100,4]{1,0} scatter(%param_0.2, %param_1.2, %param_2.2), update_window_dims={1}, inserted_window_dims={0}, scatter_dims_to_operand_dims={0}, index_vector_dim=1, to_apply=%add
}

%body (carry: (f32[100,4], s32[])) -> (f32[100,4], s32[]) {
  %carry = (f32[100,4]{1,0}, s32[]) parameter(0)
  %buffer = f32[100,4]{1,0} get-tuple-element(%carry), index=0
  %i = s32[] get-tuple-element(%carry), index=1
  %copy.1 = f32[100,4]{1,0} copy(%buffer)
  ROOT %out = (f32[100,4]{1,0}, s32[]) tuple(%copy.1, %i)
}

ENTRY %main (a: f32[8,16], b: f32[16,4], buf: f32[100,4], idx: s32[8,1], x: f32[2,10,10,6], w: f32[8,3,3,3]) -> f32[100,4] {
  %a = f32[8,16]{1,0} parameter(0)
  %b = f32[16,4]{1,0} parameter(1)
  %buf = f32[100,4]{1,0} parameter(2)
  %idx = s32[8,1]{1,0} parameter(3)
  %x = f32[2,10,10,6]{3,2,1,0} parameter(4)
  %w = f32[8,3,3,3]{3,2,1,0} parameter(5)
  %gemm_fusion = f32[8,4]{1,0} fusion(%a, %b), kind=kCustom, calls=%gemm_fusion_computation, metadata={op_name="jit(f)/dot_general"}
  %pair = (f32[8]{0}, f32[8,4]{1,0}) fusion(%gemm_fusion), kind=kInput, calls=%fused_pair
  %neg = f32[8,4]{1,0} get-tuple-element(%pair), index=1
  %scatter_fusion = f32[100,4]{1,0} fusion(%buf, %idx, %neg), kind=kInput, calls=%fused_scatter
  %cudnn-conv.1 = (f32[2,8,8,8]{3,2,1,0}, u8[0]{0}) custom-call(%x, %w), window={size=3x3}, dim_labels=b01f_o01i->b01f, feature_group_count=2, custom_call_target="__cudnn$convForward"
  %zero = s32[] constant(0)
  %init = (f32[100,4]{1,0}, s32[]) tuple(%scatter_fusion, %zero)
  %loop = (f32[100,4]{1,0}, s32[]) while(%init), condition=%cond, body=%body
  ROOT %result = f32[100,4]{1,0} get-tuple-element(%loop), index=0
}
"""


def test_gpu_forms_of_kernels_are_accounted():
  ks = {k.name: k for k in kernels(_GPU_HLO)}
  assert list(ks) == ['gemm_fusion', 'pair', 'scatter_fusion', 'cudnn-conv.1']
  gemm = ks['gemm_fusion']
  assert gemm.kind == 'kCustom' and gemm.op_name == 'jit(f)/dot_general'
  assert gemm.flops == 2 * 8 * 4 * 16  # found in the nested computation
  assert gemm.bytes == (8 * 16 + 16 * 4 + 8 * 4) * 4
  assert ks['pair'].bytes == (8 * 4 + 8 + 8 * 4) * 4  # one read, both outputs written
  # In place: the indices and updates read, the updated rows written; not the 100-row buffer.
  assert ks['scatter_fusion'].bytes == (8 + 8 * 4 + 8 * 4) * 4
  # A grouped convolution: each output sums 3x3 windows of 6 / 2 input features.
  conv = ks['cudnn-conv.1']
  assert conv.flops == 2 * (2 * 8 * 8 * 8) * (3 * 3 * 3)
  assert conv.bytes == (2 * 10 * 10 * 6 + 8 * 27 + 2 * 8 * 8 * 8) * 4
  body, = loop_bodies(_GPU_HLO)
  assert [(k.kind, k.bytes) for k in kernels(_GPU_HLO, body)] == [('copy', 2 * 400 * 4)]


def test_gpu_aot_builds_the_round_whose_loop_body_is_one_step_of_every_lane():
  """benchmarks/gpu_aot.py's round, compiled here for this CPU (an H100 needs the CUDA plugin):
  10 lanes for cohort 10, a loop over the local steps, and a step that computes the CNN's
  products for every lane."""
  from benchmarks.lane_forms import round_hlo
  from fathom_sim.mesh import make_mesh
  hlo, lanes, steps = round_hlo(10, 'matmul', 'float32', make_mesh(1), num_clients=30)
  assert lanes == 10 and steps >= 1
  body, = loop_bodies(hlo)
  step = kernels(hlo, body)
  # Forward, input gradient and kernel gradient of the 9216x128 dense layer, 20 rows a lane.
  assert sum(k.flops for k in step) >= 10 * 3 * 2 * 20 * 9216 * 128


def test_text_without_an_entry_computation_is_refused():
  with pytest.raises(ValueError, match='no ENTRY'):
    kernels('HloModule m\n')


def test_one_run_of_a_loop_body_unrolls_the_loops_nested_in_it():
  """Each of 3 outer iterations runs an inner loop of 5 over an 8 MB array: one outer run
  moves the inner body's kernels 5 times (and its condition's 6)."""
  from benchmarks.hlo_traffic import run_kernels

  def f(x):
    def outer(c, _):
      inner = jax.lax.scan(lambda a, _: (jnp.sin(a) * 2, None), c, None, length=5)[0]
      return inner + 1, None
    return jax.lax.scan(outer, x, None, length=3)[0]

  hlo = _compiled(f, jnp.ones((1000, 2000)))
  outer_body, = loop_bodies(hlo)
  inner_body, = loop_bodies(hlo, outer_body)
  once = sum(k.bytes for k in kernels(hlo, inner_body))
  assert once >= 16_000_000  # the array read and written
  condition_of = dict((body, cond) for cond, body in
                      re.findall(r'condition=%([\w.\-]+), body=%([\w.\-]+)', hlo))
  unrolled = run_kernels(hlo, outer_body)
  names = [k.name for k in unrolled]
  assert all(names.count(k.name) == 5 for k in kernels(hlo, inner_body))
  assert all(names.count(k.name) == 6 for k in kernels(hlo, condition_of[inner_body]))
  assert sum(k.bytes for k in unrolled) >= 5 * once
  entry = [k.name for k in run_kernels(hlo)]
  assert all(entry.count(k.name) == 15 for k in kernels(hlo, inner_body))
  assert all(entry.count(k.name) == 4 for k in kernels(hlo, condition_of[outer_body]))
  outer_condition = kernels(hlo, condition_of[outer_body])
  assert len(entry) == 3 * len(unrolled) + 4 * len(outer_condition) + len(kernels(hlo))
  with pytest.raises(ValueError, match='trip count'):
    run_kernels(_compiled(lambda x, n: jax.lax.fori_loop(0, n, lambda i, c: c * 2, x),
                          jnp.ones(4), 3))
