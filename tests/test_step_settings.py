"""How a training step runs on its device (dset/engine/step_settings.py): each setting tested for its effect on a
real training step on CPU (the settings that apply on CUDA only are switched on by hand here)."""

from __future__ import annotations

import pytest
import torch

from dset.config import ConfigError, TrainConfig, resolve_config
from dset.engine.distributed import DistInfo
from dset.engine.epoch_stats import EpochStats
from dset.engine.loop import TrainingRun
from dset.engine.step_settings import StepSettings

TINY = ["data.image_size=64", "data.batch_size=2", "model.decoder.num_queries=10", "model.decoder.num_denoising=4",
        "model.eval_spatial_size=[64,64]", "data.synthetic.num_train=4", "data.synthetic.num_val=2",
        "data.synthetic.image_size=64", "run.device=cpu", "run.progress=false", "train.warmup_steps=1",
        "data.multi_scale=false", "data.augment=none"]


def test_settings_of_a_configuration_on_each_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert StepSettings.of(TrainConfig(), cpu) == StepSettings()   # amp and channels-last apply on CUDA only
    assert StepSettings.of(TrainConfig(), cpu).precision == "fp32"
    default = StepSettings.of(TrainConfig(), cuda)
    assert default == StepSettings(torch.bfloat16, loss_scaling=False, channels_last=True)
    assert default.precision == "bf16 autocast"
    fp16 = StepSettings.of(TrainConfig(amp_dtype="float16", channels_last=False), cuda)
    assert fp16 == StepSettings(torch.float16, loss_scaling=True) and fp16.precision == "fp16 autocast + loss scaling"
    assert StepSettings.of(TrainConfig(amp=False, compile=True), cuda) == StepSettings(channels_last=True, compile=True)


@pytest.mark.parametrize("key,value,message", [
    ("train.amp_dtype", "half", "train.amp_dtype: must be one of bfloat16, float16, got 'half'"),
    ("train.loss_check_every", "0", "train.loss_check_every: must be an integer >= 1, got 0"),
])
def test_bad_values_are_refused_naming_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        resolve_config("rtdetr_r18", budget="none", overrides=[f"{key}={value}"])


def _run(tmp_path, settings: StepSettings | None = None) -> TrainingRun:
    cfg = resolve_config("rtdetr_r18", budget="none", overrides=TINY)
    run = TrainingRun(cfg, tmp_path, hooks=[], resume=False, dinfo=DistInfo())
    if settings is not None:   # what TrainingRun.__init__ does with them, here on CPU
        run.step_settings = settings
        settings.prepare_model(run.model_core)
        settings.compile_model(run.model_core)
    run.model.train()
    run.criterion.train()
    return run


def _one_step(run: TrainingRun, batch) -> dict:
    stats = EpochStats()
    run.train_step(*batch, stats, None, "test step")
    # the gradients (clipped, as the optimizer saw them): Adam's first update is about lr * sign(grad), which float
    # rounding flips for a gradient near 0, so the updated weights would not tell a layout apart from a bug
    return {"loss": stats.mean_loss(), **{n: p.grad.clone() for n, p in run.model_core.named_parameters()
                                          if p.grad is not None}}


def _assert_same_gradients(got: dict, reference: dict, share: float = 0.05) -> None:
    """Each gradient within ``share`` of its layer's largest (and 1e-9, for the biases before a BatchNorm, whose
    gradient is 0 to rounding). The BatchNorms' statistics over batch 2 at 2x2 maps (8 values) amplify rounding on
    the way back: with channels-last or compiled on CPU, up to 3.7% of the stem's largest gradient (measured); a
    wrong layout or a wrong computation changes them entirely."""
    assert set(got) == set(reference)
    for name, g in reference.items():
        if name != "loss":
            torch.testing.assert_close(got[name], g, rtol=share, atol=max(share * float(g.abs().max()), 1e-9),
                                       msg=lambda m, name=name: f"{name}: {m}")


@pytest.fixture(scope="module")
def batch_and_reference(tmp_path_factory):
    run = _run(tmp_path_factory.mktemp("ref"))
    batch = next(iter(run.train_loader))
    return batch, _one_step(run, batch)


def test_channels_last_lays_out_the_convolutions_and_changes_only_rounding(tmp_path, batch_and_reference):
    batch, reference = batch_and_reference
    run = _run(tmp_path, StepSettings(channels_last=True))
    weights4d = [p for p in run.model_core.parameters() if p.dim() == 4]
    assert weights4d and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights4d)
    assert not all(p.is_contiguous() for p in weights4d)   # really NHWC, not only contiguous both ways (1x1 maps)
    assert run.step_settings.prepare_images(batch[0]).is_contiguous(memory_format=torch.channels_last)
    got = _one_step(run, batch)
    assert got["loss"] == pytest.approx(reference["loss"], rel=1e-5)
    _assert_same_gradients(got, reference)


def test_bf16_autocast_runs_the_forward_in_bf16_without_loss_scaling(tmp_path, batch_and_reference):
    batch, reference = batch_and_reference
    run = _run(tmp_path, StepSettings(torch.bfloat16))
    assert not run.step_settings.grad_scaler().is_enabled()
    dtypes = set()
    hook = run.model_core.backbone.register_forward_hook(
        lambda module, inputs, output: dtypes.update(t.dtype for t in output))
    got = _one_step(run, batch)
    hook.remove()
    assert dtypes == {torch.bfloat16}
    # the same loss to bf16's precision (8 bits of mantissa), but not bit for bit
    assert got["loss"] == pytest.approx(reference["loss"], rel=0.05) and got["loss"] != reference["loss"]
    assert all(p.dtype == torch.float32 for p in run.model_core.parameters())   # master weights stay fp32


@pytest.mark.slow
def test_compile_compiles_the_backbone_and_changes_only_rounding(tmp_path, batch_and_reference):
    batch, reference = batch_and_reference
    run = _run(tmp_path, StepSettings(compile=True))
    assert run.model_core.backbone._compiled_call_impl is not None
    assert run.ema.module.backbone._compiled_call_impl is None   # the EMA copy was made before, and stays eager
    assert list(run.model_core.state_dict()) == list(run.ema.module.state_dict())   # the checkpoints' names
    got = _one_step(run, batch)
    assert got["loss"] == pytest.approx(reference["loss"], rel=1e-4)
    _assert_same_gradients(got, reference)
    run.model_core.eval()
    with torch.no_grad():   # BatchNorm in eval: the compiled backbone's features equal eager's to float rounding
        compiled = run.model_core.backbone(batch[0])
        run.model_core.backbone._compiled_call_impl, saved = None, run.model_core.backbone._compiled_call_impl
        eager = run.model_core.backbone(batch[0])
        run.model_core.backbone._compiled_call_impl = saved
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-5)
