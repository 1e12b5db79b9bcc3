import math

import pytest
import torch

from robustq import models
from robustq.train import Extensions, NonFiniteLossError, TrainConfig, _decay_groups, train


def _fresh_model(seed, data):
    torch.manual_seed(seed)
    return models.make_model("cnn", data.in_channels, data.num_classes)


def _weights(model):
    return torch.cat([p.detach().flatten() for p in model.state_dict().values() if p.is_floating_point()])


def test_same_seed_gives_identical_weights_and_another_seed_differs(fmnist_small):
    config = TrainConfig(epochs=1, batch_size=128, seed=0)
    a = train(_fresh_model(0, fmnist_small), fmnist_small, config, progress=False).model
    b = train(_fresh_model(0, fmnist_small), fmnist_small, config, progress=False).model
    c = train(_fresh_model(1, fmnist_small), fmnist_small, TrainConfig(epochs=1, batch_size=128, seed=1), progress=False).model
    assert torch.equal(_weights(a), _weights(b))
    assert not torch.equal(_weights(a), _weights(c))


class _Interrupt(Exception):
    pass


def test_resume_after_interruption_matches_an_uninterrupted_run(synthetic, tmp_path):
    config = TrainConfig(epochs=2, batch_size=128, seed=0)
    reference = train(_fresh_model(0, synthetic), synthetic, config, progress=False)

    def interrupt_in_second_epoch(model, context):
        if context.epoch == 1:
            raise _Interrupt
        return context.loss.new_zeros(())

    checkpoint = tmp_path / "ckpt.pt"
    with pytest.raises(_Interrupt):
        train(_fresh_model(0, synthetic), synthetic, config, Extensions(penalty=interrupt_in_second_epoch),
              checkpoint=checkpoint, progress=False)
    assert checkpoint.exists()
    resumed = train(_fresh_model(5, synthetic), synthetic, config, checkpoint=checkpoint, progress=False)
    assert len(resumed.history) == 2
    assert torch.equal(_weights(resumed.model), _weights(reference.model))


def test_corrupt_checkpoint_is_reported_and_training_starts_over(synthetic, tmp_path, capsys):
    checkpoint = tmp_path / "ckpt.pt"
    checkpoint.write_bytes(b"not a checkpoint")
    result = train(_fresh_model(0, synthetic), synthetic, TrainConfig(epochs=1, batch_size=256), checkpoint=checkpoint, progress=False)
    assert "ignoring unreadable checkpoint" in capsys.readouterr().err
    assert len(result.history) == 1


def test_non_finite_loss_stops_with_the_step_and_value(synthetic):
    def nan_penalty(model, context):
        return context.loss.new_tensor(float("nan"))

    with pytest.raises(NonFiniteLossError, match=r"loss became nan at epoch 1, step 0.*lower the learning rate"):
        train(_fresh_model(0, synthetic), synthetic, TrainConfig(epochs=1), Extensions(penalty=nan_penalty), progress=False)


def test_history_records_loss_accuracy_time_and_throughput(synthetic):
    result = train(_fresh_model(0, synthetic), synthetic, TrainConfig(epochs=2, batch_size=128, lr=0.05), progress=False)
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert set(result.history[0]) >= {"loss", "train_acc", "wall_time_s", "images_per_s"}
    assert result.history[1]["loss"] < result.history[0]["loss"]
    assert result.images_per_s > 0 and not result.model.training


def test_weight_decay_skips_batchnorm_and_biases():
    model = models.make_model("cnn", 1, 10)
    decay, no_decay = _decay_groups(model)
    assert all(p.dim() > 1 for p in decay["params"])
    bn_params = {id(p) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()}
    assert bn_params <= {id(p) for p in no_decay["params"]} and no_decay["weight_decay"] == 0.0


def test_adam_and_cosine_are_available(synthetic):
    config = TrainConfig(epochs=1, optimizer="adam", lr=1e-3, schedule="cosine")
    assert train(_fresh_model(0, synthetic), synthetic, config, progress=False).history[0]["loss"] > 0


