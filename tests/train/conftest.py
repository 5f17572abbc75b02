"""Shared set-up of the train tests: faster XLA CPU compiles and a persistent compilation cache.

The tiny model's train step takes ~30-60 s to compile on 2 cores; the same programs recur across tests
(and across runs), so a persistent cache (default: $TMPDIR/cheers_jax_test_jax_cache, override with
CHEERS_TEST_JAX_CACHE, '' turns it off) makes every recompile a lookup. LLVM's expensive passes are
turned off for compile speed (same numerics, measured bit-identical on the train step).
"""

import os
import tempfile

# fast compiles; and XLA:CPU's concurrency-optimised scheduler off: with the activation shardings in force,
# it lets a fake device start two independent collectives in different orders and the 8-device step
# deadlocked (collective rendezvous timeouts) on 2 cores
_FAST = "--xla_llvm_disable_expensive_passes=true --xla_cpu_enable_concurrency_optimized_scheduler=false"
if _FAST not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FAST).strip()
CACHE_DIR = os.environ.get("CHEERS_TEST_JAX_CACHE", os.path.join(tempfile.gettempdir(), "cheers_jax_test_jax_cache"))

import jax  # noqa: E402  (after XLA_FLAGS)

if CACHE_DIR:
  jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
