"""FID / KID / PRC wrapper: agreement with torch-fidelity, input forms, caching, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch_fidelity

from flowdistill.data.digits import DigitsDataset, digits_tensors
from flowdistill.eval import fid as fidmod
from flowdistill.eval import image_io, inception
from flowdistill.eval.fid import compute_fid, digits_fid_floor, save_png_folder, to_uint8

KEYS = ("fid", "kid_mean", "kid_std", "precision", "recall")


@pytest.fixture(scope="module")
def real():
    """Two disjoint sets of 200 real train digits and 200 test digits (8×8, [-1, 1])."""
    x, _ = digits_tensors("train", 8)
    g = torch.Generator().manual_seed(1)
    p = torch.randperm(x.shape[0], generator=g)
    return x[p[:200]], x[p[200:400]], digits_tensors("test", 8)[0][:200]


def test_real_vs_real_small_and_noise_large(real):
    """Real-vs-real sits near the floor; uniform noise and blank images are far above it."""
    a, b, t = real
    rr = compute_fid(a, b, kid_subsets=20)
    rt = compute_fid(a, t, kid_subsets=20)
    noise = compute_fid(
        torch.rand(200, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1, b, kid_subsets=20
    )
    blank = compute_fid(
        torch.full((200, 1, 8, 8), -1.0) + 0.01 * torch.randn(200, 1, 8, 8), b, kid_subsets=20
    )
    assert rr["n"] == rr["n_ref"] == 200
    for r in (rr, rt):
        assert 0 <= r["fid"] < 3 and abs(r["kid_mean"]) < 0.05 and r["precision"] > 0.7 and r["recall"] > 0.7
    for bad in (noise, blank):
        assert bad["fid"] > 8 * max(rr["fid"], rt["fid"]) and bad["kid_mean"] > 0.2
        assert bad["recall"] < 0.2
    assert all(math.isfinite(rr[k]) for k in KEYS)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_agrees_with_calculate_metrics_on_folders(real, tmp_path):
    """On the same two PNG folders the wrapper matches torch_fidelity.calculate_metrics to 1e-4."""
    a, _, t = real
    da, dt = tmp_path / "gen", tmp_path / "ref"
    save_png_folder(a[:150], da)
    save_png_folder(t[:120], dt)
    ours = compute_fid(str(da), str(dt), seed=7, kid_subset_size=100)
    direct = torch_fidelity.calculate_metrics(
        input1=str(da),
        input2=str(dt),
        cuda=False,
        fid=True,
        kid=True,
        prc=True,
        feature_extractor="digits-classifier",
        kid_subset_size=100,
        rng_seed=7,
        cache=False,
        verbose=False,
    )
    assert ours["n"] == 150 and ours["n_ref"] == 120
    pairs = {
        "fid": torch_fidelity.KEY_METRIC_FID,
        "kid_mean": torch_fidelity.KEY_METRIC_KID_MEAN,
        "kid_std": torch_fidelity.KEY_METRIC_KID_STD,
        "precision": torch_fidelity.KEY_METRIC_PRECISION,
        "recall": torch_fidelity.KEY_METRIC_RECALL,
    }
    for ours_key, tf_key in pairs.items():
        assert abs(ours[ours_key] - direct[tf_key]) < 1e-4, ours_key
    # the tensors the folders were written from give the same numbers: [-1,1] -> uint8 happens once
    from_tensors = compute_fid(a[:150], t[:120], seed=7, kid_subset_size=100)
    for k in KEYS:
        assert from_tensors[k] == pytest.approx(ours[k], abs=1e-9)


def test_input_forms_agree(real):
    """Gray vs RGB-replicated, uint8 vs float, Dataset vs tensor and a sampler all give the same metrics.

    Exact equality holds by construction, not by luck. The one op whose rounding depends on how
    the images are batched is the feature network: its convolutions (oneDNN) and its 1024 → 64
    linear layer (MKL sgemm) pick kernel and K-blocking from the chunk's shape (and the CPU's ISA
    and thread count), so the same image in a chunk of 7 and in a chunk of 200 gets features a few
    float32 ulps apart (here: chunks of 1, 2 or 7 move features by up to 2.7e-7 of the largest and
    the FID by ~1e-7; on other CPUs the thresholds sit elsewhere, hence 1.79609487 vs 1.79609490
    on a fresh install when the sampler's batch_size=64 set the chunks). The statistics are not it:
    mean and covariance are taken once over the whole feature matrix (covariance in float64).
    compute_fid therefore runs the network in fixed chunks of ``feature_batch_size`` whatever the
    sampler's ``batch_size``, so the features are a function of the images alone, and a comparison
    of the same images under different ``batch_size`` is exact.
    """
    a, b, _ = real
    base = compute_fid(a, b, kid_subsets=10)
    # batch_size only batches sampler draws; with it feeding the network this differed at 1e-7
    assert compute_fid(a, b, batch_size=1, kid_subsets=10) == base
    assert compute_fid(a.expand(-1, 3, -1, -1), to_uint8(b), kid_subsets=10) == base
    ds = DigitsDataset("test", 8)
    assert compute_fid(a, ds, n_ref=100, kid_subsets=10) == compute_fid(
        a, digits_tensors("test", 8)[0][:100], kid_subsets=10
    )

    calls = []

    def sampler(n, generator):
        """Noisy resamples of ``a``, recording the batch sizes it was asked for."""
        calls.append(n)
        idx = torch.randint(0, a.shape[0], (n,), generator=generator)
        return a[idx] + 0.02 * torch.randn(n, 1, 8, 8, generator=generator)

    s1 = compute_fid(sampler, b, n=150, batch_size=64, seed=3, kid_subsets=10)
    s2 = compute_fid(sampler, b, n=150, batch_size=64, seed=3, kid_subsets=10)
    assert calls == [64, 64, 22] * 2 and s1 == s2 and s1["n"] == 150
    drawn = image_io.sample_images(sampler, 150, batch_size=64, seed=3)
    assert compute_fid(drawn, b, seed=3, kid_subsets=10) == s1  # seed also draws the KID subsets


def test_reference_cache(real, tmp_path, monkeypatch):
    """With cache_dir the reference features are stored as safetensors and reused (not recomputed)."""
    a, b, _ = real
    first = compute_fid(a, b, kid_subsets=10, cache_dir=tmp_path)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1 and "digits-classifier" in files[0].name
    counted = []
    real_extract = fidmod._extract
    monkeypatch.setattr(
        fidmod, "_extract", lambda *args, **kw: counted.append(1) or real_extract(*args, **kw)
    )
    again = compute_fid(a, b, kid_subsets=10, cache_dir=tmp_path)
    assert again == first and len(counted) == 1  # only the samples went through the network
    named = compute_fid(a, b, kid_subsets=10, cache_dir=tmp_path, reference_name="digits train/b")
    assert named == first and (tmp_path / files[0].name).exists()
    assert len(list(tmp_path.glob("digits_train_b-*.safetensors"))) == 1
    compute_fid(a, b[:150], kid_subsets=10, cache_dir=tmp_path)  # another reference, another fingerprint
    assert len(list(tmp_path.glob("*.safetensors"))) == 3


def test_digits_floor_small_n():
    """The floor reports both real-vs-real comparisons at the stated n, near zero."""
    r = digits_fid_floor(n=120, seed=0, kid_subsets=20)
    assert r["n"] == 120 and r["size"] == 8
    for key in ("train_half", "train_vs_test"):
        assert r[key]["n"] == r[key]["n_ref"] == 120 and 0 <= r[key]["fid"] < 6
    with pytest.raises(ValueError, match="digits floor n"):
        digits_fid_floor(n=400)


def test_bad_inputs_raise_one_line_value_errors(real, tmp_path):
    """Wrong shapes, scales, empty/missing folders and weights, and KID subset size give clear errors."""
    a, b, _ = real
    cases = [
        (lambda: compute_fid(a[:, 0], b), "shape"),
        (lambda: compute_fid(a.expand(-1, 2, -1, -1), b), "shape"),
        (lambda: compute_fid((a + 1) * 127.5, b), "wrong scale"),
        (lambda: compute_fid(a * float("nan"), b), "NaN"),
        (lambda: compute_fid(a.long(), b), "dtype"),
        (lambda: compute_fid(str(tmp_path / "missing"), b), "does not exist"),
        (lambda: compute_fid(str(tmp_path), b), "contains no"),
        (lambda: compute_fid(a, b, digits_weights=tmp_path / "w.safetensors"), "not found"),
        (
            lambda: compute_fid(a, b, feature_extractor="inception", inception_weights=tmp_path / "i.pth"),
            "not found",
        ),
        (lambda: compute_fid(a[:50], b, kid_subset_size=100), "kid_subset_size"),
        (lambda: compute_fid(a[:3], b), "more than"),
        (lambda: compute_fid(lambda n, g: a[:n], b), "needs n"),
        (lambda: compute_fid(lambda n, g: a[:3], b, n=10), "sampler"),
        (lambda: compute_fid(a, lambda n, g: b[:n]), "reference must be real images"),
        (lambda: compute_fid(a, b, n=500), "fewer than n=500"),
        (lambda: compute_fid(a, b, feature_extractor="vgg"), "feature_extractor"),
    ]
    if not torch.cuda.is_available():
        cases.append((lambda: compute_fid(a, b, cuda=True), "CUDA"))
    for fn, match in cases:
        with pytest.raises(ValueError, match=match) as info:
            fn()
        assert "\n" not in str(info.value)


def _random_inception_state():
    """A randomly initialised inception-v3-compat state dict (no download)."""
    from unittest import mock

    from torch_fidelity import feature_extractor_inceptionv3 as m

    with (
        mock.patch.object(m, "load_state_dict_from_url", lambda *a, **k: {}),
        mock.patch.object(m.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None),
    ):
        fe = m.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    return {k: v.contiguous() for k, v in fe.state_dict().items()}


def test_inception_offline_local_weights(real, tmp_path, monkeypatch):
    """The inception path runs from a local safetensors or weights_only torch file, never downloading."""
    from safetensors.torch import save_file

    # smallest valid input: fast on CPU
    monkeypatch.setattr(inception.SafeInceptionV3, "INPUT_IMAGE_SIZE", 75)

    state = _random_inception_state()
    st_path, pt_path = tmp_path / "incep.safetensors", tmp_path / "incep.pth"
    save_file(state, str(st_path))
    torch.save(state, pt_path)
    loaded = inception.load_weights_file(pt_path)
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    a, b, _ = real
    r = compute_fid(a[:5], b[:5], feature_extractor="inception", inception_weights=st_path)
    assert r["n"] == 5 and all(math.isfinite(r[k]) for k in KEYS)
    fe = fidmod.create_feature_extractor(  # the .pth route, loaded with weights_only=True
        inception.INCEPTION_EXTRACTOR_NAME,
        ["2048"],
        cuda=False,
        verbose=False,
        feature_extractor_weights_path=pt_path,
    )
    assert torch.equal(fe.state_dict()["fc.weight"], state["fc.weight"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(real):
    """On a GPU the metrics match the CPU run."""
    a, b, _ = real
    cpu, gpu = compute_fid(a, b), compute_fid(a, b, cuda=True)
    for k in KEYS:
        assert gpu[k] == pytest.approx(cpu[k], abs=1e-3)