@pytest.mark.parametrize(
    "kwargs, match",
    [({"epochs": 0}, "epochs"), ({"epochs": 1, "lr": -0.1}, "lr"), ({"epochs": 1, "optimizer": "rmsprop"}, "optimizer"),
     ({"epochs": 1, "schedule": "step"}, "schedule"), ({"epochs": 1, "batch_size": 0}, "batch_size"),
     ({"epochs": 1, "label_smoothing": 1.0}, "label_smoothing"), ({"epochs": 1, "weight_decay": float("nan")}, "weight_decay")],
)
def test_bad_train_config_names_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_evaluation_leaves_the_memory_format_and_mode_as_it_found_them(synthetic):
    from robustq.data import eval_loader
    from robustq.train import evaluate

    model = _fresh_model(0, synthetic).to(memory_format=torch.channels_last).train()
    conv = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][1]  # 16 input channels
    evaluate(model, eval_loader(synthetic, "test", 256, "cpu"))
    assert model.training and conv.weight.is_contiguous(memory_format=torch.channels_last)
    evaluate(model.to(memory_format=torch.contiguous_format).eval(), eval_loader(synthetic, "test", 256, "cpu"))
    assert not model.training and conv.weight.is_contiguous()
    assert not conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_hooks_record_measurements_without_changing_training(synthetic):
    config = TrainConfig(epochs=2, batch_size=128, seed=0)
    plain = train(_fresh_model(0, synthetic), synthetic, config, progress=False)
    calls = []

    def on_step(model, epoch, step):
        calls.append((epoch, step, torch.is_grad_enabled()))

    def on_epoch(model, epoch):
        return {"norm": float(sum(p.detach().pow(2).sum() for p in model.parameters())), "epoch_seen": epoch}

    hooked = train(_fresh_model(0, synthetic), synthetic, config,
                   Extensions(on_step_end=[on_step], on_epoch_end=[on_epoch, lambda model, epoch: None]), progress=False)
    assert torch.equal(_weights(hooked.model), _weights(plain.model))
    steps = plain.history[0]["images"] // 128
    assert calls == [(e, s, False) for e in range(2) for s in range(steps)]
    assert [h["epoch_seen"] for h in hooked.history] == [0, 1] and hooked.history[-1]["norm"] > 0
    assert [h["loss"] for h in hooked.history] == [h["loss"] for h in plain.history]


def test_epoch_hook_values_are_checkpointed_and_may_not_overwrite_history(synthetic, tmp_path):
    checkpoint = tmp_path / "ckpt.pt"
    config = TrainConfig(epochs=1, batch_size=256)
    train(_fresh_model(0, synthetic), synthetic, config, Extensions(on_epoch_end=[lambda m, e: {"probe": 1.5}]),
          checkpoint=checkpoint, progress=False)
    assert torch.load(checkpoint, weights_only=True)["history"][0]["probe"] == 1.5
    with pytest.raises(ValueError, match=r"on_epoch_end hook values \['loss'\] would overwrite history entries"):
        train(_fresh_model(0, synthetic), synthetic, config, Extensions(on_epoch_end=[lambda m, e: {"loss": 0.0}]),
              progress=False)
    with pytest.raises(TypeError, match="must return a dict of numbers or None, got float"):
        train(_fresh_model(0, synthetic), synthetic, config, Extensions(on_epoch_end=[lambda m, e: 1.0]),
              progress=False)


# --- the GPU path, checked without a GPU ----------------------------------------------------------


@pytest.mark.parametrize(("name", "expected"), [
    ("baseline", torch.bfloat16), ("symreg_satnl_asam", torch.bfloat16), ("kure", torch.bfloat16),
    ("grad_l1", None), ("qat_ste", None), ("sinreq_wrpn", None),
])
def test_bf16_autocast_only_on_cuda_and_only_where_the_maths_survives(name, expected):
    from robustq import methods, models
    from robustq.train import autocast_dtype

    method = methods.make(name)
    extensions = method.extensions(method.prepare(models.make_model("cnn", 1, 10)))
    assert autocast_dtype(torch.device("cuda"), extensions) == expected
    assert autocast_dtype(torch.device("cpu"), extensions) is None  # the book's numbers stay float32


