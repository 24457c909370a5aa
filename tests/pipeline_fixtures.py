"""Tiny complete diffusers pipelines for offline tests: random weights, tokenizers written here.

Each ``make_*_pipeline(dir)`` builds a full pipeline from config (transformer or UNet, text
encoders, tokenizers, VAE, scheduler), calls ``save_pretrained(dir)`` and returns ``dir``;
``Pipeline.from_pretrained(dir)`` loads it back with no hub and no network, and renders a 32×32
image in well under a second on one CPU thread.

Tokenizers are built from a vocabulary written by the code (no sentencepiece, no downloads):

- CLIP: a byte-level BPE over the lowercase letters, digits and a few words (``CLIPTokenizer``
  from an in-memory ``vocab`` dict and ``merges`` list), ``model_max_length`` 77 as the real one;
- T5: a Unigram vocabulary of ``▁word`` pieces and single characters (``T5TokenizerFast``), with
  the ``<pad>`` / ``</s>`` / ``<unk>`` ids 0 / 1 / 2 as the real one.

Shapes follow what the pipelines' ``encode_prompt`` concatenates:

- SD3: two CLIP encoders of hidden size 16 (their penultimate hidden states concatenated → 32 and
  zero-padded to T5's d_model 32 = ``joint_attention_dim``; pooled 32 + 32 = 64 =
  ``pooled_projection_dim``), T5 d_model 32; latents 4×16×16 for a 32×32 image (VAE factor 2).
- Flux: CLIP hidden 32 (pooled = ``pooled_projection_dim`` 32), T5 d_model 32; latents 4×16×16
  packed 2×2 into 64 tokens of 16 channels (``in_channels`` 16).
- SD (UNet2DCondition): CLIP hidden 32 = ``cross_attention_dim``; DDIM scheduler; no safety checker.

Session-scoped pytest fixtures ``sd3_pipeline_dir``, ``flux_pipeline_dir`` and
``unet_pipeline_dir`` build each pipeline once per session; a test module uses them by importing
the fixture names (``from tests.pipeline_fixtures import sd3_pipeline_dir  # noqa: F401``), which
keeps diffusers and transformers out of test sessions that do not need them.
"""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

#: Words that tokenize to single pieces in both tiny tokenizers (anything else splits into characters).
WORDS = ("a", "photo", "of", "cat", "dog", "red", "blue", "car", "house", "tree", "on", "the", "in", "sky")
#: Image side the tiny pipelines render at (latent side 16 with the VAE's factor 2).
IMAGE_SIZE = 32
#: T5 sequence length the tests pass as ``max_sequence_length`` (the pipelines default to 256 / 512).
T5_LENGTH = 16


