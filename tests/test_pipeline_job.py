"""The job chain on tiny offline diffusers pipelines (issue 15): a pipeline directory as teacher
(adapter and time shift from its classes and scheduler), prompt-cache batches, LoRA / two-time
students, the CLI run, its export (diffusers LoRA format), ``load_run`` and resume."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline

from flowdistill.api import load_run, train
from flowdistill.cli import main
from flowdistill.config import load_config
from flowdistill.core.rng import StepRNG
from flowdistill.core.timesteps import build_grid
from flowdistill.errors import ConfigError
from flowdistill.integrations.diffusers import DDPMUNetAdapter, FluxAdapter, SD3Adapter, calculate_shift
from flowdistill.integrations.diffusers.adapters import TextCFGField
from flowdistill.integrations.diffusers.pipeline_job import PipelineRun, build_pipeline_job
from flowdistill.integrations.diffusers.pipeline_teacher import load_pipeline_teacher
from flowdistill.integrations.diffusers.prompt_cache import encode_prompts
from tests.pipeline_fixtures import flux_pipeline_dir, sd3_pipeline_dir, unet_pipeline_dir  # noqa: F401

pytest.importorskip("peft")

PROMPTS = ["a photo of a cat", "a red car", "a blue house in the sky", "a dog on the tree"]
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "pipelines" / "freeflow_sd3.yaml"
PIPES = {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline, "unet": StableDiffusionPipeline}


def _cache(kind: str, pipe_dir: Path, root: Path) -> Path:
    pipe = PIPES[kind].from_pretrained(pipe_dir)
    return encode_prompts(pipe, PROMPTS, root, batch_size=2, progress=False)


@pytest.fixture(scope="module")
def caches(sd3_pipeline_dir, flux_pipeline_dir, unet_pipeline_dir, tmp_path_factory):  # noqa: F811
    """``{kind: (pipeline dir, prompt cache)}`` for the three tiny pipelines."""
    root = tmp_path_factory.mktemp("caches")
    dirs = {"sd3": sd3_pipeline_dir, "flux": flux_pipeline_dir, "unet": unet_pipeline_dir}
    return {k: (d, _cache(k, d, root / k)) for k, d in dirs.items()}


def _over(pipe: Path, cache: Path, out: Path, *extra: str) -> list[str]:
    """Overrides of a short CPU FreeFlow LoRA job on a tiny pipeline (float32, 32 px)."""
    return [f"out_dir={out}", f"teacher.diffusers={pipe}", "teacher.dtype=float32", f"data.root={cache}",
            "data.image_size=32",
            "model.params.rank=4", "model.params.gradient_checkpointing=false", "train.steps=3",
            "train.batch_size=2", "train.ckpt_every=0", "train.log_every=1", "train.trackers=none",
            "train.cpu=true", "train.lr=1e-3", "guidance.scale=2.0", *extra]


# -- config and teacher errors -------------------------------------------------------------------
@pytest.mark.parametrize("bad, key", [
    (["teacher.dtype=int8"], "teacher.dtype"),
    (["teacher.subfolder=vae"], "teacher.subfolder"),
    (["teacher.variant_x=1"], "teacher.variant_x"),
])
def test_teacher_spec_errors_name_the_key(bad, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(CONFIG, ["teacher.diffusers=/x", "data.root=/y", *bad])


@pytest.mark.parametrize("bad, key", [
    (["model.name=mlp"], "model.name"),
    (["model.params.foo=1"], "model.params.foo"),
    (["model.params.two_time=false"], "model.params.two_time"),
    (["data.name=checkerboard"], "data.name"),
    (["model.params.rank=0"], "model.params.rank"),
])
def test_job_errors_name_the_key(caches, tmp_path, bad, key):
    pipe, cache = caches["sd3"]
    cfg = load_config(CONFIG, _over(pipe, cache, tmp_path / "run", *bad))
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        train(cfg)
    assert not (tmp_path / "run").exists()  # nothing written


def test_missing_or_unsupported_pipeline(caches, tmp_path):
    pipe, cache = caches["sd3"]
    cfg = load_config(CONFIG, _over(tmp_path / "nowhere", cache, tmp_path / "run"))
    with pytest.raises(ConfigError, match=r"teacher\.diffusers=.*no such directory"):
        train(cfg)
    other = tmp_path / "dit"
    other.mkdir()
    index = json.loads((pipe / "model_index.json").read_text())
    index["transformer"] = ["diffusers", "DiTTransformer2DModel"]
    (other / "model_index.json").write_text(json.dumps(index))
    cfg = load_config(CONFIG, _over(other, cache, tmp_path / "run"))
    supported = "FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel, UNet2DModel"
    with pytest.raises(ConfigError, match=f"DiTTransformer2DModel; supported denoisers: {supported}"):
        train(cfg)


# -- teacher loading ------------------------------------------------------------------------------
def test_teacher_adapter_and_shift_from_the_pipeline(caches, tmp_path):
    """SD3: shift 3 from its scheduler; Flux: dynamic shift e^μ at 16×16 latents (64 packed tokens);
    UNet: DDIM schedule and prediction type; each field equals the adapter of the pipeline's own
    denoiser (same weights, bit for bit)."""
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.3, 0.8])
    for kind, adapter_cls in (("sd3", SD3Adapter), ("flux", FluxAdapter), ("unet", DDPMUNetAdapter)):
        pipe_dir, cache = caches[kind]
        cfg = load_config(CONFIG, _over(pipe_dir, cache, tmp_path / kind))
        job = build_pipeline_job(cfg)
        field = job.distiller.teacher
        adapter = field.field if isinstance(field, TextCFGField) else field
        assert type(adapter) is adapter_cls
        assert job.latent_shape == (4, 16, 16)
        pipe = PIPES[kind].from_pretrained(pipe_dir)
        if kind == "sd3":
            assert job.time_shift == 3.0
        elif kind == "flux":
            assert isinstance(field, FluxAdapter) and field.guidance_scale == 2.0  # embedded guidance
            assert job.time_shift == pytest.approx(math.exp(calculate_shift(64)), rel=1e-12)
        else:
            assert job.time_shift == 1.0 and adapter.prediction_type == "epsilon"
            ddim = DDIMScheduler.from_pretrained(pipe_dir, subfolder="scheduler")
            torch.testing.assert_close(adapter.alphas_cumprod, ddim.alphas_cumprod.double(), rtol=0, atol=0)
        adapter_kw = {"unet": {"scheduler_config": pipe.scheduler},
                      "flux": {"guidance_scale": 2.0}}.get(kind, {})
        ref = adapter_cls(pipe.unet if kind == "unet" else pipe.transformer, **adapter_kw)
        cond = job.source.get_many(torch.tensor([0, 1]))["cond"]
        with torch.no_grad():
            torch.testing.assert_close(adapter(x, t, cond=cond), ref(x, t, cond=cond), rtol=0, atol=0)
    assert load_pipeline_teacher(job.cfg.teacher).subfolder == "unet"


# -- training -------------------------------------------------------------------------------------
def test_freeflow_sd3_lora_from_the_cli_exports_a_loadable_lora(caches, tmp_path):
    """`flowdistill distill` on the shipped config trains a few steps (finite losses); the export
    loads into the original pipeline class with `load_lora_weights` and, with the second time
    weights, gives exactly the run's student u(x, t, t)."""
    from flowdistill.integrations.diffusers.two_time import load_second_time

    pipe_dir, cache = caches["sd3"]
    out = tmp_path / "run"
    assert main(["distill", str(CONFIG), *_over(pipe_dir, cache, out)]) == 0
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(logs) == 3 and all(math.isfinite(r["loss"]) for r in logs)
    files = sorted(p.name for p in (out / "student").iterdir())
    assert files == ["flowdistill.json", "pytorch_lora_weights.safetensors", "scheduler_config.json",
                     "second_time.safetensors"]
    run = load_run(out)
    assert isinstance(run, PipelineRun) and run.scheduler_config == {"shift": 3.0}
    pipe = StableDiffusion3Pipeline.from_pretrained(pipe_dir)
    pipe.load_lora_weights(out / "student")
    load_second_time(pipe.transformer, out / "student")
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.9, 0.4])
    cond = encode_cache_rows(cache)
    with torch.no_grad():
        ours = run.student(x, t, t, cond=cond)
        theirs = SD3Adapter(pipe.transformer)(x, t, cond=cond)
        teacher = SD3Adapter(StableDiffusion3Pipeline.from_pretrained(pipe_dir).transformer)(x, t, cond=cond)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)
    assert (ours - teacher).abs().max() > 1e-4  # the student moved away from the teacher
    lat = run.sample(2, 2, seed=0, cond=cond)
    assert lat.shape == (2, 4, 16, 16) and torch.isfinite(lat).all()
    torch.testing.assert_close(run.sample(2, 2, seed=0, cond=cond), lat, rtol=0, atol=0)  # seeded


