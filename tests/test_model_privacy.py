"""Model + DP-SGD: what trains, what stays frozen, and honest epsilon accounting."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import BertConfig

from fedllm.accounting import BudgetExhaustedError, epsilon_for, plan_privacy
from fedllm.contract import RoundConfig, evaluate_config, train_config
from fedllm.data import tokenize
from fedllm.loop import FrozenTrainingError
from fedllm.model import build_model, feature_center, mean_pool, set_feature_center
from fedllm.settings_reader import SettingsError
from fedllm.train import classification_metrics, evaluate, lr_schedule, train_local

pytestmark = pytest.mark.gpu  # they train and load on DEVICE (FEDLLM_TEST_DEVICE=cuda: the GPU)


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_only_lora_and_head_train(settings, tiny_model):
    model = tiny_model(settings)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable, "nothing trainable"
    assert all("lora_" in n or "classifier" in n for n in trainable), trainable
    assert not any("embeddings" in n for n in trainable)


def test_private_step_changes_lora_not_frozen_weights(settings, tokenizer, frame, tiny_model, labels):
    model = tiny_model(settings)
    data = tokenize(frame, tokenizer, labels, settings.max_length)
    before = _snapshot(model)
    s = settings.replace(max_steps=1, target_epsilon=8.0)
    plan = plan_privacy(s.resolved(), len(data))
    result = train_local(model, data, s.resolved(), plan=plan)
    assert result.steps == 1
    after = _snapshot(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    lora_b = {n for n, p in model.named_parameters() if "lora_B" in n}
    assert lora_b and lora_b <= changed, "every LoRA B matrix must move after one DP step"
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert not (changed & frozen), f"frozen weights changed: {sorted(changed & frozen)[:3]}"


def test_the_books_compose_every_step_of_every_training(settings, tokenizer, frame, tiny_model, labels):
    """Three trainings of 3 steps, each restoring the last one's history, spend what one of 9 does."""
    data = tokenize(frame, tokenizer, labels, settings.max_length)
    s = settings.replace(noise_multiplier=1.1, max_steps=3, accountant="rdp")
    plan = plan_privacy(s.resolved(), len(data), planned_rounds=3)
    model = tiny_model(s)
    history, epsilons = [], []
    for _ in range(3):
        result = train_local(model, data, s.resolved(), plan=plan, history=history)
        history = result.history
        epsilons.append(result.epsilon)
    assert epsilons[0] < epsilons[1] < epsilons[2]
    q = 1 / math.ceil(len(data) / s.batch_size)
    assert history == [[1.1, q, 9]]  # one entry per (sigma, q): the history stays short
    nine = s.replace(max_steps=9)
    at_once = train_local(tiny_model(s), data, nine.resolved(), plan=plan_privacy(nine.resolved(), len(data)))
    assert at_once.history == history and epsilons[-1] == at_once.epsilon


def test_target_epsilon_is_calibrated_over_all_planned_rounds(settings, frame):
    s = settings.replace(target_epsilon=3.0, epochs=2, accountant="prv")
    n = len(frame)
    plan = plan_privacy(s.resolved(), n, planned_rounds=4)
    one_round = (plan.noise_multiplier, plan.sample_rate, plan.planned_steps // 4)
    spent = epsilon_for([one_round] * 4, plan.delta, "prv")
    assert spent <= 3.0 + 1e-6
    assert spent > 2.5, "calibration should use most of the budget, not a per-round budget"
    # a per-round calibration would have spent about 4x the budget
    per_round = plan_privacy(s.resolved(), n, planned_rounds=1)
    assert (
        epsilon_for([(per_round.noise_multiplier, per_round.sample_rate, one_round[2])] * 4, plan.delta) > 5
    )


def test_budget_exhausted_before_overspending(settings, tokenizer, frame, tiny_model, labels):
    data = tokenize(frame, tokenizer, labels, settings.max_length)
    s = settings.replace(target_epsilon=2.0, max_steps=2)
    plan = plan_privacy(s.resolved(), len(data), planned_rounds=1)
    model = tiny_model(s)
    first = train_local(model, data, s.resolved(), plan=plan)
    assert first.epsilon <= 2.0 + 1e-6
    with pytest.raises(BudgetExhaustedError, match="target 2.0"):
        train_local(model, data, s.resolved(), plan=plan, history=first.history)


def test_empty_poisson_batches_are_noisy_accounted_steps(settings, tokenizer, frame, tiny_model, labels):
    data = tokenize(frame.head(20), tokenizer, labels, settings.max_length)
    s = settings.replace(batch_size=1, max_steps=30, noise_multiplier=1.0)
    plan = plan_privacy(s.resolved(), len(data))
    model = tiny_model(s)
    result = train_local(model, data, s.resolved(), plan=plan)
    assert result.steps == 30
    assert result.empty_batches > 0  # P(no empty batch in 30 steps at q=0.05) < 1e-4
    assert sum(h[2] for h in result.history) == 30


def test_guard_fails_loudly_when_weights_do_not_move(
    settings, tokenizer, frame, monkeypatch, tiny_model, labels
):
    data = tokenize(frame, tokenizer, labels, settings.max_length)
    s = settings.replace(max_steps=1, target_epsilon=math.inf)
    model = tiny_model(s)
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, closure=None: None)
    with pytest.raises(FrozenTrainingError):
        train_local(model, data, s.resolved())


