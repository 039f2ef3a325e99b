"""What XLA compiles for the medium benchmark's sampling loop, to compare two checkouts.

  cd <checkout> && PYTHONPATH=. python -m experiments.sampler_hlo_summary /tmp/<name>.hlo

Compiles ``sampling.sample_trajectory`` for the sampling benchmark's medium
problem (G=8, 25 SDE steps, fp32; the weights are random: the program does not
depend on them), prints XLA's cost analysis (FLOPs, bytes accessed), the HLO
op histogram and three timed calls, and writes the HLO text. Two checkouts
whose summaries agree run the same program: a timing gap between them is the
machine, not the code.
"""

from __future__ import annotations

import collections
import json
import re
import sys
import time

import jax
from flax import nnx

from experiments import bench_common as bc
from prefgrpo_jax import sampling
from prefgrpo_jax.models import flux


def main(hlo_out: str) -> None:
    prob = bc.PROBLEMS["medium"]
    graphdef, params = nnx.split(flux.FluxTransformer(flux.FluxConfig(**prob.model_kwargs()),
                                                      rngs=nnx.Rngs(0)), nnx.Param)
    velocity_fn = bc.jax_velocity_fn(graphdef)
    cond = bc.jax_cond(bc.make_cond_np(prob, 8))
    config = sampling.SamplerConfig(num_steps=25, eta=0.7, mode="flow", group_size=8)
    shape = (prob.num_img_tokens, prob.model_kwargs()["in_channels"])
    key = jax.random.key(0)
    compiled = sampling.sample_trajectory.lower(velocity_fn, config, params, key, cond, shape).compile()
    text = compiled.as_text()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    ops = collections.Counter(re.findall(r"=\s*\S+\s+([a-z\-]+)\(", text))
    print(json.dumps({"flops": cost.get("flops"), "bytes_accessed": cost.get("bytes accessed"),
                      "ops": dict(ops.most_common())}))
    with open(hlo_out, "w") as f:
        f.write(text)

    def run():
        return jax.block_until_ready(sampling.sample_trajectory(velocity_fn, config, params, key, cond, shape))

    run()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        run()
        times.append(round(time.perf_counter() - t, 2))
    print(json.dumps({"seconds_per_group": times}))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/sampler.hlo")