def encode_cache_rows(cache: Path) -> dict[str, torch.Tensor]:
    """The cache's first rows (the prompts' embeddings, as a batch's ``cond``)."""
    from flowdistill.integrations.diffusers.prompt_cache import PromptEmbeddingStore

    return PromptEmbeddingStore(cache).get_many(torch.arange(2))


def test_loss_decreases_on_a_fixed_batch(caches, tmp_path):
    """FreeFlow's prediction loss of the SD3 LoRA two-time student on one fixed batch (fixed
    randomness, one-jump targets s = 0) goes down under repeated updates: the chain (prompt
    conditions, teacher, LoRA + second time embedding) trains. Measured: 0.0222 → 0.0104 in 12 steps;
    the bound 0.6× leaves room for float noise, and a chain that does not train stays near 1×."""
    pipe_dir, cache = caches["sd3"]
    over = ["distiller.adaptive_p=0", "distiller.multi_start=false", "distiller.s_zero_share=1.0",
            "distiller.fd_step=0.05", "guidance.scale=1.0"]
    job = build_pipeline_job(load_config(CONFIG, _over(pipe_dir, cache, tmp_path / "run", *over)))
    d = job.distiller
    batch = d.prior_batch(StepRNG(0, 0), 2, job.latent_shape)
    batch["cond"] = job.source.get_many(torch.arange(2))["cond"]
    groups = d.optim_groups(2e-3)
    assert [g.name for g in groups] == ["student"]
    opt = torch.optim.Adam(groups[0].params, lr=2e-3)
    losses = []
    for _ in range(12):
        out = d.loss(batch, 0, "student", StepRNG(0, 0))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"].detach()))
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.6 * losses[0], losses


