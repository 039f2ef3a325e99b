"""LoRA: adapters on the tiny FLUX, what trains, the KL reference, peft export parity.

The parity test loads our ``pytorch_lora_weights.safetensors`` with
``diffusers.FluxPipeline.load_lora_weights`` (peft) into the tiny diffusers
FLUX the base weights came from and compares velocities in fp32.
"""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open

from prefgrpo_jax import config as config_lib
from prefgrpo_jax import grpo, lora, sampling
from prefgrpo_jax.models import flux
from prefgrpo_jax.pipeline import make_velocity_fn
from train_helpers import REPO
from velocity_helpers import jax_velocity, torch_velocity, velocity_inputs

# Every layout: the reference's targets (double blocks, and the single blocks'
# q/k/v by peft's suffix rule) plus the single blocks' proj_mlp and both
# proj_out (single blocks and the top-level output projection).
TARGETS = tuple(lora.REFERENCE_TARGETS) + ("proj_mlp", "proj_out")
SPEC = flux.LoraSpec(rank=4, alpha=8.0, targets=TARGETS)


@pytest.fixture(scope="module")
def base_model(tiny_flux_dir):
    return flux.load_diffusers(tiny_flux_dir / "transformer")


def _lora_parts(base_model, spec=SPEC, init="default"):
    """``(graphdef, fresh adapters, base params)``."""
    graphdef, abstract, _ = lora.split(lora.abstract_model(base_model, spec))
    _, base = nnx.split(base_model)
    return graphdef, lora.init_adapters(abstract, jax.random.key(0), init), base


def _with_random_b(adapters, scale=0.05):
    """Adapters as if trained: B drawn too (B = 0 would make every check trivial)."""
    leaves = []
    for i, (path, var) in enumerate(nnx.to_flat_state(adapters)):
        value = var.get_value()
        if path[-1] == "lora_b":
            value = scale * jax.random.normal(jax.random.key(100 + i), value.shape, value.dtype)
        leaves.append((path, var.replace(value)))
    return nnx.from_flat_state(leaves)


def _rel(a, b):
    return float(np.abs(a - b).max()) / float(np.abs(b).max())


def test_targets_follow_peft_suffix_matching():
    spec = flux.LoraSpec(rank=2, alpha=2.0, targets=lora.REFERENCE_TARGETS)
    assert spec.adapted("double") == flux.DOUBLE_LORA_TARGETS
    assert spec.adapted("single") == ("attn.to_q", "attn.to_k", "attn.to_v")  # "attn.to_q" matches them too
    assert spec.adapted("final") == ()
    assert flux.LoraSpec(rank=2, alpha=2.0, targets=("to_q",)).adapted("single") == ("attn.to_q",)
    assert SPEC.adapted("final") == ("proj_out",)
    with pytest.raises(ValueError, match=r"targets \['norm1.linear'\] match no adaptable FLUX linear"):
        flux.LoraSpec(rank=2, alpha=2.0, targets=("to_q", "norm1.linear"))


@pytest.mark.parametrize("field, value, message", [
    ("rank", -1, "config.model.lora.rank=-1: must be an integer >= 0"),
    ("alpha", 0.0, "model.lora.alpha=0.0: must be > 0"),
    ("targets", [], "model.lora.targets is empty"),
    ("targets", ["x_embedder"], "config.model.lora.targets ['x_embedder'] match no adaptable FLUX linear"),
    ("init", "pissa", "config.model.lora.init='pissa': must be one of ('default', 'gaussian')"),
])
def test_lora_config_errors_name_the_field(field, value, message):
    c = config_lib.base_config()
    c.model.lora.rank = 8
    c.model.lora[field] = value
    problems = config_lib.LoraConfig.from_dict(c.model.lora).problems("model.lora.", "train")
    assert any(message in p for p in problems), problems


def _config(name: str):
    """``configs/<name>.py``'s config."""
    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_lora_off_by_default_and_on_in_flux_lora_config():
    assert config_lib.RunConfig().model.lora.spec() is None
    got = config_lib.RunConfig.from_dict(_config("flux_lora")).model.lora.spec()
    assert (got.rank, got.alpha, got.scale) == (64, 128.0, 2.0)
    assert got.targets == flux.DOUBLE_LORA_TARGETS