# -- tokenizers ----------------------------------------------------------------------------------
def tiny_clip_tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer on a tiny vocabulary: every letter and digit (word-final ``x</w>`` and
    inner ``x``), the words of :data:`WORDS` as merged pieces, ``<|startoftext|>`` /
    ``<|endoftext|>`` (also the pad token, as in SD's CLIP), ``model_max_length`` 77."""
    chars = string.ascii_lowercase + string.digits
    vocab: dict[str, int] = {}
    for tok in ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]:
        vocab.setdefault(tok, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in WORDS:  # left-to-right merges building each word: "p h", "ph o", ... , "phot o</w>"
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            rule = (pieces[0], pieces[1])
            if rule not in merges:
                merges.append(rule)
            vocab.setdefault(merged, len(vocab))
            pieces = [merged, *pieces[2:]]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def tiny_t5_tokenizer() -> T5TokenizerFast:
    """A T5 Unigram tokenizer on a tiny vocabulary: ``<pad>``, ``</s>``, ``<unk>`` (ids 0, 1, 2),
    ``▁word`` for each of :data:`WORDS`, then ``▁`` and single characters; no extra ids."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + w, -1.0) for w in WORDS]
    pieces += [("▁", -2.0)] + [(c, -3.0) for c in string.ascii_lowercase + string.digits]
    return T5TokenizerFast(vocab=pieces, extra_ids=0)


# -- text encoders -------------------------------------------------------------------------------
def _clip_config(hidden: int, projection: int, vocab_size: int) -> CLIPTextConfig:
    """A 2-layer CLIP text encoder (SD3 reads the penultimate hidden state, so at least 2)."""
    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                          projection_dim=projection, bos_token_id=0, eos_token_id=1, pad_token_id=1)


def tiny_t5_encoder(vocab_size: int, d_model: int = 32) -> T5EncoderModel:
    """A 1-layer T5 encoder with ``d_model`` channels."""
    cfg = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1,
                   num_heads=2, relative_attention_num_buckets=8, decoder_start_token_id=0,
                   pad_token_id=0, eos_token_id=1)
    return T5EncoderModel(cfg).eval()


def tiny_vae(latent_channels: int = 4, **factors: float) -> AutoencoderKL:
    """A 2-level VAE (spatial factor 2) with ``latent_channels`` channels and the given
    ``scaling_factor`` / ``shift_factor``."""
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                         down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, sample_size=IMAGE_SIZE,
                         **factors).eval()


# -- pipelines -----------------------------------------------------------------------------------
def _save(pipe, path: str | Path) -> Path:
    """``save_pretrained`` into ``path`` (created) and return it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(path)
    return path


def build_sd3_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """The tiny SD3 pipeline in memory (see the module docstring for the shapes); shift 3 as SD3."""
    torch.manual_seed(seed)
    clip_tok, t5_tok = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    transformer = SD3Transformer2DModel(sample_size=IMAGE_SIZE // 2, patch_size=1, in_channels=4,
                                        num_layers=1, attention_head_dim=8, num_attention_heads=4,
                                        caption_projection_dim=32, joint_attention_dim=32,
                                        pooled_projection_dim=64, out_channels=4, pos_embed_max_size=32)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(scaling_factor=1.5035, shift_factor=0.0609),
        text_encoder=CLIPTextModelWithProjection(_clip_config(16, 32, len(clip_tok))).eval(),
        tokenizer=clip_tok,
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(16, 32, len(clip_tok))).eval(),
        tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=tiny_t5_encoder(len(t5_tok)),
        tokenizer_3=t5_tok,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_flux_pipeline(seed: int = 0) -> FluxPipeline:
    """The tiny Flux pipeline in memory: guidance-distilled transformer (``guidance_embeds``), the
    dynamic-shift scheduler of FLUX.1-dev."""
    torch.manual_seed(seed)
    clip_tok, t5_tok = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2,
                                         joint_attention_dim=32, pooled_projection_dim=32,
                                         axes_dims_rope=[4, 4, 8], guidance_embeds=True)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    pipe = FluxPipeline(
        transformer=transformer.eval(),
        scheduler=scheduler,
        vae=tiny_vae(scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=CLIPTextModel(_clip_config(32, 32, len(clip_tok))).eval(),
        tokenizer=clip_tok,
        text_encoder_2=tiny_t5_encoder(len(t5_tok)),
        tokenizer_2=t5_tok,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_unet_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """The tiny Stable Diffusion (UNet2DCondition) pipeline in memory: ε-prediction, DDIM
    scheduler with SD's scaled-linear betas, no safety checker."""
    torch.manual_seed(seed)
    clip_tok = tiny_clip_tokenizer()
    unet = UNet2DConditionModel(sample_size=IMAGE_SIZE // 2, in_channels=4, out_channels=4,
                                block_out_channels=(8, 16), layers_per_block=1, cross_attention_dim=32,
                                norm_num_groups=4, attention_head_dim=4,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(
        unet=unet.eval(), scheduler=scheduler, vae=tiny_vae(scaling_factor=0.18215),
        text_encoder=CLIPTextModel(_clip_config(32, 32, len(clip_tok))).eval(), tokenizer=clip_tok,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_sd3_pipeline(path: str | Path, seed: int = 0) -> Path:
    """Save the tiny SD3 pipeline to ``path``; ``StableDiffusion3Pipeline.from_pretrained(path)``."""
    return _save(build_sd3_pipeline(seed), path)


def make_flux_pipeline(path: str | Path, seed: int = 0) -> Path:
    """Save the tiny Flux pipeline to ``path``; ``FluxPipeline.from_pretrained(path)``."""
    return _save(build_flux_pipeline(seed), path)


def make_unet_pipeline(path: str | Path, seed: int = 0) -> Path:
    """Save the tiny SD pipeline to ``path``; ``StableDiffusionPipeline.from_pretrained(path)``."""
    return _save(build_unet_pipeline(seed), path)


# -- session fixtures ----------------------------------------------------------------------------
@pytest.fixture(scope="session")
def sd3_pipeline_dir(tmp_path_factory) -> Path:
    """A saved tiny SD3 pipeline, built once per test session (treat it as read-only)."""
    return make_sd3_pipeline(tmp_path_factory.mktemp("pipelines") / "sd3")


@pytest.fixture(scope="session")
def flux_pipeline_dir(tmp_path_factory) -> Path:
    """A saved tiny Flux pipeline, built once per test session (treat it as read-only)."""
    return make_flux_pipeline(tmp_path_factory.mktemp("pipelines") / "flux")


@pytest.fixture(scope="session")
def unet_pipeline_dir(tmp_path_factory) -> Path:
    """A saved tiny Stable Diffusion (UNet) pipeline, built once per test session (read-only)."""
    return make_unet_pipeline(tmp_path_factory.mktemp("pipelines") / "unet")