def test_resume_equals_uninterrupted(caches, tmp_path):
    pipe_dir, cache = caches["sd3"]
    from safetensors.torch import load_file

    full = train(load_config(CONFIG, _over(pipe_dir, cache, tmp_path / "full", "train.steps=4")))
    part = _over(pipe_dir, cache, tmp_path / "part", "train.ckpt_every=2")
    train(load_config(CONFIG, [*part, "train.steps=2"]))
    train(load_config(CONFIG, [*part, "train.steps=4"]), resume=True)
    for name in ("pytorch_lora_weights.safetensors", "second_time.safetensors"):
        a, b = load_file(full / "student" / name), load_file(tmp_path / "part" / "student" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.parametrize("kind", ["flux", "unet"])
def test_flux_and_unet_chains(caches, tmp_path, kind):
    """One FreeFlow step on the tiny Flux (embedded guidance, dynamic shift) and SD (UNet2DCondition,
    DDIM schedule, CFG) pipelines: exported LoRA + second time, loaded and sampled."""
    pipe_dir, cache = caches[kind]
    out = train(load_config(CONFIG, _over(pipe_dir, cache, tmp_path / kind, "train.steps=1")))
    run = load_run(out)
    want = "FluxTransformer2DModel" if kind == "flux" else "UNet2DConditionModel"
    assert run.meta["denoiser_class"] == want
    lat = run.sample(2, 1, cond=encode_cache_rows(cache))
    assert lat.shape == (2, 4, 16, 16) and torch.isfinite(lat).all()
    pipe = PIPES[kind].from_pretrained(pipe_dir)
    pipe.load_lora_weights(out / "student")  # the diffusers format of the original pipeline class
    shutil.rmtree(out)


def test_reflow_couples_with_prompt_indices_and_trains(caches, tmp_path):
    """`api.couple` on a pipeline teacher: pairs of (noise, guided teacher ODE solution) whose prompt
    is stored as a cache index (the null index = the negative prompt); reflow trains a one-time LoRA
    student on them and the run samples from prompt embeddings."""
    from flowdistill.api import couple
    from flowdistill.data.couplings import CouplingSource, CouplingStore
    from flowdistill.integrations.diffusers.pipeline_data import PromptIndexed

    pipe_dir, cache = caches["sd3"]
    pairs_kw = ["n_pairs=4", "shard_size=4", "chunk_size=4", "solver=euler", "nfe=3", "uncond_share=0.5",
                "cpu=true"]
    over = _over(pipe_dir, cache, tmp_path / "run", "model.params.two_time=false", "train.steps=2",
                 *[f"distiller.couple.{kv}" for kv in pairs_kw])
    cfg_file = CONFIG.with_name("reflow_sd3.yaml")
    root = couple(load_config(cfg_file, over), progress=False)
    pairs = CouplingSource(CouplingStore(root)).get_many(torch.arange(4))
    assert pairs["cond"].dtype == torch.int64 and int(pairs["cond"].max()) <= len(PROMPTS)
    # a pair is the teacher's Euler solution for its prompt: re-solve one pair from its noise
    job = build_pipeline_job(load_config(cfg_file, over))
    field = job.distiller.teacher
    assert isinstance(field, PromptIndexed)
    x = pairs["noise"][:1]
    grid = build_grid("shifted", 3)  # the config's couple.grid (SD3's shift 3)
    with torch.no_grad():
        for i in range(3):
            x = x + (grid[i + 1] - grid[i]) * field(x, grid[i].expand(1), cond=pairs["cond"][:1])
    torch.testing.assert_close(x, pairs["x"][:1], rtol=1e-4, atol=1e-5)
    run = load_run(train(load_config(cfg_file, over)))
    assert run.meta["two_time"] is False
    assert (run.run_dir / "student" / "pytorch_lora_weights.safetensors").is_file()
    lat = run.sample(2, 2, cond=encode_cache_rows(cache))
    assert lat.shape == (2, 4, 16, 16) and torch.isfinite(lat).all()


def test_bf16_teacher_trains_float32_adapters(caches, tmp_path):
    """teacher.dtype=bfloat16: the frozen base weights are bf16, the LoRA adapters and the second time
    embedding float32 (half-precision AdamW would round small updates away); one step is finite."""
    pipe_dir, cache = caches["sd3"]
    over = [o for o in _over(pipe_dir, cache, tmp_path / "run") if o != "teacher.dtype=float32"]
    job = build_pipeline_job(load_config(CONFIG, over))
    model = job.distiller.student.model
    dtypes = {(p.requires_grad, p.dtype) for p in model.parameters()}
    assert dtypes == {(False, torch.bfloat16), (True, torch.float32)}
    batch = job.distiller.prior_batch(StepRNG(0, 0), 2, job.latent_shape)
    batch["cond"] = job.source.get_many(torch.arange(2))["cond"]
    out = job.distiller.loss(batch, 0, "student", StepRNG(0, 0))
    out["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert torch.isfinite(out["loss"]) and all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.fixture(scope="module")
def sd3_latents(caches, tmp_path_factory):
    """A latent cache of four random 32×32 images with captions, encoded by the tiny SD3 pipeline."""
    import numpy as np
    from PIL import Image

    from flowdistill.integrations.diffusers.latent_cache import encode_image_folder

    tmp = tmp_path_factory.mktemp("latents")
    folder = tmp / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, caption in enumerate(PROMPTS):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption)
    pipe = StableDiffusion3Pipeline.from_pretrained(caches["sd3"][0])
    return encode_image_folder(pipe, folder, tmp / "lat", resolution=32, batch_size=2, progress=False)


def test_lcm_one_time_lora_on_a_latent_cache(caches, sd3_latents, tmp_path):
    """A data-based method on the latent cache (``data.name=latents``: VAE latents + caption
    embeddings): LCM's one-time LoRA student (a segment student, k = 1) trains two steps, exports in
    the LoRA format with the scheduler of its segment edges (γ = 1), and samples."""
    pipe_dir, lat_cache = caches["sd3"][0], sd3_latents
    over = _over(pipe_dir, lat_cache, tmp_path / "run", "data.name=latents", "distiller.name=lcm",
                 "distiller.num_steps=8", "train.steps=2")
    cfg_file = CONFIG.with_name("lcm_sd3.yaml")
    job = build_pipeline_job(load_config(cfg_file, over))
    assert job.cfg.distiller.shift == 3.0  # the teacher grid takes the pipeline's shift
    batch = job.source.get_many(torch.arange(2))
    assert batch["x"].shape == (2, 4, 16, 16)
    assert set(batch["cond"]) == {"prompt_embeds", "pooled_prompt_embeds"}
    run = load_run(train(load_config(cfg_file, over)))
    assert run.scheduler_config["gamma"] == 1.0 and run.scheduler_config["shift"] == 3.0
    assert run.meta["two_time"] is False and type(run.student).__name__ == "OneTimeSegmentStudent"
    lat = run.sample(2, 2, cond=encode_cache_rows(caches["sd3"][1]))
    assert lat.shape == (2, 4, 16, 16) and torch.isfinite(lat).all()


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_two_processes_train_like_one(caches, tmp_path, engine):
    """torchrun with two CPU processes (gloo; DDP, or FSDP2 with ``train.distributed=fsdp``, whose
    export gathers the sharded LoRA student into a freshly built one) trains the SD3 LoRA job like
    one process: each rank takes its slice of the same keyed prompt batch. Measured (DDP): max |Δ|
    1.5e-7 on adapter weights of size ~1 (float reduction order); the bound 1e-5 is far below a
    wrong slice (~1e-3)."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from tests.helpers import REPO, free_port

    pipe_dir, cache = caches["sd3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(REPO)}
    outs = {}
    for nproc in (1, 2):
        out = tmp_path / f"run{nproc}"
        args = ["tests/dist_train_worker.py", "--config", str(CONFIG), "--distiller", "freeflow",
                *_over(pipe_dir, cache, out, "train.steps=2", "train.batch_size=4",
                      *([f"train.distributed={engine}"] if nproc == 2 and engine == "fsdp" else []))]
        launch = [] if nproc == 1 else ["-m", "torch.distributed.run", "--nproc_per_node", "2",
                                        "--master_port", str(free_port())]
        r = subprocess.run([sys.executable, *launch, *args], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=400)
        assert r.returncode == 0, r.stderr[-3000:]
        outs[nproc] = load_file(out / "student" / "pytorch_lora_weights.safetensors")
    assert max((outs[1][k] - outs[2][k]).abs().max().item() for k in outs[1]) < 1e-5


def test_full_fine_tune_student_exports_the_denoiser(caches, tmp_path):
    """``model.name=diffusers_full``: every weight trains; the export is the whole denoiser
    (``student/transformer``, loadable by diffusers) plus the second time weights, and ``load_run``
    rebuilds exactly the saved weights."""
    from diffusers import SD3Transformer2DModel

    pipe_dir, cache = caches["sd3"]
    out = train(load_config(CONFIG, _over(pipe_dir, cache, tmp_path / "run", "model.name=diffusers_full",
                                          "train.steps=2")))
    saved = SD3Transformer2DModel.from_pretrained(out / "student" / "transformer").state_dict()
    teacher = SD3Transformer2DModel.from_pretrained(pipe_dir, subfolder="transformer").state_dict()
    run = load_run(out)
    mine = run.denoiser.state_dict()
    assert all(torch.equal(mine[k], v) for k, v in saved.items())
    assert any(not torch.equal(teacher[k], v) for k, v in saved.items())  # it trained
    assert sorted(p.name for p in (out / "student").iterdir()) == [
        "flowdistill.json", "scheduler_config.json", "second_time.safetensors", "transformer"]


def test_gradient_checkpointing_gives_the_same_gradients(caches, tmp_path):
    """``model.params.gradient_checkpointing=true`` turns on diffusers' checkpointing in the student's
    transformer and changes no gradient (the recomputed forward is the same computation)."""
    pipe_dir, cache = caches["sd3"]
    grads = {}
    for gc in (True, False):
        over = _over(pipe_dir, cache, tmp_path / "run", f"model.params.gradient_checkpointing={gc}")
        job = build_pipeline_job(load_config(CONFIG, over))
        d = job.distiller
        assert d.student.model.is_gradient_checkpointing is gc
        batch = d.prior_batch(StepRNG(0, 0), 2, job.latent_shape)
        batch["cond"] = job.source.get_many(torch.arange(2))["cond"]
        d.loss(batch, 0, "student", StepRNG(0, 0))["loss"].backward()
        grads[gc] = [p.grad for p in d.student.parameters() if p.requires_grad]
    pairs = zip(grads[True], grads[False], strict=True)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in pairs)


def test_mdt_one_time_lora_on_a_latent_cache(caches, sd3_latents, tmp_path):
    """MDT-dist (one-time student) trains one step on the latent cache and samples."""
    pipe_dir = caches["sd3"][0]
    over = _over(pipe_dir, sd3_latents, tmp_path / "run", "data.name=latents", "distiller.name=mdt",
                 "model.name=diffusers_lora", "train.steps=1")
    run = load_run(train(load_config(None, over)))
    assert run.meta["distiller"] == "mdt" and run.meta["two_time"] is False
    lat = run.sample(2, 2, cond=encode_cache_rows(caches["sd3"][1]))
    assert lat.shape == (2, 4, 16, 16) and torch.isfinite(lat).all()


def test_lora_checkpoints_hold_only_what_trains(caches, tmp_path):
    """A LoRA job's checkpoints leave out the frozen base weights (copies of the teacher's): the saved
    model state is the adapters and the second time embedding; resuming from it is exact
    (:func:`test_resume_equals_uninterrupted`)."""
    from safetensors.torch import load_file

    pipe_dir, cache = caches["sd3"]
    out = train(load_config(CONFIG, _over(pipe_dir, cache, tmp_path / "run", "train.steps=1",
                                          "train.ckpt_every=1")))
    keys = set(load_file(out / "checkpoints" / "step-0000001" / "model.safetensors"))
    assert keys and all("lora_" in k or "flowdistill_second_time" in k for k in keys), sorted(keys)[:5]


def test_latent_size_from_the_cache(caches, tmp_path):
    """``data.image_size=0`` (the shipped configs) trains at the latent shape the cache was embedded
    at (here 64 px → 4×32×32, not the tiny pipeline's default 4×16×16), and the loaded run samples
    at the size it trained at."""
    pipe_dir, _ = caches["sd3"]
    cache = encode_prompts(StableDiffusion3Pipeline.from_pretrained(pipe_dir), PROMPTS[:2], tmp_path / "c64",
                           batch_size=2, resolution=64, progress=False)
    over = [o for o in _over(pipe_dir, cache, tmp_path / "run", "train.steps=1") if o != "data.image_size=32"]
    run = load_run(train(load_config(CONFIG, over)))
    assert run.meta["latent_shape"] == [4, 32, 32] and run.latent_shape == (4, 32, 32)
    assert run.sample(2, 1, cond=encode_cache_rows(cache)).shape == (2, 4, 32, 32)