def test_non_private_training_learns_separable_data(settings, tokenizer, frame, tiny_model, labels):
    data = tokenize(frame, tokenizer, labels, settings.max_length)
    s = settings.replace(epochs=8, lr=2e-2, target_epsilon=math.inf)
    model = tiny_model(s)
    before = evaluate(model, data, labels)
    train_local(model, data, s.resolved())
    after = evaluate(model, data, labels)
    assert after["loss"] < before["loss"]
    assert after["accuracy"] > 0.9
    assert sum(c["support"] for c in after["per_class"].values()) == len(frame)


def test_dp_noise_is_not_derived_from_the_seed(settings, tokenizer, frame, tiny_model, labels):
    data = tokenize(frame, tokenizer, labels, settings.max_length)

    def adapter_after(s, plan):
        model = tiny_model(s)
        train_local(model, data, s.resolved(), plan=plan)
        return torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])

    private = settings.replace(max_steps=2, noise_multiplier=1.0)
    plan = plan_privacy(private.resolved(), len(data))
    assert not torch.equal(adapter_after(private, plan), adapter_after(private, plan))
    public = settings.replace(max_steps=2, target_epsilon=math.inf, lora_dropout=0.0)
    public_model_a, public_model_b = adapter_after(public, None), adapter_after(public, None)
    assert torch.allclose(public_model_a, public_model_b)  # non-private runs are reproducible


def test_ghost_clipping_trains_and_accounts(settings, tokenizer, frame, tiny_model, labels):
    data = tokenize(frame, tokenizer, labels, settings.max_length)
    s = settings.replace(max_steps=2, noise_multiplier=1.0, grad_sample_mode="ghost")
    model = tiny_model(s)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    result = train_local(model, data, s.resolved(), plan=plan_privacy(s.resolved(), len(data)))
    assert result.steps == 2 and sum(h[2] for h in result.history) == 2
    assert all(not torch.equal(v, dict(model.named_parameters())[n]) for n, v in before.items())


def test_private_training_refuses_data_dependent_class_weights(
    settings, tokenizer, frame, tiny_model, labels
):
    from fedllm.data import class_weights, loss_weights

    private = settings.replace(target_epsilon=8.0, max_steps=1)
    assert loss_weights(private, frame, labels) is None
    assert loss_weights(private.replace(target_epsilon=math.inf), frame, labels) is not None
    explicit = loss_weights(private.replace(class_weights="1,2,3"), frame, labels)
    assert explicit.tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="one positive weight per label"):
        loss_weights(private.replace(class_weights="1,2"), frame, labels)
    data = tokenize(frame, tokenizer, labels, settings.max_length)
    model = tiny_model(private)
    with pytest.raises(ValueError, match="leak"):
        train_local(
            model,
            data,
            private.resolved(),
            plan=plan_privacy(private.resolved(), len(data)),
            class_weight=class_weights(frame, labels),
        )


def test_empty_splits_fail_clearly_or_score_zero(settings, tokenizer, frame, tiny_model, labels):
    empty = tokenize(frame.head(0), tokenizer, labels, settings.max_length)
    model = tiny_model(settings)
    with pytest.raises(ValueError, match="empty"):
        train_local(model, empty, settings.replace(target_epsilon=math.inf).resolved())
    scores = evaluate(model, empty, labels)
    assert scores["num_examples"] == 0 and scores["accuracy"] == 0.0


