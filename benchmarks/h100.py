"""An H100 SXM described to XLA, for compiling GPU programs on a machine without a GPU
(benchmarks/gpu_aot.py, benchmarks/kernel_ptx.py; h100_mesh needs the CUDA plugin of the pinned
jax, `pip install "jax[cuda12]==0.10.2"`, not a GPU), and what one of its SMs holds at once."""

# An H100 SXM 80GB (the GPU of docs/benchmarks.md's runs) in XLA's GpuTargetConfig text
# format: the part's public figures.
H100_SXM = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84929347584
  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 minor: 0 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
runtime_version { major: 12 minor: 9 }
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""


def h100_mesh():
  """A one-device `clients` mesh of a described H100 (no GPU needed)."""
  import jax
  from jax.experimental import topologies
  from fathom_sim.mesh import CLIENTS
  try:
    topology = topologies.get_topology_desc('h100', 'cuda', target_config=H100_SXM,
                                            topology='1x1x1')
  except Exception as e:  # noqa: BLE001  (no CUDA plugin: say what to install)
    raise SystemExit(f'cannot compile for an H100 here ({type(e).__name__}: {e}); install the '
                     'CUDA plugin of the pinned jax: pip install "jax[cuda12]==0.10.2"')
  return jax.sharding.Mesh(topology.devices, (CLIENTS,))


# sm_90 (H100/H200) per-SM limits, from NVIDIA's CUDA occupancy tables.
MAX_WARPS, MAX_CTAS, REGISTERS, REG_UNIT = 64, 32, 65536, 256
SHARED, SHARED_PER_CTA = 233472, 1024
SMS = 132


def occupancy(threads: int, registers: int, shared: int) -> tuple[int, str]:
  """CTAs an sm_90 SM holds at once, and the limit that binds (the first of registers, shared
  memory, warps, CTAs where two bind alike)."""
  warps = -(-threads // 32)
  per_warp = -(-registers * 32 // REG_UNIT) * REG_UNIT
  limits = {'registers': REGISTERS // (per_warp * warps),
            'shared': SHARED // (shared + SHARED_PER_CTA),
            'warps': MAX_WARPS // warps, 'ctas': MAX_CTAS}
  binding = min(limits, key=limits.get)
  return limits[binding], binding
