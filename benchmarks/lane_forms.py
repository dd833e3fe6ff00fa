"""The programs that the benchmark scripts time or compile: the local-step forms of
benchmarks/lane_step.py (what each is, its docstring says) and the CNN's round that
benchmarks/gpu_aot.py compiles for an H100; the convolution's passes as bare matrix products
(benchmarks/conv_passes.py's gemm form); and the scripts' --convs flag."""


def conv_forms(values: list[str]) -> tuple[str, ...]:
  """The convolution forms a --convs flag names (models.CONV_FORMS), every one for `all`."""
  from absl import app
  from fathom_sim.models import CONV_FORMS
  convs = CONV_FORMS if values == ['all'] else tuple(values)
  unknown = sorted(set(convs) - set(CONV_FORMS))
  if unknown:
    raise app.UsageError(f'--convs: {unknown} not among {CONV_FORMS} (or all)')
  return convs


def tiles(values: list[str]) -> list[str]:
  """A --tiles flag's values, each checked by conv_kernels.parse_tile before anything compiles."""
  from absl import app
  from fathom_sim import conv_kernels
  try:
    conv_kernels.check_tiles(values)
  except ValueError as e:
    raise app.UsageError(f'--tiles: {e}')
  return values


def forms_for(lanes: int, steps: int, clients: int, b: int, chunks: tuple[int, ...] = (),
              compute_dtype: str = 'float32', conv: str = 'matmul'
              ) -> tuple[dict, tuple, int, dict]:
  """name -> jitted f(params, source, num_iterations) over `lanes` lanes, the arguments to
  call them with, the steps per lane (a multiple of `clients`), and name -> jitted one step
  of `selects` / `bare_scan` on (params, source), for XLA's cost analysis."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from fathom_sim.client import lane_init, lane_step, lane_train
  from fathom_sim.models import COMPUTE_DTYPES, EmnistCNN, classifier
  from fathom_sim.types import CohortTable

  k = steps - steps % clients
  model = classifier('emnist_cnn', EmnistCNN(conv=conv, dtype=COMPUTE_DTYPES[compute_dtype]))
  data = np.random.default_rng(0)
  source = {'x': jnp.asarray(data.random((lanes, k * b, 28, 28), np.float32)),
            'y': jnp.asarray(data.integers(0, 62, (lanes, k * b)), jnp.int32)}
  init = model.init(jax.random.PRNGKey(0), {'x': source['x'][0, :1]})
  params = jax.tree.map(lambda p: jnp.broadcast_to(p, (lanes,) + p.shape), init)
  # Every lane runs `clients` clients of k / clients steps; slot `clients` is the sentinel.
  table = CohortTable(client=jnp.arange(clients + 1, dtype=jnp.int32),
                      num_examples=jnp.array([k * b / clients] * clients + [0], jnp.float32),
                      num_steps=jnp.array([k // clients] * clients + [0], jnp.int32))
  slots = jnp.arange(clients, dtype=jnp.int32)
  stream = jnp.arange(k * b + b, dtype=jnp.int32) % (k * b)
  mask = jnp.ones(b, bool)

  # The loop bound is an argument, as in a round (the longest lane, read from the cohort
  # table): XLA:GPU then cannot know the trip count, and reads the loop's predicate back at
  # every step, as it does in a round. A constant bound would hide that.
  def lane(p, src, num_iterations, chunk=1):
    return lane_train(model.loss, p, jnp.float32(0.05), jnp.int32(b), jax.random.PRNGKey(2),
                      table, num_iterations, slots, stream, src, batch_pad=b, chunk=chunk)

  def sgd_step(p, src, i):
    batch = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, i * b, b), src)
    g = jax.grad(model.loss)(p, batch, mask, jax.random.PRNGKey(1))
    return jax.tree.map(lambda w, gw: w - 0.05 * gw, p, g)

  def bare_scan(p, src, num_iterations):
    del num_iterations  # a scan of k steps: a known trip count, the floor
    return jax.lax.scan(lambda p, i: (sgd_step(p, src, i), None), p, jnp.arange(k))[0]

  # One lane runs unbatched, as on a CPU device that holds one lane; a vmap of one lane would
  # turn the cond into selects, and on CPU also slows the step itself (batched dots).
  first = lambda f: lambda p, src, n: f(*jax.tree.map(lambda a: a[0], (p, src)), n)
  lanewise = lambda f: jax.vmap(f, in_axes=(0, 0, None))
  forms = {}
  if lanes == 1:
    forms['branch'] = jax.jit(first(lane))
  forms['selects'] = jax.jit(lanewise(lane))
  for c in chunks:
    chunked = lambda p, src, n, c=c: lane(p, src, n, chunk=c)
    forms[f'chunk{c}'] = jax.jit(first(chunked) if lanes == 1 else lanewise(chunked))
  forms['bare_scan'] = jax.jit(first(bare_scan) if lanes == 1 else lanewise(bare_scan))

  # One step of each on its own, for XLA's cost analysis (a loop's may count its body once).
  def round_step(p, src):
    return lane_step(model.loss, lane_init(p, clients), p, jnp.float32(0.05), jnp.int32(b),
                     jax.random.PRNGKey(2), table, slots, stream, src, batch_pad=b)

  one_step = {name: jax.jit(jax.vmap(f)) for name, f in
              (('selects', round_step), ('bare_scan', lambda p, src: sgd_step(p, src, 0)))}
  return forms, (params, source, jnp.asarray(k, jnp.int32)), k, one_step


def abstract(tree, sharding):
  """Shapes, dtypes and `sharding` of a pytree's arrays, to lower a program on devices that
  may not be there."""
  import jax
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def round_hlo(cohort_size: int, conv: str, dtype: str, mesh,
              num_clients: int) -> tuple[str, int, int]:
  """(optimized HLO, lanes, the longest lane's steps) of round 1's program on `mesh`'s one
  device, built as launch/benchmark.py's cohort sweep runs the CNN there: FedAvg at the FEMNIST
  reference values, the FEMNIST-shaped training set on the device, every client side by side up
  to run.MAX_ACCELERATOR_LANES lanes."""
  import jax.numpy as jnp
  from fathom_sim.config import base_config
  from fathom_sim.data.sampling import sample_cohort
  from fathom_sim.data.plan import Planner
  from fathom_sim.mesh import by_client, replicated
  from fathom_sim.round import make_round
  from fathom_sim.run import MAX_ACCELERATOR_LANES, batch_moves, build, init_state
  c = base_config()
  c.algorithm, c.cohort_size = 'fedavg', cohort_size
  c.model.name, c.model.conv, c.model.compute_dtype = 'emnist_cnn', conv, dtype
  c.data.name, c.data.num_clients, c.data.in_memory = 'femnist_synthetic', num_clients, True
  c.num_devices, c.local_loop, c.data_on_device = 1, 'device', 'yes'
  c.lanes_per_device = lanes = min(cohort_size, MAX_ACCELERATOR_LANES)  # one H100's default
  run = build(c)  # on this host's devices; only the round is compiled for the mesh's
  planner = Planner(run.task.train, cohort_size, lanes, c.seed, resident=True,
                    lanes_per_buffer=lanes, exact_batch=not batch_moves(c))
  plan = planner.plan(sample_cohort(run.task.train, c.seed, 1, cohort_size), 1, c.epochs,
                      c.batch_size)
  round_fn = make_round(loss_fn=run.model.loss, server_opt=run.server_opt, tuner=run.tuner,
                        mesh=mesh, source_per_device=False)
  everywhere = replicated(mesh)
  args = (abstract(init_state(run), everywhere), abstract(plan.table, everywhere),
          *abstract((plan.lanes.slots, plan.lanes.stream), by_client(mesh)),
          abstract(run.task.train.features, everywhere),
          abstract(jnp.int32(plan.batch_size), everywhere))
  hlo = round_fn.lower(*args, batch_pad=plan.batch_pad).compile().as_text()
  return hlo, lanes, int(plan.lane_steps.max())


def gemm_passes(x, k, dy) -> dict:
  """Each pass of the convolution of x [L, B, H, W, Cin] by k [L, 3, 3, Cin, Cout] as its one
  matrix product per lane, on operands made here, outside what is timed: name -> (f, args).
  forward: patches @ k; input's gradient: dy @ k^T, the patches' gradient (im2col then sums
  its 9 shifted views back onto x, not done here); kernel's gradient: patches^T @ dy."""
  import jax
  import jax.numpy as jnp
  lanes, batch, h, w, cin = x.shape
  cout = k.shape[-1]
  rows = batch * (h - 2) * (w - 2)
  # Patch features in (row, column, channel) order, as models._conv_matmul makes them.
  patches = jnp.concatenate([x[:, :, i:i + h - 2, j:j + w - 2, :] for i in range(3)
                             for j in range(3)], axis=-1).reshape(lanes, rows, 9 * cin)
  kmat = k.reshape(lanes, 9 * cin, cout)
  dymat = dy.reshape(lanes, rows, cout)
  # Every pass's least bytes are the three matrices once (it reads two and writes the third).
  return {'forward': (jax.vmap(jnp.matmul), patches, kmat),
          'input_grad': (jax.vmap(lambda d, m: d @ m.T), dymat, kmat),
          'kernel_grad': (jax.vmap(lambda p, d: p.T @ d), patches, dymat)}
