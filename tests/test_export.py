"""Weight export (NNX -> diffusers / transformers / BFL safetensors).

Round trips against the files diffusers' own save_pretrained wrote (the
``tiny_flux_dir`` fixture), loading of the exported directory by our pipeline
and by diffusers' PyTorch pipeline, and PyTorch parity of a *changed* (as if
fine-tuned) transformer.
"""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from prefgrpo_jax import export
from prefgrpo_jax.convert import flat_params, read_safetensors
from prefgrpo_jax.models import flux
from prefgrpo_jax.models.autoencoder import AutoencoderConfig
from prefgrpo_jax.models.flux import FluxConfig, FluxTransformer
from prefgrpo_jax.models.text_encoders import CLIPTextConfig, T5Config
from prefgrpo_jax.pipeline import FluxPipeline
from pipeline_fixture import IMAGE_SIZE
from velocity_helpers import jax_velocity, torch_velocity, velocity_inputs

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

T5_LEN = 16
PROMPTS = ["a red cube above a blue sphere", "two small green cylinders"]

# component -> (exporter, weights file stem)
COMPONENTS = {
    "transformer": (export.export_flux_diffusers, "diffusion_pytorch_model"),
    "vae": (export.export_vae_diffusers, "diffusion_pytorch_model"),
    "text_encoder": (export.export_clip_text_hf, "model"),
    "text_encoder_2": (export.export_t5_hf, "model"),
}


@pytest.fixture(scope="module")
def ours(tiny_flux_dir):
    return FluxPipeline.from_pretrained(tiny_flux_dir, max_sequence_length=T5_LEN)


@pytest.fixture(scope="module")
def exported_dir(ours, tmp_path_factory):
    return export.save_pretrained(ours, tmp_path_factory.mktemp("export") / "flux")


def _assert_same_tensors(got: dict, want: dict) -> None:
    assert set(got) == set(want), (
        f"only exported: {sorted(set(got) - set(want))}; only original: "
        f"{sorted(set(want) - set(got))}")
    for k in want:
        assert got[k].dtype == want[k].dtype, (k, got[k].dtype, want[k].dtype)
        assert got[k].shape == want[k].shape, (k, got[k].shape, want[k].shape)
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def _assert_same_params(a, b) -> None:
    pa, pb = flat_params(a), flat_params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)


# ---------------------------------------------------------------------------
# Tensor-level round trips.


@pytest.mark.parametrize("component", sorted(COMPONENTS))
def test_component_round_trip_is_exact(ours, tiny_flux_dir, component):
    """load (ours) -> export == the safetensors diffusers/transformers wrote: same keys,
    dtypes, shapes and values (fp32, bit for bit)."""
    exporter, stem = COMPONENTS[component]
    want = load_file(str(tiny_flux_dir / component / f"{stem}.safetensors"))
    _assert_same_tensors(exporter(getattr(ours, component)), want)


def test_config_writers_match_library_configs(ours, tiny_flux_dir):
    def fixture_config(component):
        return json.loads((tiny_flux_dir / component / "config.json").read_text())

    t_cfg = export.flux_config_json(ours.transformer.cfg)
    fixture_t = fixture_config("transformer")
    # diffusers' out_channels=None means "= in_channels"; we write the number.
    assert fixture_t["out_channels"] is None
    assert t_cfg == {**fixture_t, "out_channels": fixture_t["in_channels"]}
    assert FluxConfig.from_diffusers(t_cfg) == ours.transformer.cfg

    v_cfg = export.vae_config_json(ours.vae.cfg)
    assert AutoencoderConfig.from_diffusers(v_cfg) == ours.vae.cfg
    fixture_vae = fixture_config("vae")
    assert {k: v for k, v in v_cfg.items() if k != "sample_size"} == {
        k: v for k, v in fixture_vae.items() if k != "sample_size"}

    t5_cfg = export.t5_config_json(ours.text_encoder_2.cfg)
    assert T5Config.from_hf(t5_cfg) == ours.text_encoder_2.cfg
    clip_cfg = export.clip_text_config_json(ours.text_encoder.cfg, bos_token_id=998,
                                            pad_token_id=999)
    assert CLIPTextConfig.from_hf(clip_cfg) == ours.text_encoder.cfg
    # Every key we write agrees with what transformers wrote for the same model.
    for component, written in (("text_encoder_2", t5_cfg), ("text_encoder", clip_cfg)):
        theirs = fixture_config(component)
        differ = {k: (v, theirs[k]) for k, v in written.items() if k in theirs and theirs[k] != v}
        assert not differ, (component, differ)

    s_cfg = export.scheduler_config_json(ours.scheduler)
    fixture_sched = json.loads((tiny_flux_dir / "scheduler" / "scheduler_config.json").read_text())
    assert s_cfg == fixture_sched
    index = json.loads((tiny_flux_dir / "model_index.json").read_text())
    assert export.model_index_json(type(ours.tokenizer).__name__,
                                   type(ours.tokenizer_2).__name__) == index


