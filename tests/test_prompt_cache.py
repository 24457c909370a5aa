"""Prompt-embedding and latent caches on the tiny offline pipelines: the cached tensors are the
pipeline's own ``encode_prompt`` / VAE output exactly; shards, manifest, resume after a crash and
a two-process split give byte-identical caches; bad inputs fail with one-line errors."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

import flowdistill.data.tensor_cache as tensor_store  # the generic store writes the shards
from flowdistill.data.couplings import write_shard
from flowdistill.errors import ConfigError
from flowdistill.integrations.diffusers.embedding_store import EmbeddingCacheError
from flowdistill.integrations.diffusers.latent_cache import (
    LatentStore,
    decode_latents,
    encode_image_folder,
    load_image,
)
from flowdistill.integrations.diffusers.prompt_cache import (
    PromptEmbeddingStore,
    add_embed_parser,
    cmd_embed,
    encode_prompts,
    read_prompts,
)
from tests.pipeline_fixtures import (  # noqa: F401  (session fixtures used by name)
    flux_pipeline_dir,
    sd3_pipeline_dir,
    unet_pipeline_dir,
)

PROMPTS = ["a photo of a cat", "a red car", "blue sky", "the dog on a tree", "house", "a car in the sky",
           "cat"]
PIPELINES = ["sd3_pipeline_dir", "flux_pipeline_dir", "unet_pipeline_dir"]


def load(request, fixture: str):
    """The tiny pipeline of ``fixture`` loaded back from disk."""
    pipe = DiffusionPipeline.from_pretrained(request.getfixturevalue(fixture))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def pipeline_encode(pipe, prompts: list[str]) -> dict[str, torch.Tensor]:
    """The pipeline's own ``encode_prompt``, called as its ``__call__`` does (no guidance)."""
    name = type(pipe).__name__
    if name == "StableDiffusion3Pipeline":
        pe, _, pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, do_classifier_free_guidance=False)
        return {"prompt_embeds": pe, "pooled_prompt_embeds": pooled}
    if name == "FluxPipeline":
        pe, pooled, _ = pipe.encode_prompt(prompts, prompts)
        return {"prompt_embeds": pe, "pooled_prompt_embeds": pooled}
    return {"prompt_embeds": pipe.encode_prompt(prompts, "cpu", 1, False)[0]}


def cache_bytes(root: Path) -> dict[str, bytes]:
    """Every file of a cache (the lock file aside), name → bytes."""
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.name != "manifest.lock"}


@pytest.mark.parametrize("fixture", PIPELINES)
def test_cached_embeddings_are_the_pipelines_own(request, tmp_path, fixture):
    pipe = load(request, fixture)
    root = encode_prompts(pipe, PROMPTS, tmp_path / "cache", batch_size=2, shard_size=3, resolution=32,
                          progress=False)
    store = PromptEmbeddingStore(root)
    assert len(store) == 7 and store.prompts == PROMPTS and store.manifest["complete"]
    assert sorted(p.name for p in root.glob("shard-*")) == [f"shard-00000{k}.safetensors" for k in range(3)]
    assert store.latent_shape == (4, 16, 16)  # 4 latent channels (Flux: 16 packed / 4) at 32 px, VAE factor 2
    # the pipeline's encode_prompt on the cache's batches (2 rows at a time inside shards of 3)
    chunks = [pipeline_encode(pipe, PROMPTS[a:b]) for a, b in [(0, 2), (2, 3), (3, 5), (5, 6), (6, 7)]]
    ref = {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}
    whole = pipeline_encode(pipe, PROMPTS)
    assert set(store.fields) == set(ref)
    idx = torch.tensor([6, 0, 3, 3, 5])  # across shards, repeated, out of order
    got = store.get_many(idx)
    for k, v in ref.items():
        assert torch.equal(got[k], v[idx]), k  # exact: the same call on the same batch
        # one batch of 7: the same up to float32 rounding (padding="max_length": no cross-talk)
        torch.testing.assert_close(got[k], whole[k][idx], atol=1e-5, rtol=1e-5)
        assert store.manifest["fields"][k]["shape"] == list(v.shape[1:])
    neg = store.negative()
    empty = pipeline_encode(pipe, [""])
    assert set(neg) == set(empty) and all(torch.equal(neg[k], empty[k]) for k in neg)
    if type(pipe).__name__ == "StableDiffusion3Pipeline":  # = the negative the pipeline's CFG uses
        with torch.no_grad():  # (grad mode picks other attention kernels: last-bit differences)
            _, npe, _, npool = pipe.encode_prompt(PROMPTS[:1], None, None, do_classifier_free_guidance=True,
                                                  negative_prompt="")
        assert torch.equal(neg["prompt_embeds"], npe) and torch.equal(neg["pooled_prompt_embeds"], npool)
    assert torch.equal(store[4]["prompt_embeds"], ref["prompt_embeds"][4])


