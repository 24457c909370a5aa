"""The tokenizer latent cache (flowdistill.data.latent_cache): encode → store → load equals a direct
encode, a crashed write resumes to the same bytes, two processes write disjoint shards whose union
is the one-process cache, and the ``tokenizer_latents`` dataset trains and evaluates through the registry."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import flowdistill.data.tensor_cache as tensor_store
from flowdistill.data.latent_cache import (
    LatentCache,
    encode_batch,
    encode_dataset,
    measure_factors,
    normalise,
)
from flowdistill.data.registry import (
    build_dataset,
    decoding_for,
    feature_extractor_of,
    reference_images,
    sample_shape_of,
)
from flowdistill.errors import ConfigError
from flowdistill.models.latent_codec import load_tokenizer
from tests.helpers import REPO, free_port
from tests.latent_stub import save_stub

N = 150  # rows encoded in these tests (3 shards of 64 with a short last one)


def digits_spec(conditional: bool = True) -> SimpleNamespace:
    """The digits train split at 32x32 (the RecTok problem)."""
    return SimpleNamespace(name="digits", image_size=32, conditional=conditional, root="", params={})


class Head:
    """The first ``N`` items of a source (a small dataset to encode fast)."""

    def __new__(cls, source, n: int = N):
        from flowdistill.data.sources import TensorSource

        idx = torch.arange(n)
        got = source.get_many(idx)
        return TensorSource(got["x"], got.get("cond"), conditional="cond" in got, num_classes=10)


def encode(tmp: Path, name: str, tok_dir: Path, **kw) -> Path:
    """Encode the first ``N`` digits through the tokenizer at ``tok_dir`` into ``tmp/name``."""
    spec = kw.pop("spec", digits_spec())
    tok = load_tokenizer(tok_dir)
    return encode_dataset(tok, Head(build_dataset(spec, "train")), tmp / name, data=spec,
                          tokenizer_path=str(tok_dir), batch_size=16, shard_size=64, progress=False, **kw)


def shard_bytes(root: Path) -> dict[str, bytes]:
    """Every shard file and the manifest, by name."""
    return {p.name: p.read_bytes() for p in sorted(root.glob("shard-*.safetensors"))} | \
        {"manifest.json": (root / "manifest.json").read_bytes()}


def test_store_equals_direct_encode_and_decodes_back(tmp_path):
    tok_dir = save_stub(tmp_path / "tok", scaling_factor=1.5, shift_factor=0.1)
    root = encode(tmp_path, "cache", tok_dir)
    cache = LatentCache(root)
    got = cache.get_many(torch.arange(N))
    tok = load_tokenizer(tok_dir)
    src = Head(build_dataset(digits_spec(), "train"))
    x, y = src.get_many(torch.arange(N))["x"], src.get_many(torch.arange(N))["cond"]
    # in the cache's own batches of 16 the encoder computes the same floats: equal bit for bit
    direct = torch.cat([encode_batch(tok, x[a:a + 16]) for a in range(0, N, 16)])
    assert torch.equal(got["latents"], direct) and torch.equal(got["cond"], y)
    # the stored latents are the normalised posterior mean (z − shift)·scale
    with torch.no_grad():
        z = tok.encode(x).latent_dist.mode()
    assert torch.allclose(got["latents"], normalise(z, 1.5, 0.1), atol=1e-5)  # batch-size rounding only
    assert cache.latent_shape == (4, 8, 8) and cache.factors == (1.5, 0.1)

    # the registered dataset: shape from the manifest, labels kept, pixel reference and decoder
    spec = SimpleNamespace(name="tokenizer_latents", root=str(root), conditional=True, image_size=32,
                           params={})
    assert sample_shape_of(spec) == (4, 8, 8)
    batch = build_dataset(spec).get_many(torch.tensor([3, 0, 149]))
    assert torch.equal(batch["x"], got["latents"][[3, 0, 149]]) and torch.equal(batch["cond"], y[[3, 0, 149]])
    assert feature_extractor_of(spec) == "digits"
    ref = reference_images(spec, 40)
    assert ref.reference.shape == (40, 1, 32, 32) and ref.name == "digits-test-32"
    from flowdistill.eval.image_eval import sample_decoder

    decode = sample_decoder(spec)
    with torch.no_grad():
        want = tok.decode(z).sample
    assert torch.allclose(decode(got["latents"]), want, atol=1e-5)  # denormalise inverts normalise
    assert decoding_for(SimpleNamespace(name="digits")) is None  # pixel datasets are not decoded


def test_measured_factors_give_unit_variance_latents(tmp_path):
    """A tokenizer without latent statistics (factors 1, 0) is normalised by measured ones."""
    tok_dir = save_stub(tmp_path / "tok", scaling_factor=1.0, shift_factor=0.0)
    src = Head(build_dataset(digits_spec(), "train"))
    factors = measure_factors(load_tokenizer(tok_dir), src, n=N)
    root = encode(tmp_path, "cache", tok_dir, factors=factors)
    z = LatentCache(root).get_many(torch.arange(N))["latents"]
    assert LatentCache(root).factors == factors
    # over the rows they were measured on: mean 0 and std 1 up to float32 summation error
    assert abs(float(z.mean())) < 1e-5 and abs(float(z.std()) - 1.0) < 1e-5


def test_resume_after_crash_is_identical(tmp_path, monkeypatch):
    tok_dir = save_stub(tmp_path / "tok")
    full = encode(tmp_path, "full", tok_dir, mode="sample", seed=3)
    real, calls = tensor_store.write_shard, {"n": 0}

    def crash_on_third(*a, **k):
        """``write_shard`` killed before the third shard lands."""
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    monkeypatch.setattr(tensor_store, "write_shard", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        encode(tmp_path, "crashed", tok_dir, mode="sample", seed=3)
    monkeypatch.setattr(tensor_store, "write_shard", real)
    with pytest.raises(ConfigError, match="data.root=.*incomplete"):
        build_dataset(SimpleNamespace(name="tokenizer_latents", root=str(tmp_path / "crashed"),
                                      conditional=False))
    encode(tmp_path, "crashed", tok_dir, mode="sample", seed=3, resume=True)
    assert shard_bytes(tmp_path / "crashed") == shard_bytes(full)
    # a resume with another tokenizer (other weights) is refused, naming the header key
    other = save_stub(tmp_path / "tok2", seed=1)
    with pytest.raises(tensor_store.TensorCacheError, match="another 'tokenizer_sha256'"):
        encode(tmp_path, "crashed", other, mode="sample", seed=3, resume=True)


def test_two_ranks_write_disjoint_shards_whose_union_is_one_process(tmp_path, monkeypatch):
    tok_dir = save_stub(tmp_path / "tok")
    one = encode(tmp_path, "one", tok_dir, mode="sample", seed=5)
    written: dict[int, list[int]] = {0: [], 1: []}
    real = tensor_store.write_shard
    for rank in (0, 1):  # rank 0 first (it creates the store), as the module docstring allows
        monkeypatch.setattr(tensor_store, "write_shard",
                            lambda root, k, *a, _r=rank: written[_r].append(k) or real(root, k, *a))
        encode(tmp_path, "two", tok_dir, mode="sample", seed=5, rank=rank, world=2, resume=rank == 1)
    assert written == {0: [0, 2], 1: [1]}
    assert shard_bytes(tmp_path / "two") == shard_bytes(one)


def test_errors_are_one_line_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="data.name=tokenizer_latents needs data.root"):
        sample_shape_of(SimpleNamespace(name="tokenizer_latents", root="", conditional=False))
    with pytest.raises(ConfigError, match="data.root=.*holds no cache"):
        sample_shape_of(SimpleNamespace(name="tokenizer_latents", root=str(tmp_path), conditional=False))
    tok_dir = save_stub(tmp_path / "tok")
    root = encode(tmp_path, "uncond", tok_dir, spec=digits_spec(conditional=False))
    with pytest.raises(ConfigError, match="data.conditional=true but the latent cache .* holds no labels"):
        build_dataset(SimpleNamespace(name="tokenizer_latents", root=str(root), conditional=True))
    with pytest.raises(ConfigError, match="encode mode must be one of mean, sample"):
        encode(tmp_path, "bad", tok_dir, mode="median")


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(tmp_path):
    """Two gloo processes under torchrun write shards 0, 2 and 1 of the same cache as one process."""
    tok_dir = save_stub(tmp_path / "tok")
    one = encode(tmp_path, "one", tok_dir, mode="sample", seed=5)
    code = ("import torch.distributed as dist; from pathlib import Path; dist.init_process_group('gloo');"
            "from tests.test_latent_cache import encode;"
            f"encode(Path({str(tmp_path)!r}), 'two', Path({str(tok_dir)!r}), mode='sample', seed=5,"
            "rank=dist.get_rank(), world=dist.get_world_size()); dist.destroy_process_group()")
    script = tmp_path / "worker.py"
    script.write_text(code)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                    "--master_port", str(free_port()), str(script)], check=True, env=env, cwd=REPO,
                   timeout=300)
    assert shard_bytes(tmp_path / "two") == shard_bytes(one)