def test_unexpressible_configs_are_refused():
    model = FluxTransformer(FluxConfig.tiny(qkv_bias=False), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="qkv_bias"):
        export.export_flux_diffusers(model)
    with pytest.raises(export.ExportError, match="gated-gelu"):
        export.t5_config_json(T5Config(dense_act_fn="gelu", is_gated_act=True))


def test_parameter_without_a_place_is_an_error():
    """A parameter the exporter does not know is never silently dropped."""
    model = FluxTransformer(FluxConfig.tiny(), rngs=nnx.Rngs(0))
    model.lora_scale = nnx.Param(jnp.ones((3,)))
    with pytest.raises(export.ExportError, match="lora_scale"):
        export.export_flux_diffusers(model)


# ---------------------------------------------------------------------------
# The whole directory.


def test_exported_directory_loads_in_ours(ours, exported_dir):
    index = json.loads((exported_dir / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    assert index["transformer"] == ["diffusers", "FluxTransformer2DModel"]
    assert index["text_encoder_2"] == ["transformers", "T5EncoderModel"]
    back = FluxPipeline.from_pretrained(exported_dir, max_sequence_length=T5_LEN)
    for component in COMPONENTS:
        _assert_same_params(getattr(back, component), getattr(ours, component))
    assert back.scheduler == ours.scheduler
    for a, b in zip(back.tokenize(PROMPTS), ours.tokenize(PROMPTS)):
        np.testing.assert_array_equal(a, b)


def test_exported_directory_loads_in_diffusers_and_samples_the_same(
        tiny_flux_dir, exported_dir):
    """diffusers.FluxPipeline from the exported dir == from the original dir: every
    component's state dict, prompt encoding, and 2-step latents."""
    original = diffusers.FluxPipeline.from_pretrained(str(tiny_flux_dir), dtype=torch.float32)
    reloaded = diffusers.FluxPipeline.from_pretrained(str(exported_dir), dtype=torch.float32)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(original, name).state_dict(), getattr(reloaded, name).state_dict()
        assert a.keys() == b.keys(), name
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}.{k}"
    assert dict(original.scheduler.config) == dict(reloaded.scheduler.config)

    with torch.no_grad():
        txt, pooled, _ = original.encode_prompt(PROMPTS, None, max_sequence_length=T5_LEN)
        txt2, pooled2, _ = reloaded.encode_prompt(PROMPTS, None, max_sequence_length=T5_LEN)
    assert torch.equal(txt, txt2) and torch.equal(pooled, pooled2)

    h = w = IMAGE_SIZE // original.vae_scale_factor
    noise = torch.from_numpy(np.random.default_rng(0).normal(size=(2, 16, h, w)).astype(np.float32))
    packed = original._pack_latents(noise, 2, 16, h, w)
    kwargs = dict(prompt_embeds=txt, pooled_prompt_embeds=pooled, height=IMAGE_SIZE,
                  width=IMAGE_SIZE, num_inference_steps=2, guidance_scale=3.5,
                  output_type="latent")
    with torch.no_grad():
        ref = original(latents=packed.clone(), **kwargs).images.numpy()
        got = reloaded(latents=packed.clone(), **kwargs).images.numpy()
    err = float(np.abs(got - ref).max())
    print(f"diffusers latents, exported vs original dir: max-abs {err:.1e}")
    # Same weights bit for bit and the same torch ops: anything beyond float
    # reassociation noise would be an export bug.
    assert err <= 1e-6 * max(1.0, float(np.abs(ref).max()))


def test_bf16_export(ours, tmp_path):
    out = export.save_pretrained(ours, tmp_path / "bf16", dtype="bfloat16")
    weights = read_safetensors(out / "text_encoder_2")
    assert {a.dtype for a in weights.values()} == {np.dtype(ml_dtypes.bfloat16)}
    assert json.loads((out / "text_encoder_2" / "config.json").read_text())["dtype"] == "bfloat16"
    back = FluxPipeline.from_pretrained(out, max_sequence_length=T5_LEN)  # fp32 params
    for component in COMPONENTS:
        got, want = flat_params(getattr(back, component)), flat_params(getattr(ours, component))
        for k in want:
            np.testing.assert_array_equal(
                got[k], want[k].astype(ml_dtypes.bfloat16).astype(np.float32), err_msg=k)
    # A bf16 model exports bf16 by default, and casts exactly to fp32 on request.
    bf16 = flux.load_diffusers(out / "transformer", dtype=jnp.bfloat16)
    assert {a.dtype for a in export.export_flux_diffusers(bf16).values()} == {
        np.dtype(ml_dtypes.bfloat16)}
    t5_bf16 = export.export_t5_hf(ours.text_encoder_2, dtype=jnp.bfloat16)
    assert {a.dtype for a in t5_bf16.values()} == {np.dtype(ml_dtypes.bfloat16)}
    fp32 = export.export_flux_diffusers(bf16, dtype=np.float32)
    ref = export.export_flux_diffusers(back.transformer)
    _assert_same_tensors(fp32, ref)
    loaded = diffusers.FluxTransformer2DModel.from_pretrained(
        str(out / "transformer"), dtype=torch.bfloat16)
    w = loaded.state_dict()["x_embedder.weight"]
    assert w.dtype == torch.bfloat16
    np.testing.assert_array_equal(w.float().numpy(), ref["x_embedder.weight"])


def test_sharded_weights_load_in_ours_and_diffusers(ours, tmp_path):
    target = tmp_path / "transformer"
    export.save_transformer(ours.transformer, target, max_shard_size=40_000)
    shards = sorted(target.glob("diffusion_pytorch_model-*-of-*.safetensors"))
    assert len(shards) > 1
    index = json.loads((target / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    _assert_same_params(flux.load_diffusers(target), ours.transformer)
    torch_model = diffusers.FluxTransformer2DModel.from_pretrained(str(target))
    want = export.export_flux_diffusers(ours.transformer)
    got = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    _assert_same_tensors(got, want)
    # Re-saving unsharded removes the shards, so no reader sees a mix.
    export.save_transformer(ours.transformer, target, max_shard_size=None)
    assert sorted(p.name for p in target.iterdir()) == [
        "config.json", "diffusion_pytorch_model.safetensors"]


def test_streamed_export_holds_one_shard(ours, tmp_path):
    """The exporter hands tensors to the writer as it makes them: the host holds
    at most one shard (here 1/4 of the model), and the files are the same."""
    want = export.export_flux_diffusers(ours.transformer)
    total = sum(a.nbytes for a in want.values())
    limit = max(total // 4, max(a.nbytes for a in want.values()))
    writer = export.SafetensorsWriter(tmp_path, "model.safetensors", max_shard_size=limit)
    assert export.export_flux_diffusers(ours.transformer, sink=writer) == {}
    files = writer.close()
    assert writer.peak_buffered_bytes <= limit < total
    shards = [f for f in files if f.suffix == ".safetensors"]
    assert len(shards) >= 4 and not list(tmp_path.glob("*.tmp"))
    got = {}
    for f in shards:
        got.update(load_file(str(f)))
    _assert_same_tensors(got, want)


# ---------------------------------------------------------------------------
# A changed (as if fine-tuned) transformer in PyTorch.


def _shifted(model: FluxTransformer, delta: float) -> FluxTransformer:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a + delta, params), rest)


def test_finetuned_transformer_velocity_matches_diffusers(ours, tmp_path):
    tuned = _shifted(ours.transformer, 0.01)
    target = export.save_transformer(tuned, tmp_path / "transformer")
    torch_model = diffusers.FluxTransformer2DModel.from_pretrained(str(target)).eval()
    # The change reached the file (not the original weights re-exported).
    np.testing.assert_array_equal(
        torch_model.x_embedder.weight.detach().numpy(),
        np.asarray(ours.transformer.img_in.kernel[...]).T + np.float32(0.01))

    x = velocity_inputs(tuned.cfg)
    v = jax_velocity(tuned, x)
    ref = torch_velocity(torch_model, x)
    abs_err = float(np.abs(v - ref).max())
    rel = abs_err / float(np.abs(ref).max())
    print(f"fine-tuned export velocity vs diffusers: max-abs {abs_err:.1e}, rel {rel:.1e}")
    assert rel <= 1e-4
    # The shift changed the velocity far beyond that bound, so the check has teeth.
    v0 = jax_velocity(ours.transformer, x)
    assert float(np.abs(v0 - ref).max()) / float(np.abs(ref).max()) > 100 * 1e-4


# ---------------------------------------------------------------------------
# BFL names.


def test_bfl_export_round_trips_through_load_bfl(ours, tiny_flux_dir, tmp_path):
    tuned = _shifted(ours.transformer, 0.01)
    cfg = tuned.cfg
    tensors = export.export_flux_bfl(tuned)
    h = cfg.hidden_size
    assert tensors["double_blocks.0.img_attn.qkv.weight"].shape == (3 * h, h)
    assert tensors["single_blocks.1.norm.query_norm.scale"].shape == (cfg.head_dim,)
    assert f"single_blocks.{cfg.depth_single}.linear1.weight" not in tensors

    file = export.save_flux_bfl(tuned, tmp_path / "flux_tiny.safetensors")
    _assert_same_params(flux.load_bfl(file, cfg), tuned)
    prefixed = export.save_flux_bfl(tuned, tmp_path / "comfy.safetensors",
                                    prefix="model.diffusion_model.")
    _assert_same_params(flux.load_bfl(prefixed, cfg), tuned)

    # Against test_flux's independently written diffusers -> BFL renaming.
    from test_flux import _diffusers_to_bfl

    sd = load_file(str(tiny_flux_dir / "transformer" / "diffusion_pytorch_model.safetensors"))
    _assert_same_tensors(export.export_flux_bfl(ours.transformer), _diffusers_to_bfl(sd, cfg))


def test_legacy_layout_options_load_in_transformers(ours, tiny_flux_dir, tmp_path):
    """``text_model.``-prefixed CLIP (transformers-4 / FLUX.1 layout) and the tied T5
    copy (the full state_dict layout) load in transformers like the default layout."""
    from transformers import CLIPTextModel, T5EncoderModel

    clip_dir = tmp_path / "clip"
    export.write_safetensors(
        export.export_clip_text_hf(ours.text_encoder, prefix="text_model."), clip_dir,
        "model.safetensors")
    (clip_dir / "config.json").write_text(
        (tiny_flux_dir / "text_encoder" / "config.json").read_text())
    loaded, info = CLIPTextModel.from_pretrained(str(clip_dir), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    want = load_file(str(tiny_flux_dir / "text_encoder" / "model.safetensors"))
    _assert_same_tensors({k: v.numpy() for k, v in loaded.state_dict().items()}, want)

    t5 = export.export_t5_hf(ours.text_encoder_2, tied_copy=True)
    reference = T5EncoderModel.from_pretrained(str(tiny_flux_dir / "text_encoder_2"))
    _assert_same_tensors(t5, {k: v.numpy() for k, v in reference.state_dict().items()})