def test_manifest_records_settings_and_shards(request, tmp_path):
    pipe = load(request, "sd3_pipeline_dir")
    root = encode_prompts(pipe, PROMPTS, tmp_path / "c", batch_size=4, shard_size=5, negative_prompt="blurry",
                          max_sequence_length=8, resolution=32, progress=False)
    man = json.loads((root / "manifest.json").read_text())
    assert man["pipeline_class"] == "StableDiffusion3Pipeline" and man["negative_prompt"] == "blurry"
    assert man["n_items"] == 7 and [s["count"] for s in man["shards"]] == [5, 2]
    assert man["fields"] == {"pooled_prompt_embeds": {"shape": [64], "dtype": "float32"},
                             "prompt_embeds": {"shape": [77 + 8, 32], "dtype": "float32"}}
    lines = (root / "prompts.jsonl").read_text().splitlines()
    assert [json.loads(line)["prompt"] for line in lines] == PROMPTS
    neg = PromptEmbeddingStore(root).negative()
    assert torch.equal(neg["prompt_embeds"], pipeline_encode_len(pipe, ["blurry"], 8))
    # a shard whose bytes changed is refused when read, naming the file
    shard = root / "shard-000001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(EmbeddingCacheError, match="shard-000001.safetensors.*checksum"):
        PromptEmbeddingStore(root).get_many(torch.tensor([6]))
    assert PromptEmbeddingStore(root).get_many(torch.tensor([0]))["prompt_embeds"].shape == (1, 85, 32)
    # a shard listed with its checksum but holding another dtype than the header's fields
    rec = write_shard(root, 0, {"prompt_embeds": torch.zeros(5, 85, 32, dtype=torch.bfloat16),
                                "pooled_prompt_embeds": torch.zeros(5, 64)}, {})
    man["shards"][0] = rec
    (root / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(EmbeddingCacheError, match=r"'prompt_embeds' missing or not float32 \[5, 85, 32\]"):
        PromptEmbeddingStore(root).get_many(torch.tensor([0]))


@torch.no_grad()
def pipeline_encode_len(pipe, prompts, length):
    """SD3 ``prompt_embeds`` with ``length`` T5 tokens."""
    return pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False,
                              max_sequence_length=length)[0]


def test_resume_after_crash_equals_uninterrupted(request, tmp_path, monkeypatch):
    pipe = load(request, "flux_pipeline_dir")
    kw = dict(batch_size=2, shard_size=2, resolution=32, max_sequence_length=8, progress=False)
    full = encode_prompts(pipe, PROMPTS, tmp_path / "full", **kw)

    calls = {"n": 0}
    real = tensor_store.write_shard

    def crash_on_third(*a, **k):
        """``write_shard`` killed before the third shard lands."""
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    monkeypatch.setattr(tensor_store, "write_shard", crash_on_third)
    root = tmp_path / "crashed"
    with pytest.raises(KeyboardInterrupt):
        encode_prompts(pipe, PROMPTS, root, **kw)
    monkeypatch.setattr(tensor_store, "write_shard", real)
    man = json.loads((root / "manifest.json").read_text())
    assert [s["index"] for s in man["shards"]] == [0, 1] and not man["complete"]
    with pytest.raises(EmbeddingCacheError, match="incomplete.*--resume"):
        PromptEmbeddingStore(root)
    # what a kill mid-write leaves: a half-written temporary, and an unlisted garbage shard
    (root / ".shard-000002.safetensors.tmp-4242").write_bytes(b"half")
    (root / "shard-000002.safetensors").write_bytes(b"garbage")
    with pytest.raises(EmbeddingCacheError, match="already holds a cache; pass --resume"):
        encode_prompts(pipe, PROMPTS, root, **kw)
    encode_prompts(pipe, PROMPTS, root, resume=True, **kw)
    assert cache_bytes(root) == cache_bytes(full)
    # resuming a complete cache changes nothing; another prompt list is refused by its sha256
    encode_prompts(pipe, PROMPTS, root, resume=True, **kw)
    assert cache_bytes(root) == cache_bytes(full)
    with pytest.raises(EmbeddingCacheError, match="another 'items_sha256'"):
        encode_prompts(pipe, PROMPTS[:-1] + ["a dog"], root, resume=True, **kw)
    with pytest.raises(EmbeddingCacheError, match="another 'batch_size'"):
        encode_prompts(pipe, PROMPTS, root, resume=True, **{**kw, "batch_size": 1})
    with pytest.raises(EmbeddingCacheError, match="holds no cache to resume"):
        encode_prompts(pipe, PROMPTS, tmp_path / "none", resume=True, **kw)