def test_macro_f1_averages_over_the_classes_in_truth_or_prediction(labels):
    truth, predicted = np.array([0, 0, 1, 1]), np.array([0, 0, 0, 3])  # 3: no class of the model
    scores = classification_metrics(truth, predicted, labels, loss_sum=2.0)
    # class 0: F1 2*2/(2+3); class 1: 0; class 2 (never true, never predicted) is not averaged
    assert scores["macro_f1"] == pytest.approx((0.8 + 0.0) / 2)
    assert scores["accuracy"] == 0.5 and scores["loss"] == 0.5
    assert scores["per_class"]["negative"] == {"support": 2, "predicted": 3, "correct": 2}
    assert scores["per_class"]["positive"] == {"support": 0, "predicted": 0, "correct": 0}


def test_linear_schedule_decays_over_all_planned_rounds(settings):
    # round 2 of 3, 3 local steps: the factor continues where round 1 stopped
    second = lr_schedule(settings, 3, round_index=2, num_rounds=3)
    assert [second(step) for step in range(3)] == pytest.approx([6 / 9, 5 / 9, 4 / 9])
    assert lr_schedule(settings, 3, round_index=3, num_rounds=3)(3) == 0.0  # ends at 0
    assert lr_schedule(settings, 10)(5) == pytest.approx(0.5)  # one (centralized) training
    assert lr_schedule(settings.replace(schedule="constant"), 3, 2, 3)(2) == 1.0


def test_a_max_length_beyond_the_models_positions_is_refused_with_the_fix(settings, tiny_config, labels):
    short = tiny_config.to_dict() | {"max_position_embeddings": 64}
    with pytest.raises(ValueError, match=r"max-length = 65 .* \(64\); set max-length to at most 64"):
        build_model(settings.replace(max_length=65).resolved(), labels, bert_config=BertConfig(**short))
    assert build_model(settings.replace(max_length=64).resolved(), labels, bert_config=BertConfig(**short))


def test_pool_layers_beyond_the_model_or_without_mean_pooling_is_refused(settings, tiny_config, labels):
    layers = tiny_config.num_hidden_layers
    fix = rf"pool-layers = {layers + 1} .* set pool-layers to at most {layers}"
    with pytest.raises(ValueError, match=fix):
        build_model(settings.replace(pool_layers=layers + 1).resolved(), labels, bert_config=tiny_config)
    with pytest.raises(SettingsError, match="pool-layers"):
        settings.replace(pooling="cls", pool_layers=2)


def test_a_feature_centre_that_does_not_fit_or_was_not_sent_is_refused(settings, tiny_config, labels):
    model = build_model(settings.replace(pool_layers=2).resolved(), labels, bert_config=tiny_config)
    width = 2 * tiny_config.hidden_size
    for bad in ([0.0] * (width - 1), [float("nan")] * width):
        with pytest.raises(ValueError, match=rf"feature-center: expected {width} finite numbers"):
            set_feature_center(model, bad)
    assert feature_center(model) is None  # nothing half-set
    center = [0.25] * width
    sent = RoundConfig.read(train_config(labels, 3, "run", center), train=False)  # the wire, both ways
    centred = settings.replace(center_features="validation")
    assert sent.center_for(centred) == center and sent.center_for(settings) is None
    with pytest.raises(ValueError, match="center-features = 'validation' but the round config carries no"):
        RoundConfig.read(evaluate_config(labels, "run"), train=False).center_for(centred)
    with pytest.raises(SettingsError, match="center-features"):
        settings.replace(pooling="cls", center_features="validation")


def test_mean_pool_concatenates_the_layers_means_each_weighing_alike():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    low, top = torch.arange(24.0).reshape(2, 3, 4), 10 * torch.randn(2, 3, 4)
    raw = mean_pool([low, top], mask, normalize=False)
    assert torch.allclose(raw[0, :4], low[0, :2].mean(0)) and torch.allclose(raw[1, 4:], top[1, 0])
    unit = mean_pool([low, top], mask, normalize=True)
    assert torch.allclose(unit.norm(dim=1), torch.ones(2))  # unit features, as with one layer
    assert torch.allclose(unit[:, :4].norm(dim=1), torch.full((2,), 0.5**0.5))  # both halves alike
    assert torch.equal(mean_pool([top], mask, normalize=False), raw[:, 4:])  # k = 1: the last layer