def test_the_autocast_forward_runs_in_bf16_and_keeps_float32_weights(monkeypatch):
    from robustq import methods, models
    from robustq import train as train_module
    from robustq.data import load_dataset

    monkeypatch.setattr(train_module, "autocast_dtype", lambda device, ext: torch.bfloat16)  # as on CUDA
    torch.manual_seed(0)
    model = models.make_model("cnn", 1, 10)
    seen = []
    model[-1].register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    result = train_module.train(model, load_dataset("synthetic", train_size=64), TrainConfig(epochs=1, batch_size=32),
                                methods.make("baseline").extensions(model), progress=False)
    assert seen and set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in result.model.parameters())
    assert math.isfinite(result.history[-1]["loss"])


def test_under_torchrun_each_process_takes_its_local_gpu(monkeypatch):
    from robustq import distributed

    monkeypatch.setenv("LOCAL_RANK", "3")
    assert distributed.local_device(torch.device("cuda")) == torch.device("cuda", 3)
    assert distributed.local_device(torch.device("cuda", 1)) == torch.device("cuda", 1)  # an explicit index wins
    assert distributed.local_device(torch.device("cpu")) == torch.device("cpu")


def test_the_training_split_moves_to_the_device_once():
    from robustq.data import load_dataset, train_loader

    loader = train_loader(load_dataset("synthetic", train_size=64), 32, device="cpu")
    stored = loader.images.data_ptr()
    batches = list(loader) + list(loader)
    assert loader.images.data_ptr() == stored and all(x.device == loader.device for x, _ in batches)


def test_a_warm_start_trains_in_channels_last_until_double_backprop_begins():
    from robustq import methods
    from robustq.data import load_dataset

    torch.manual_seed(0)
    method = methods.make("grad_l1", warmup_epochs=1)
    model = models.make_model("cnn", 1, 10)
    extensions = method.extensions(model)
    assert (extensions.double_backprop, extensions.double_backprop_from_epoch) == (True, 1)
    kernel = model[2].conv.weight  # 16 input channels: the two layouts differ (the stem's one does not)
    layouts = []
    extensions.on_epoch_end.append(lambda m, epoch: layouts.append(
        (kernel.is_contiguous(), kernel.is_contiguous(memory_format=torch.channels_last))) or None)
    train(model, load_dataset("synthetic", train_size=64), TrainConfig(epochs=2, batch_size=32), extensions,
          progress=False)
    assert layouts == [(False, True), (True, False)]


# --- checkpoint selection ------------------------------------------------------------------------


def test_selection_keeps_the_best_scoring_epoch_and_marks_it(synthetic):
    config = TrainConfig(epochs=3, batch_size=128, seed=0)
    snapshots, scores = [], iter([0.2, 0.9, 0.5])

    def score(model):
        assert not model.training  # scored in eval mode, then trained on
        snapshots.append(_weights(model).clone())
        return next(scores)

    result = train(_fresh_model(0, synthetic), synthetic, config, select=score, progress=False)
    assert [h["selection_score"] for h in result.history] == [0.2, 0.9, 0.5]
    assert [h["kept"] for h in result.history] == [False, True, False]
    assert torch.equal(_weights(result.model), snapshots[1])
    last = train(_fresh_model(0, synthetic), synthetic, config, progress=False).model
    assert torch.equal(snapshots[2], _weights(last))  # scoring does not change the trajectory


def test_selection_keeps_the_earliest_of_equal_scores_across_a_resume(synthetic, tmp_path):
    config = TrainConfig(epochs=2, batch_size=128, seed=0)
    checkpoint, snapshots = tmp_path / "ckpt.pt", []

    def score(model):
        snapshots.append(_weights(model).clone())
        return 0.5

    def interrupt_in_second_epoch(model, context):
        if context.epoch == 1:
            raise _Interrupt
        return context.loss.new_zeros(())

    with pytest.raises(_Interrupt):
        train(_fresh_model(0, synthetic), synthetic, config, Extensions(penalty=interrupt_in_second_epoch),
              checkpoint=checkpoint, select=score, progress=False)
    resumed = train(_fresh_model(5, synthetic), synthetic, config, checkpoint=checkpoint, select=score,
                    progress=False)
    assert [h["kept"] for h in resumed.history] == [True, False]
    assert torch.equal(_weights(resumed.model), snapshots[0])