def test_zero_b_init_leaves_the_output_unchanged(base_model):
    graphdef, adapters, base = _lora_parts(base_model)
    for path, var in nnx.to_flat_state(adapters):
        value = np.asarray(var.get_value())
        if path[-1] == "lora_b":
            assert not np.any(value), path
        else:  # A is drawn, as peft's kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(in))
            assert 0 < np.abs(value).max() <= 1 / np.sqrt(value.shape[-2]), path
    x = velocity_inputs(base_model.cfg)
    np.testing.assert_array_equal(jax_velocity(nnx.merge(graphdef, adapters, base), x),
                                  jax_velocity(base_model, x))


def test_gaussian_init_draws_a_with_std_one_over_rank():
    abstract = {"a": nnx.LoRAParam(jax.ShapeDtypeStruct((64, 512, 8), jnp.float32)),
                "b": {"lora_b": nnx.LoRAParam(jax.ShapeDtypeStruct((8, 4), jnp.float32))}}
    got = lora.init_adapters(nnx.State(abstract), jax.random.key(0), "gaussian")
    a = np.asarray(got["a"].get_value())
    assert abs(a.std() - 1 / 8) < 0.01 and abs(a.mean()) < 0.01
    assert not np.any(np.asarray(got["b"]["lora_b"].get_value()))


def test_peft_export_loads_in_diffusers_with_the_same_velocity(base_model, tiny_flux_dir, tmp_path):
    pytest.importorskip("peft")
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    graphdef, adapters, base = _lora_parts(base_model)
    adapters = _with_random_b(adapters)
    ours = nnx.merge(graphdef, adapters, base)
    file = lora.save_peft(adapters, base_model.cfg, SPEC, tmp_path / "lora")
    with safe_open(str(file), "np") as f:
        keys = set(f.keys())
    cfg = base_model.cfg
    # diffusers' names: one A/B pair per diffusers Linear, fused ones split.
    assert "transformer.transformer_blocks.0.attn.add_k_proj.lora_A.weight" in keys
    assert "transformer.single_transformer_blocks.1.proj_mlp.lora_B.weight" in keys
    assert "transformer.proj_out.lora_A.weight" in keys
    assert len(keys) == 2 * (12 * cfg.depth + 5 * cfg.depth_single + 1), sorted(keys)[:5]

    pipe = diffusers.FluxPipeline.from_pretrained(str(tiny_flux_dir), torch_dtype=torch.float32)
    x = velocity_inputs(cfg)
    before = torch_velocity(pipe.transformer.eval(), x)
    pipe.load_lora_weights(str(file.parent))
    ref = torch_velocity(pipe.transformer.eval(), x)
    v = jax_velocity(ours, x)
    rel = _rel(v, ref)
    print(f"LoRA export velocity vs diffusers+peft: rel max-abs {rel:.1e}")
    assert rel <= 1e-4
    # The adapters moved the velocity far beyond the bound (the check has teeth,
    # and load_lora_weights used alpha from the file's metadata, not alpha = r).
    assert _rel(before, ref) > 100 * 1e-4
    # The merged transformer (export.lora_merged, sample/eval) is the same model.
    merged = lora.merged_model(base_model, adapters, SPEC)
    assert _rel(jax_velocity(merged, x), v) <= 1e-5


def _cond(x):
    """``make_velocity_fn``'s cond pytree of ``velocity_inputs``."""
    b, length, _ = x["img"].shape
    return {"img_ids": jnp.broadcast_to(x["img_ids"], (b, length, 3)), "txt": jnp.asarray(x["txt"]),
            "txt_ids": jnp.broadcast_to(x["txt_ids"], (b, x["txt"].shape[1], 3)), "y": jnp.asarray(x["y"]),
            "guidance": jnp.asarray(x["guidance"])}


def _tiny_grpo(base_model, kl_beta):
    graphdef, adapters, base = _lora_parts(base_model)
    velocity_fn = make_velocity_fn(graphdef)
    sampler = sampling.SamplerConfig(num_steps=3, schedule="sd3", group_size=2)
    cfg = grpo.GRPOConfig(clip_range=0.2, timestep_fraction=1.0, kl_beta=kl_beta, timestep_chunk=1)
    optimizer = grpo.make_optimizer(1e-2)
    step = grpo.make_train_step(velocity_fn, sampler, cfg, optimizer)
    x = velocity_inputs(base_model.cfg)
    cond = _cond(x)
    length = x["img"].shape[1]
    traj = sampling.sample_trajectory(velocity_fn, sampler, (adapters, base), jax.random.key(1), cond,
                                      (length, base_model.cfg.in_channels))
    batch = grpo.rollout_batch(traj, jnp.array([1.0, -1.0]), cond)
    state = grpo.init_train_state(adapters, optimizer)
    return velocity_fn, step, state, base, batch


