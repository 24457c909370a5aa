"""The distiller contract (DESIGN.md §3): one ``sample`` signature with declared options, inference-only
construction through ``__init__``, declared class attributes, the explicit "no update" signal."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flowdistill.api import load_run
from flowdistill.config import load_config, to_yaml
from flowdistill.core.rng import StepRNG
from flowdistill.distillers import DISTILLERS, Distiller
from flowdistill.distillers.base import BenchRow, is_no_update, no_update
from flowdistill.distillers.flow_matching import FlowMatching, FlowMatchingConfig
from flowdistill.distillers.freeflow import FreeFlow, FreeFlowConfig
from flowdistill.distillers.reflow import InstaFlow, InstaFlowConfig, Reflow, ReflowConfig
from flowdistill.errors import ConfigError
from flowdistill.models import build_model
from flowdistill.runs import export_student
from tests.helpers import main_in_process

TINY = {"data_dim": 2, "hidden": 16, "depth": 1, "time_embed_dim": 8}


def _net(two_time: bool = False, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("mlp", **TINY, two_time=two_time)


def _freeflow(teacher: bool = True, **cfg) -> FreeFlow:
    t = _net(seed=1) if teacher else None
    if teacher:
        return FreeFlow(FreeFlowConfig(**cfg), _net(two_time=True), t)
    return FreeFlow.for_inference(FreeFlowConfig(**cfg), _net(two_time=True))


def _freeflow_run(tmp_path: Path) -> Path:
    run = tmp_path / "ff"
    cfg = load_config(None, [f"out_dir={run}", "model.name=mlp", "data.name=checkerboard",
                             *(f"model.params.{k}={v}" for k, v in TINY.items())],
                      default_distiller="freeflow")
    run.mkdir()
    (run / "config.yaml").write_text(to_yaml(cfg))
    export_student(_net(two_time=True), run, {"distiller": "freeflow", "data": "checkerboard", "steps": 0})
    return run


# -- (a) one sample signature, declared options ---------------------------------------------
def test_an_option_a_method_does_not_take_is_a_one_line_error_naming_what_it_takes():
    ff = _freeflow(teacher=False)
    noise = torch.randn(8, 2)
    msg = r"^freeflow's sampler takes no option 'solver' \(it takes: none\)$"
    with pytest.raises(ConfigError, match=msg):
        ff.sample(noise, 2, solver="heun")
    fm = FlowMatching.for_inference(FlowMatchingConfig(), _net())
    msg = r"flow_matching's sampler takes no option 'grid' \(it takes: solver\)"
    with pytest.raises(ConfigError, match=msg):
        fm.sample(noise, 2, grid="uniform")
    # None means "the method's default", so generic callers may always pass solver=...
    torch.testing.assert_close(ff.sample(noise, 2, solver=None), ff.sample(noise, 2))


def test_every_registered_sampler_goes_through_the_checked_entry():
    """Subclasses implement ``_sample``; none overrides the public ``sample`` (which checks)."""
    for name in DISTILLERS.names():
        cls = DISTILLERS.get(name)
        assert cls.sample is Distiller.sample, name
        assert cls._sample is not Distiller._sample, name


@pytest.mark.parametrize("make", [
    lambda: FlowMatching.for_inference(FlowMatchingConfig(), _net()),
    lambda: Reflow.for_inference(ReflowConfig(), _net()),
])
def test_a_valid_solver_option_changes_the_samples(make):
    d = make()
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    euler, heun = d.sample(noise, 4, solver="euler"), d.sample(noise, 4, solver="heun")
    assert euler.shape == heun.shape == (64, 2)
    assert (euler - heun).abs().max() > 1e-4
    torch.testing.assert_close(d.sample(noise, 4), euler)  # the config's default solver is euler
    torch.testing.assert_close(d.sample(noise, 4, solver="heun", model=d.student), heun)


def test_cli_sample_with_an_option_freeflow_does_not_take(capsys, tmp_path):
    run = _freeflow_run(tmp_path)
    out = tmp_path / "s.safetensors"
    code, _, err = main_in_process(capsys, "sample", str(run), "--solver", "heun", "--n", "8",
                                   "--out", str(out))
    assert code == 2
    assert err.strip().splitlines() == ["error: freeflow's sampler takes no option 'solver' (it takes: none)"]
    assert not out.exists()
    code, _, err = main_in_process(capsys, "eval", str(run), "--solver", "heun", "--n", "64",
                                   "--out", str(tmp_path / "ev"))
    assert code == 2
    assert err.strip().splitlines() == ["error: freeflow's sampler takes no option 'solver' (it takes: none)"]
    code, _, err = main_in_process(capsys, "sample", str(run), "--n", "8", "--out", str(out))
    assert code == 0, err
    assert out.is_file()
    with pytest.raises(ConfigError, match="takes no option 'solver'"):
        load_run(run).sample(4, 1, solver="heun")
    assert load_run(run).sample(4, 2).shape == (4, 2)


# -- (b) inference-only construction --------------------------------------------------------
def test_for_inference_needs_no_teacher_and_refuses_training():
    ff = _freeflow(teacher=False)
    assert ff.inference_only and ff.teacher is None and ff.fake is None
    assert ff.sample(torch.randn(4, 2), 1).shape == (4, 2)
    rng = StepRNG(0, 0, 0, 1, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="freeflow.*inference only.*cannot train"):
        ff.loss({"noise": torch.randn(4, 2)}, 0, "student", rng)
    for cls, cfg in ((Reflow, ReflowConfig()), (InstaFlow, InstaFlowConfig())):
        d = cls.for_inference(cfg, _net())
        assert d.inference_only and d.teacher is None
        with pytest.raises(RuntimeError, match=f"{cls.name}.*inference only"):
            d.loss({"x": torch.randn(4, 2), "noise": torch.randn(4, 2)}, 0, "student", rng)
    with pytest.raises(ValueError, match="needs a teacher"):
        FreeFlow(FreeFlowConfig(), _net(two_time=True), None)
    # flow matching needs no teacher, so an inference-only one may still compute its loss
    fm = FlowMatching.for_inference(FlowMatchingConfig(), _net())
    assert fm.loss({"x": torch.randn(8, 2)}, 0, "student", rng)["loss"].requires_grad


def test_for_inference_goes_through_init(monkeypatch):
    seen = {}
    orig = FreeFlow.__init__

    def spy(self, cfg, student, teacher=None, *, inference_only=False):
        seen.update(teacher=teacher, inference_only=inference_only)
        orig(self, cfg, student, teacher, inference_only=inference_only)

    monkeypatch.setattr(FreeFlow, "__init__", spy)
    FreeFlow.for_inference(FreeFlowConfig(), _net(two_time=True))
    assert seen == {"teacher": None, "inference_only": True}


# -- (c) declared class attributes ----------------------------------------------------------
@pytest.mark.parametrize("name", ["flow_matching", "freeflow", "reflow", "instaflow"])
def test_registered_distillers_declare_the_contract_attributes(name):
    cls = DISTILLERS.get(name)
    assert cls.name == name and issubclass(cls, Distiller)
    assert isinstance(cls.Config(), cls.Config) and cls.Config().name == name
    for attr in ("needs_data", "needs_teacher", "student_two_time"):
        assert isinstance(getattr(cls, attr), bool), attr
    assert isinstance(cls.sample_options, dict)
    assert all(isinstance(k, str) and isinstance(v, str) and v for k, v in cls.sample_options.items())
    assert isinstance(cls.eval_nfe, tuple) and cls.eval_nfe
    assert all(type(k) is int and k > 0 for k in cls.eval_nfe)
    assert cls.bench_rows and all(isinstance(r, BenchRow) for r in cls.bench_rows)
    labels = [r.label for r in cls.bench_rows]
    assert len(set(labels)) == len(labels) and all(labels)
    for r in cls.bench_rows:
        assert all(type(k) is int and k > 0 for k in r.nfes(cls))
        assert all("=" in o for o in r.overrides)
        # the overrides name real config keys of the method
        load_config(None, ["out_dir=x", f"distiller.name={name}", *r.overrides])
    base_doc = Distiller.__doc__ or ""
    assert "_sample" in base_doc


def test_declared_values_of_the_existing_methods():
    assert FreeFlow.eval_nfe == (1, 2, 4) and FreeFlow.sample_options == {}
    assert Reflow.eval_nfe == (1, 2, 4, 128) and InstaFlow.eval_nfe == (1,)
    assert set(Reflow.sample_options) == set(FlowMatching.sample_options) == {"solver"}
    assert FreeFlow.student_two_time and not Reflow.student_two_time and not FlowMatching.student_two_time
    assert FlowMatching.needs_data and not FreeFlow.needs_data and not Reflow.needs_data
    assert [r.label for r in FreeFlow.bench_rows][0] == "FreeFlow"
    assert InstaFlow.bench_rows[0].nfes(InstaFlow) == (1,)
    assert Reflow.bench_rows[0].nfes(Reflow) == (1, 2, 4, 128)


# -- (d) nothing to optimise ----------------------------------------------------------------
def test_no_update_is_a_gradient_free_loss_and_freeflow_uses_it_before_the_warmup():
    out = no_update({"corr": torch.tensor(3.0)})
    assert is_no_update(out) and float(out["loss"]) == 0.0 and float(out["corr"]) == 3.0
    assert Distiller.no_update is no_update
    ff = _freeflow(mode="correction", correction_warmup=5)
    rng = StepRNG(0, 0, 0, 1, torch.device("cpu"))
    batch = {"noise": torch.randn(8, 2)}
    early = ff.loss(batch, 0, "student", rng)
    assert is_no_update(early) and float(early["loss"]) == 0.0
    late = ff.loss(batch, 5, "student", StepRNG(0, 5, 0, 1, torch.device("cpu")))
    assert not is_no_update(late) and "corr" in late
    assert not is_no_update(_freeflow(mode="prediction").loss(batch, 0, "student", rng))
