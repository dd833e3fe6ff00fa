"""XLA's own estimate of a program's memory traffic and arithmetic, for the benchmark scripts."""


def xla_cost(f, *args) -> tuple[float, float]:
  """(bytes accessed, flops) of jitted f on `args`: XLA's cost analysis of the compiled
  program, after fusion on this platform; NaN where the platform gives none."""
  cost = f.lower(*args).compile().cost_analysis() or {}
  cost = cost[0] if isinstance(cost, list) else cost  # older jax: one dict per program
  return (float(cost.get('bytes accessed', float('nan'))),
          float(cost.get('flops', float('nan'))))