# Compiling a GRPO step with its KL branch: 36 s on the 2 shared cores at load 3.5
# (75 s at load 7); it is the only test of these claims.
@pytest.mark.slow
def test_only_adapters_train_and_the_kl_reference_is_the_base(base_model):
    """One compiled step (kl_beta > 0) serves both claims: compiling it dominates."""
    velocity_fn, step, state, base, batch = _tiny_grpo(base_model, kl_beta=0.5)
    adapter_leaves = jax.tree.leaves(state["params"])
    base_before = jax.tree.map(np.asarray, base)
    # Adam's moments exist for the adapters and nothing else.
    adam = state["opt_state"].inner_state[-1][0]
    for moments in (adam.mu, adam.nu):
        assert jax.tree.structure(moments) == jax.tree.structure(state["params"])
    n_adapter = sum(a.size for a in adapter_leaves)
    assert sum(a.size for a in jax.tree.leaves(state["opt_state"]) if a.ndim) == 2 * n_adapter
    # Step 1: B = 0, the policy is the base, so its KL to the reference is exactly 0.
    state, m1 = step(state, batch, jax.random.key(2), None, base)
    assert float(m1["kl_ref"]) == 0.0
    assert float(m1["grad_norm"]) > 0
    for path, var in nnx.to_flat_state(state["params"]):
        if path[-1] == "lora_b":  # every B moved
            assert float(np.abs(var.get_value()).max()) > 0, path
    state, m2 = step(state, batch, jax.random.key(3), None, base)
    assert float(m2["kl_ref"]) > 0
    # The base is an input of the step, never an output: bitwise unchanged.
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, base), base_before)
    # The reference the step uses (adapters at zero) is the base model, bitwise,
    # whatever the trained adapters hold.
    x = velocity_inputs(base_model.cfg)
    ref = velocity_fn((lora.zero_adapters(state["params"]), base), jnp.asarray(x["img"]),
                      jnp.asarray(x["timesteps"]), _cond(x))
    np.testing.assert_array_equal(np.asarray(ref), jax_velocity(base_model, x))


# Compiles the sampling and training programs: 25 s on the 2 shared cores at load 3.5.
@pytest.mark.slow
def test_plan_mode_counts_adapters_as_trained_and_the_base_as_frozen(tiny_flux_dir):
    import prefgrpo_jax.toyworld.reward  # noqa: F401 (registers the tiny config's verifier rewards)
    from prefgrpo_jax import plan

    c = _config("tiny")
    c.model.path = str(tiny_flux_dir)
    c.train.prompts_per_step, c.train.group_size, c.train.num_steps = 1, 4, 4
    c.train.timestep_fraction, c.train.timestep_chunk, c.train.max_sequence_length = 0.67, 2, 8
    c.train.kl_beta = 0.1  # LoRA's reference is the adapters off: no copy to count
    c.model.lora.rank, c.model.lora.alpha = 4, 8.0
    c.plan.devices = 1
    report = plan.build_report(c)
    g = report["per_device_gib"]
    assert report["lora"] and "params (fp32 master)" not in g
    cfg = flux.diffusers_config(tiny_flux_dir)[0]
    _, abstract, base = lora.split(lora.abstract_model(flux.abstract_transformer(cfg), config_lib.LoraConfig.from_dict(c.model.lora).spec()))
    nbytes = lambda tree: sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree))  # noqa: E731
    assert g["LoRA adapters (fp32)"] * 2**30 == pytest.approx(nbytes(abstract))
    assert g["optimizer state"] * 2**30 >= 2 * nbytes(abstract)
    assert g["frozen transformer base (LoRA) (float32)"] * 2**30 == pytest.approx(nbytes(base))
    assert g["KL reference params"] == 0


def test_bf16_first_moment_halves_its_bytes():
    params = {"w": jnp.ones((64, 32), jnp.float32)}
    opt = grpo.make_optimizer(1e-3, mu_dtype=jnp.bfloat16)
    state = grpo.init_train_state(params, opt)
    adam = state["opt_state"].inner_state[-1][0]
    assert adam.mu["w"].dtype == jnp.bfloat16 and adam.nu["w"].dtype == jnp.float32
    updates, _ = opt.update({"w": jnp.full((64, 32), 0.5)}, state["opt_state"], params)
    assert updates["w"].dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(updates["w"])))
    c = config_lib.base_config()
    c.optim.mu_dtype = "float16"
    with pytest.raises(config_lib.ConfigError, match=r"config.optim.mu_dtype='float16': must be one of"):
        config_lib.validate(c, num_devices=1)
