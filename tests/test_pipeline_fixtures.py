"""The tiny offline pipelines of :mod:`tests.pipeline_fixtures` load back with ``from_pretrained``
(no hub) and render an image through their own ``__call__``; saving is deterministic."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline

from tests.pipeline_fixtures import (  # noqa: F401  (session fixtures used by name)
    IMAGE_SIZE,
    build_sd3_pipeline,
    flux_pipeline_dir,
    sd3_pipeline_dir,
    tiny_clip_tokenizer,
    tiny_t5_tokenizer,
    unet_pipeline_dir,
)


@pytest.mark.parametrize("fixture, cls", [("sd3_pipeline_dir", StableDiffusion3Pipeline),
                                          ("flux_pipeline_dir", FluxPipeline),
                                          ("unet_pipeline_dir", StableDiffusionPipeline)])
def test_tiny_pipeline_loads_offline_and_renders(request, fixture, cls):
    path = request.getfixturevalue(fixture)
    pipe = cls.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == cls.__name__ and pipe.tokenizer is not None and pipe.vae is not None
    out = pipe(["a photo of a cat", "a red car"], num_inference_steps=2, height=IMAGE_SIZE, width=IMAGE_SIZE,
               output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert torch.isfinite(out).all() and 0 <= out.min() and out.max() <= 1
    assert (out[0] - out[1]).abs().max() > 1e-4  # the prompt changes the image


def test_tiny_tokenizers_know_the_words():
    clip, t5 = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    ids = clip("a photo of a cat").input_ids
    assert ids[0] == clip.bos_token_id and ids[-1] == clip.eos_token_id and len(ids) == 7  # a piece a word
    assert clip.model_max_length == 77
    ids = t5("a photo of a cat").input_ids
    assert ids[-1] == t5.eos_token_id == 1 and len(ids) == 6 and t5.pad_token_id == 0
    assert t5.unk_token_id not in t5("zebra 42").input_ids  # unknown words fall back to characters


def test_tiny_pipeline_is_deterministic():
    a, b = build_sd3_pipeline(), build_sd3_pipeline()
    for name in ("transformer", "text_encoder", "text_encoder_3", "vae"):
        for (k, v), w in zip(getattr(a, name).state_dict().items(), getattr(b, name).state_dict().values(),
                             strict=True):
            assert torch.equal(v, w), (name, k)
