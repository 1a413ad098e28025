"""bnref.jax against flax.linen.BatchNorm, both jitted, measured in the same process.

    python benchmarks/bench_jax.py [--repeats 9]

float32, training mode, NHWC (64, 56, 56, 64) and (4096, 1024), ``block_until_ready`` on
every result. Flax runs with its defaults (``use_fast_variance=True``: E[x²]−E[x]², the
one-pass variance bnref refuses to use) and, for reference, with ``use_fast_variance=False``.
Forward returns the output and the new batch statistics; forward+backward takes the gradient
of ``sum(y * dy)`` with respect to the input and both parameters. Times are medians over
alternating rounds (see ``_timing.py``).
"""

from __future__ import annotations

from _timing import MemoryFloor, medians, reuse_freed_memory

reuse_freed_memory()

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp

import bnref.jax as bj

SHAPES = [(64, 56, 56, 64), (4096, 1024)]
TARGET = 0.5


def jitted(apply):
    """Jitted forward ``(params, stats, x) -> (y, new stats)`` and gradient of ``sum(y * dy)``
    with respect to ``x`` and the parameters, from an un-jitted ``apply`` of that form."""
    forward = jax.jit(apply)

    @jax.jit
    def grads(params, stats, x, dy):
        def objective(x, params):
            return jnp.sum(apply(params, stats, x)[0] * dy)
        return jax.grad(objective, argnums=(0, 1))(x, params)

    return forward, grads


def flax_functions(x, fast: bool):
    module = nn.BatchNorm(use_running_average=False, use_fast_variance=fast)
    variables = module.init(jax.random.key(0), x)

    def apply(params, stats, x):
        y, updates = module.apply({"params": params, "batch_stats": stats}, x,
                                  mutable=["batch_stats"])
        return y, updates["batch_stats"]

    return variables["params"], variables["batch_stats"], *jitted(apply)


def bnref_functions(x):
    layer = bj.BatchNorm()
    variables = layer.init(x)

    def apply(params, stats, x):
        y, new = layer.apply({"params": params, "batch_stats": stats}, x, training=True)
        return y, new["batch_stats"]

    return variables["params"], variables["batch_stats"], *jitted(apply)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    print(f"jax {jax.__version__}, float32, {jax.devices()[0].platform}, medians over 5 "
          f"alternating rounds of {args.repeats} calls")
    header = (f"{'shape':<18} {'pass':<17} {'flax ms':>8} {'bnref ms':>9} {'ratio':>6} "
              f"{'flax exact-var ms':>17} {'flax/floor':>10} {'bnref/floor':>11} target")
    print(header)
    print("-" * len(header))
    for shape in SHAPES:
        keys = jax.random.split(jax.random.key(1), 2)
        x = jax.random.normal(keys[0], shape, jnp.float32)
        dy = jax.random.normal(keys[1], shape, jnp.float32)
        floor = MemoryFloor(x.size * 4)
        flax_fast, flax_exact, ours = (flax_functions(x, True), flax_functions(x, False),
                                       bnref_functions(x))

        def timed(fns, kind, x=x, dy=dy):
            params, stats, forward, grads = fns
            if kind == "forward":
                return lambda: jax.block_until_ready(forward(params, stats, x))
            return lambda: jax.block_until_ready(grads(params, stats, x, dy))

        for kind in ("forward", "forward+backward"):
            t_flax, t_ours = medians(timed(flax_fast, kind), timed(ours, kind), args.repeats)
            _, t_exact = medians(timed(flax_fast, kind), timed(flax_exact, kind),
                                 max(3, args.repeats // 3))
            ratio = t_ours / t_flax
            verdict = "ok" if ratio <= TARGET else "MISSED"
            print(f"{shape!s:<18} {kind:<17} {1e3 * t_flax:8.2f} {1e3 * t_ours:9.2f} "
                  f"{ratio:6.2f} {1e3 * t_exact:17.2f} {floor.ratio(t_flax, kind):10.2f} "
                  f"{floor.ratio(t_ours, kind):11.2f} <= {TARGET} {verdict}")


if __name__ == "__main__":
    main()
