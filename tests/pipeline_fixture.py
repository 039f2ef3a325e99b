"""A tiny random FLUX pipeline directory written by diffusers' own save_pretrained.

Shared by the pipeline parity tests and the training-program tests. Building it
needs torch + diffusers + transformers (the test extra).
"""

from __future__ import annotations

from pathlib import Path

from prefgrpo_jax.toyworld.tokenizers import save_clip_tokenizer, save_t5_tokenizer

CLIP_VOCAB = 1000
T5_VOCAB = 600
T5_DIM = 32
CLIP_DIM = 32
# 32x32 images -> VAE factor 2 -> 16x16 latents -> 8x8 = 64 packed tokens.
IMAGE_SIZE = 32


def save_tiny_flux_pipeline(root: str | Path, seed: int = 0) -> Path:
    """Writes a complete diffusers-format FLUX directory with random weights."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    root = Path(root)
    tok_dir, tok2_dir = root / "_tok", root / "_tok2"
    save_clip_tokenizer(tok_dir, vocab_size=CLIP_VOCAB)
    save_t5_tokenizer(tok2_dir, vocab_size=T5_VOCAB)
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), use_fast=False)
    tokenizer_2 = AutoTokenizer.from_pretrained(str(tok2_dir))

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=2,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=T5_DIM,
        pooled_projection_dim=CLIP_DIM, guidance_embeds=True, axes_dims_rope=(4, 6, 6),
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32), layers_per_block=1, latent_channels=16, norm_num_groups=8,
        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=CLIP_VOCAB, hidden_size=CLIP_DIM, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
        bos_token_id=CLIP_VOCAB - 2, eos_token_id=CLIP_VOCAB - 1, pad_token_id=CLIP_VOCAB - 1,
    ))
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=T5_VOCAB, d_model=T5_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu", dropout_rate=0.0,
    ))
    # Zero-initialised layers (adaLN outputs, norms) would hide mapping bugs.
    with torch.no_grad():
        for module in (transformer, vae, text_encoder, text_encoder_2):
            for name, p in module.named_parameters():
                if "norm" in name or "adaLN" in name or name.endswith(".linear.weight"):
                    p.add_(0.1 * torch.randn_like(p))
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
    )
    pipe.save_pretrained(str(root / "flux"))
    return root / "flux"


def save_tiny_clip(root: str | Path, seed: int = 0, image_size: int = IMAGE_SIZE) -> Path:
    """A transformers CLIPModel directory (weights + tokenizer) for the CLIP reward."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    root = Path(root)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(
        text_config=dict(
            vocab_size=CLIP_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=77, bos_token_id=CLIP_VOCAB - 2,
            eos_token_id=CLIP_VOCAB - 1, pad_token_id=CLIP_VOCAB - 1,
        ),
        vision_config=dict(
            image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=64,
            num_hidden_layers=1, num_attention_heads=2,
        ),
        projection_dim=16,
    ))
    model.save_pretrained(str(root))
    save_clip_tokenizer(root, vocab_size=CLIP_VOCAB)
    return root