def test_two_process_split_equals_one_process(request, tmp_path):
    pipe = load(request, "unet_pipeline_dir")
    kw = dict(batch_size=2, shard_size=2, progress=False)
    one = encode_prompts(pipe, PROMPTS, tmp_path / "one", **kw)
    root = tmp_path / "two"
    with pytest.raises(EmbeddingCacheError, match="rank 1: .* no cache yet"):
        encode_prompts(pipe, PROMPTS, root, rank=1, world=2, **kw)
    encode_prompts(pipe, PROMPTS, root, rank=0, world=2, **kw)
    man = json.loads((root / "manifest.json").read_text())
    assert [s["index"] for s in man["shards"]] == [0, 2] and not man["complete"]  # rank 0: shards 0, 2
    encode_prompts(pipe, PROMPTS, root, rank=1, world=2, **kw)
    assert json.loads((root / "manifest.json").read_text())["complete"]
    assert cache_bytes(root) == cache_bytes(one)


def test_read_prompts_formats_and_errors(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n")
    assert read_prompts(tmp_path / "p.txt") == ["a cat", "a dog"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a cat", "id": 1}\n\n{"prompt": "a, \\"dog\\""}\n')
    assert read_prompts(tmp_path / "p.jsonl") == ["a cat", 'a, "dog"']
    (tmp_path / "p.csv").write_text('id,prompt\n1,a cat\n2,"a, dog"\n')
    assert read_prompts(tmp_path / "p.csv") == ["a cat", "a, dog"]
    (tmp_path / "e.txt").write_text("\n \n")
    (tmp_path / "bad.csv").write_text("id,text\n1,a cat\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "a cat"}\n')
    (tmp_path / "p.yaml").write_text("- a cat\n")
    cases = [("e.txt", "holds no prompts"), ("bad.csv", "no 'prompt' column \\(columns: id, text\\)"),
             ("bad.jsonl", "line 1 has no string 'prompt' field"), ("p.yaml", "must be .txt"),
             ("missing.txt", "no file")]
    for name, msg in cases:
        with pytest.raises(ConfigError, match=msg):
            read_prompts(tmp_path / name)


def write_image_folder(folder: Path, n: int = 3) -> list[str]:
    """``n`` smooth random RGB images 40×32 (not square: the loader crops) with captions."""
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    captions = []
    for i in range(n):
        base = rng.uniform(0, 255, size=(4, 5, 3))
        arr = np.kron(base, np.ones((8, 8, 1))).astype(np.uint8)  # 32 high, 40 wide
        Image.fromarray(arr).save(folder / f"img{i}.png")
        captions.append(f"a photo of a {['cat', 'dog', 'car'][i % 3]}")
        (folder / f"img{i}.txt").write_text(captions[-1] + "\n")
    return captions


@pytest.mark.parametrize("fixture", ["sd3_pipeline_dir", "flux_pipeline_dir"])
def test_latent_cache_round_trip(request, tmp_path, fixture):
    pipe = load(request, fixture)
    captions = write_image_folder(tmp_path / "imgs")
    root = encode_image_folder(pipe, tmp_path / "imgs", tmp_path / "lat", resolution=32, batch_size=2,
                               shard_size=2, max_sequence_length=8, progress=False)
    store = LatentStore(root)
    assert len(store) == 3 and store.prompts == captions
    assert store.images == ["img0.png", "img1.png", "img2.png"]
    assert store.latent_shape == (4, 16, 16)  # Flux too: unpacked [C, h, w]
    got = store.get_many(torch.arange(3))
    images = torch.stack([load_image(tmp_path / "imgs" / f"img{i}.png", 32) for i in range(3)])
    assert images.shape == (3, 3, 32, 32) and images.min() >= -1 and images.max() <= 1
    vae = pipe.vae
    with torch.no_grad():
        fresh = vae.encode(images).latent_dist.mean
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor or 0.0
    assert shift != 0  # both pipelines shift: the test sees the shift applied
    # batch 2 vs batch 3 through the convolutions: float32 rounding only
    torch.testing.assert_close(got["latents"], (fresh - shift) * scale, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        ref_img = vae.decode(fresh).sample
    torch.testing.assert_close(decode_latents(pipe, got["latents"]), ref_img, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        text = pipeline_encode_len(pipe, captions, 8) if fixture.startswith("sd3") else \
            pipe.encode_prompt(captions, None, max_sequence_length=8)[0]
    # the captions' embeddings (cache batches of 2 vs one batch of 3: float32 rounding only)
    torch.testing.assert_close(got["prompt_embeds"], text, atol=1e-5, rtol=1e-5)
    assert set(got) == {"latents", "prompt_embeds", "pooled_prompt_embeds"}


def test_latent_cache_errors(request, tmp_path):
    pipe = load(request, "unet_pipeline_dir")
    with pytest.raises(ConfigError, match="no folder"):
        encode_image_folder(pipe, tmp_path / "nope", tmp_path / "lat", resolution=32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no images"):
        encode_image_folder(pipe, tmp_path / "empty", tmp_path / "lat", resolution=32)
    write_image_folder(tmp_path / "imgs")
    (tmp_path / "imgs" / "img1.txt").unlink()
    with pytest.raises(ConfigError, match="img1.png has no caption file img1.txt"):
        encode_image_folder(pipe, tmp_path / "imgs", tmp_path / "lat", resolution=32)
    (tmp_path / "imgs" / "img1.txt").write_text("a cat")
    with pytest.raises(ConfigError, match="resolution 33 must be a multiple of 2"):
        encode_image_folder(pipe, tmp_path / "imgs", tmp_path / "lat", resolution=33)
    root = encode_image_folder(pipe, tmp_path / "imgs", tmp_path / "lat", resolution=32, progress=False)
    (tmp_path / "imgs" / "img1.txt").write_text("a dog")  # a changed folder is refused on resume
    with pytest.raises(EmbeddingCacheError, match="another 'items_sha256'"):
        encode_image_folder(pipe, tmp_path / "imgs", root, resolution=32, resume=True, progress=False)
    with pytest.raises(EmbeddingCacheError, match="format 'flowdistill-latents/1'"):
        PromptEmbeddingStore(root)


def test_unsupported_pipeline_is_named():
    from diffusers import DDPMPipeline

    with pytest.raises(ConfigError, match="DDPMPipeline is not supported; supported: StableDiff"):
        encode_prompts(DDPMPipeline(unet=None, scheduler=None), ["a cat"], "unused")


def embed_args(*argv: str) -> argparse.Namespace:
    """``flowdistill embed ARGV`` parsed by a parser holding only the embed sub-command."""
    parser = argparse.ArgumentParser(prog="flowdistill")
    add_embed_parser(parser.add_subparsers(dest="command"), [])
    return parser.parse_args(["embed", *map(str, argv)])


def test_cmd_embed_prompts_and_images(request, tmp_path, capsys):
    path = request.getfixturevalue("sd3_pipeline_dir")
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS[:3]))
    root = cmd_embed(embed_args(path, tmp_path / "p.txt", "--out", tmp_path / "c", "--batch-size", "2",
                                "--max-sequence-length", "8", "--resolution", "32", "--device", "cpu"))
    assert f"{root}: 3 rows" in capsys.readouterr().out
    pipe = load(request, "sd3_pipeline_dir")
    direct = encode_prompts(pipe, PROMPTS[:3], tmp_path / "direct", batch_size=2, max_sequence_length=8,
                            resolution=32, progress=False)
    assert cache_bytes(root) == cache_bytes(direct)  # the CLI loads the pipeline without its transformer
    with pytest.raises(EmbeddingCacheError, match="pass --resume"):
        cmd_embed(embed_args(path, tmp_path / "p.txt", "--out", root, "--device", "cpu"))
    write_image_folder(tmp_path / "imgs")
    root = cmd_embed(embed_args(path, "--images", tmp_path / "imgs", "--out", tmp_path / "lat",
                                "--resolution", "32", "--max-sequence-length", "8", "--device", "cpu"))
    assert LatentStore(root).get_many(torch.tensor([2]))["latents"].shape == (1, 4, 16, 16)
    with pytest.raises(ConfigError, match="either PROMPTS .* or --images"):
        cmd_embed(embed_args(path, "--out", tmp_path / "x"))
    with pytest.raises(ConfigError, match="PIPELINE_DIR: no directory"):
        cmd_embed(embed_args(tmp_path / "nope", tmp_path / "p.txt", "--out", tmp_path / "y"))
    with pytest.raises(ConfigError, match="not a diffusers pipeline directory"):
        cmd_embed(embed_args(tmp_path, tmp_path / "p.txt", "--out", tmp_path / "y", "--device", "cpu"))


@pytest.mark.slow  # two torchrun workers start in ~30-80 s on a small shared CPU box
def test_torchrun_two_processes_equal_one(request, tmp_path):
    import os
    import subprocess
    import sys

    from tests.helpers import REPO, free_port

    path = request.getfixturevalue("sd3_pipeline_dir")
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS))
    args = [str(path), str(tmp_path / "p.txt"), "--batch-size", "2", "--shard-size", "2",
            "--max-sequence-length", "8", "--resolution", "32", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), "tests/embed_worker.py", *args, "--out", str(tmp_path / "two")]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("7 rows") == 1  # only rank 0 reports
    one = cmd_embed(embed_args(*args, "--out", tmp_path / "one"))
    assert cache_bytes(tmp_path / "two") == cache_bytes(one)
