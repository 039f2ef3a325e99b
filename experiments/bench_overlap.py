"""Step wall time with the judge overlapped (``train.overlap``) vs sequential.

One training step of the medium model (sampling, decode, pairwise judging of
every group, advantages, one GRPO update) through the trainer's own code:
``Trainer._rewards_and_updates`` (sequential) and ``overlap.trainer_step``
(overlapped), on a stand-in host object holding the medium transformer, a
stand-in decoder (the packed latents through a fixed 1x1 projection, sigmoid
and 8x nearest upsampling: 256 px images, JPEG-encoded for the judge like real
ones; a VAE's cost is not what is measured here) and a local fake judge
server.

The fake judge answers every pair request after a fixed latency (2 s at the
medium size, a realistic time for a reasoning VLM judging two images) with
up to 32 requests in flight (the client's ``max_concurrency``); its verdict is
deterministic (the larger JPEG wins). With N groups of G images there are
N G(G-1)/2 pair requests, served in waves of 32.

Sequentially the accelerator idles for the whole judging; overlapped, the
first micro-batch (one group) trains as soon as its group is judged, while the
judge works on the others. ``judge_wait_s``: the time the step waited on the
judge with no accelerator work left (sequential: all of the judging).
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from experiments import bench_common as bc

SIZES = {
    "tiny": dict(problem="tiny", prompts=2, group=4, steps=3, latency_s=0.2, in_flight=4, reps=1),
    "medium": dict(problem="medium", prompts=4, group=8, steps=10, latency_s=2.0, in_flight=32, reps=2),
}


def _answer(body: dict) -> str:
    urls = [p["image_url"]["url"] for p in body["messages"][0]["content"] if p["type"] == "image_url"]
    better = 1 if len(urls[0]) >= len(urls[1]) else 2
    return f"<think>fake judge</think><answer>Image {better} is better</answer>"


class FakeJudge:
    """A local OpenAI-style chat server answering each request after ``latency_s``."""

    def __init__(self, latency_s: float):
        self.requests = 0
        lock = threading.Lock()
        judge = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
                with lock:
                    judge.requests += 1
                time.sleep(latency_s)
                raw = json.dumps({"choices": [{"message": {"content": _answer(body)}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

        class Server(ThreadingHTTPServer):
            request_queue_size = 128
            daemon_threads = True

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def worker(problem: dict, prompts: int, group: int, steps: int, latency_s: float, in_flight: int,
           reps: int) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from prefgrpo_jax import config as config_lib, grpo, overlap, sampling, sharding, train
    from prefgrpo_jax.models import autoencoder
    from prefgrpo_jax.rewards import registry
    from prefgrpo_jax.rewards.judge import VLMJudge

    prob = bc.Problem.from_json(problem)
    graphdef, params = bc.jax_init_flux(prob, remat=True, remat_policy="dots_with_no_batch_dims_saveable")
    velocity_fn = bc.jax_velocity_fn(graphdef)
    L, C = prob.num_img_tokens, prob.model_kwargs()["in_channels"]
    h, w = 2 * prob.grid[0], 2 * prob.grid[1]
    n_img = prompts * group
    cond = bc.jax_cond(bc.make_cond_np(prob, n_img))

    @jax.jit
    def decode(proj, packed):  # stand-in decoder: [b, L, C] -> [b, 8h, 8w, 3] in [0, 1]
        latents = autoencoder.unpack_latents(packed, h, w)  # [b, C/4, h, w]
        rgb = jax.nn.sigmoid(jnp.einsum("bchw,cd->bhwd", latents, proj))
        return jnp.repeat(jnp.repeat(rgb, 8, axis=1), 8, axis=2)

    server = FakeJudge(latency_s)
    judge = VLMJudge(server.url, "fake", max_concurrency=in_flight, timeout_s=60.0 + latency_s, retries=0)
    sampler = sampling.SamplerConfig(num_steps=steps, eta=0.7, mode="flow", group_size=group)
    gcfg = grpo.GRPOConfig(clip_range=1e-4, timestep_fraction=0.6, micro_batches=prompts)
    opt = grpo.make_optimizer(1e-5, weight_decay=1e-4, max_grad_norm=1.0)

    class StepHost:
        """What ``Trainer.step``'s reward-and-update paths use, around the medium model."""

        rollout_batch = train.Trainer.rollout_batch
        local_rows = train.Trainer.local_rows
        sequential = train.Trainer._rewards_and_updates

        def __init__(self):
            self.config = config_lib.RunConfig(train=config_lib.TrainConfig(group_size=group, reward_image="x0_pred"))
            self.mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
            self.sampler, self.grpo, self.local_prompts = sampler, gcfg, prompts
            self.decode = decode
            self.vae_params = jax.random.normal(jax.random.key(7), (C // 4, 3))
            self.reward = registry.build_reward_mix({"vlm_judge": 1.0}, {"vlm_judge": {"judge": judge}})
            # As the trainer: the state lives on the mesh and every update returns it
            # there, so the two paths share their compiled programs.
            repl = sharding.replicated(self.mesh)
            self.state = jax.device_put(grpo.init_train_state(params, opt), repl)
            kw = {"jit_kwargs": {"out_shardings": (repl, repl)}}
            self.train_step = grpo.make_train_step(velocity_fn, sampler, gcfg, opt, **kw)
            self.split_step = grpo.make_train_step(velocity_fn, sampler, gcfg, opt, split=True, **kw)
            self.overlap_plan = overlap.plan(prompts, gcfg.micro_batches, "group", False)
            self.ref_params = self.ema_update = self.frozen = None  # no KL reference, no LoRA

    host = StepHost()
    prompt_list = [f"prompt {n}" for n in range(prompts)]

    def step(variant: str, index: int) -> dict[str, float]:
        t0 = time.perf_counter()
        requests0 = server.requests
        k_sample, k_train = jax.random.split(jax.random.fold_in(jax.random.key(0), index))
        traj = sampling.sample_trajectory(velocity_fn, sampler, host.state["params"], k_sample, cond, (L, C))
        if variant == "overlapped":
            *_, timings = overlap.trainer_step(host, traj, prompt_list, cond, None, k_train, 0, 0)
            reward_s, wait_s = timings["reward_time_s"], timings["judge_wait_s"]
        else:
            *_, reward_s = host.sequential(traj, prompt_list, cond, None, k_train, 0, 0)
            wait_s = reward_s  # the decoded images are on the host: the accelerator idles throughout
        jax.block_until_ready(host.state)
        return {"step_s": time.perf_counter() - t0, "judge_wait_s": wait_s, "reward_time_s": reward_s,
                "requests": server.requests - requests0}

    try:
        out: dict[str, Any] = {"first": {}, "steps": {"sequential": [], "overlapped": []}}
        for variant in ("sequential", "overlapped"):  # compiles
            out["first"][variant] = step(variant, 0)
        for rep in range(reps):  # alternated, so drifting load hits both alike
            for variant in ("sequential", "overlapped"):
                out["steps"][variant].append(step(variant, 1 + rep))
    finally:
        judge.close()
        server.stop()
    out["pairs_per_step"] = prompts * group * (group - 1) // 2
    return out


def run(size: str, out_dir: str, threads: int, argv: list[str],
        overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    started, load0, s, prob, _ = bc.run_setup(SIZES, size, overrides, None)
    r = bc.run_worker("experiments.bench_overlap:worker",
                      dict(problem=prob.to_json(), prompts=s["prompts"], group=s["group"], steps=s["steps"],
                           latency_s=s["latency_s"], in_flight=s["in_flight"], reps=s["reps"]),
                      threads=threads)
    summary = {}
    for variant, steps in r["steps"].items():
        summary[variant] = {k: statistics.median(x[k] for x in steps)
                            for k in ("step_s", "judge_wait_s", "reward_time_s")}
    seq, ovl = summary["sequential"], summary["overlapped"]
    payload = {"config": {"size": size, **s, "model": prob.describe(), "threads": threads},
               "summary": summary, "speedup": seq["step_s"] / ovl["step_s"], "raw": r}
    rows = [[variant, x["step_s"], x["judge_wait_s"], x["reward_time_s"]] for variant, x in summary.items()]
    waves = -(-r["pairs_per_step"] // s["in_flight"])
    md = [
        f"Model `{prob.model}` ({prob.describe()['params']:,} params), {s['prompts']} prompts x G = "
        f"{s['group']}, {s['steps']} SDE steps, one update of {s['prompts']} micro-batches (one group "
        f"each), fp32, {threads} threads. Fake judge: {s['latency_s']} s per pair request, "
        f"{s['in_flight']} in flight: {r['pairs_per_step']} pairs per step in {waves} waves "
        f"(>= {waves * s['latency_s']:.0f} s of judging). Median of {s['reps']} steps each, alternated, "
        "after one compiling step each.\n",
        bc.md_table(["step", "wall s", "judge_wait_s", "reward_time_s"], rows),
        "",
        f"Overlapped vs sequential: x{payload['speedup']:.2f} step throughput. The gain is bounded by "
        "the shorter of judging and training: here the first group is judged after one wave and its "
        "micro-batch trains while later waves run; what remains of judge_wait_s is the first wave "
        "(nothing can train before one group is judged) plus any wave still running when the "
        "previous micro-batch is done.",
    ]
    bc.write_results("overlap", out_dir, payload, "\n".join(md), started=started, load_before=load0, argv=argv)
    return payload
