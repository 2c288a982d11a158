"""Bad configuration fails at construction (or, for what needs the model, at SpectralMonitor construction /
train begin) with a ValueError that names the option and what is allowed."""

from __future__ import annotations

import pytest
from helpers import RandomTokens, tiny_bert
from peft import LoraConfig, get_peft_model
from training import make_trainer

from lora_spectral_callback import LoRASpectralCallback, SpectralConfig, SpectralMonitor
from lora_spectral_callback.alerts import IntruderThreshold


def lora_bert():
    config = LoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS")
    return get_peft_model(tiny_bert(hidden=32, layers=2), config)


@pytest.mark.parametrize("value", [0, -5, 2.0, True, None])
def test_every_n_steps(value):
    with pytest.raises(ValueError, match=r"every_n_steps=.* is invalid: must be an integer >= 1"):
        LoRASpectralCallback(every_n_steps=value)


@pytest.mark.parametrize("value", [0, -1, 1.5, None])
def test_top_k(value):
    with pytest.raises(ValueError, match=r"top_k=.* is invalid: must be an integer >= 1"):
        LoRASpectralCallback(top_k=value)
    with pytest.raises(ValueError, match=r"top_k="):
        SpectralConfig(top_k=value)


@pytest.mark.parametrize("value", [0, 1, 1.5, -0.1, float("nan"), [], [0.5, 1.0], "0.5", None, True])
def test_epsilon_outside_unit_interval(value):
    with pytest.raises(
        ValueError, match=r"epsilon=.* is invalid: must be a number or list of numbers strictly between 0 and 1"
    ):
        LoRASpectralCallback(epsilon=value)


def test_epsilon_valid_forms():
    assert SpectralConfig(epsilon=0.3).epsilons == (0.3,)
    assert SpectralConfig(epsilon=[0.5, 0.9]).epsilons == (0.5, 0.9)
    assert SpectralConfig(epsilon=(0.1,)).epsilons == (0.1,)


@pytest.mark.parametrize("name", ["max_intruders", "max_intruders_per_layer"])
@pytest.mark.parametrize("value", [-1, 1.5, "3"])
def test_negative_or_non_integer_limits(name, value):
    with pytest.raises(ValueError, match=rf"{name}=.* is invalid: must be None or an integer >= 0"):
        LoRASpectralCallback(**{name: value})
    with pytest.raises(ValueError, match=rf"{name}="):
        IntruderThreshold(**{name: value})


@pytest.mark.parametrize("value", [0, -2, 1.0])
def test_patience(value):
    with pytest.raises(ValueError, match=r"patience=.* is invalid: must be an integer >= 1"):
        LoRASpectralCallback(max_intruders=0, patience=value)


def test_on_alert_must_be_callable():
    with pytest.raises(ValueError, match=r"on_alert=.* is invalid: must be a callable"):
        LoRASpectralCallback(on_alert="print")


@pytest.mark.parametrize(
    "options, pattern",
    [
        ({"compute_dtype": "float16"}, r"compute_dtype='float16' is invalid: must be one of \('float32', 'float64'\)"),
        ({"basis_dtype": "int8"}, r"basis_dtype='int8' is invalid: must be one of"),
        ({"exact_below": -1}, r"exact_below=-1 is invalid: must be an integer >= 0"),
        ({"oversample": None}, r"oversample=None is invalid: must be an integer >= 0"),
        ({"tol": 0}, r"tol=0 is invalid: must be a number strictly between 0 and 1"),
        ({"max_iter": 0}, r"max_iter=0 is invalid: must be an integer >= 1"),
        ({"include": "(unclosed"}, r"include='\(unclosed' is not a valid regular expression"),
        ({"exclude": "[z-a]"}, r"exclude='\[z-a\]' is not a valid regular expression"),
        ({"snapshot": "lazy"}, r"snapshot='lazy' is invalid: must be one of \('auto', 'background', 'blocking'\)"),
        ({"background_after": -1}, r"background_after=-1 is invalid: must be a number of seconds >= 0"),
    ],
)
def test_solver_options(options, pattern):
    with pytest.raises(ValueError, match=pattern):
        LoRASpectralCallback(**options)


def test_split_across_ranks_needs_synchronous_measurement():
    with pytest.raises(ValueError, match=r"split_across_ranks=True is invalid with asynchronous=True"):
        LoRASpectralCallback(asynchronous=True, split_across_ranks=True)
    assert LoRASpectralCallback(asynchronous=True).config.split_across_ranks is False
    assert LoRASpectralCallback().config.split_across_ranks is True


def test_unknown_option_is_a_type_error():
    with pytest.raises(TypeError, match="every_n_step"):
        LoRASpectralCallback(every_n_step=10)


def test_log_dir_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match=r"log_dir='.*a_file/spectral' cannot be created"):
        LoRASpectralCallback(log_dir=str(blocker / "spectral"))


def test_default_log_dir_that_cannot_be_created_fails_at_train_begin(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(blocker))
    trainer = make_trainer(tmp_path / "out", lora_bert(), [LoRASpectralCallback()], 1, data=RandomTokens(8))
    with pytest.raises(ValueError, match=r"log_dir='.*a_file/spectral' cannot be created"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_filters_matching_nothing_list_the_layers():
    model = lora_bert()
    with pytest.raises(ValueError) as info:
        SpectralMonitor(model, include=r"\.key$")
    message = str(info.value)
    assert "include='\\\\.key$' exclude=None match none of the model's PEFT adapter layers" in message
    assert "bert.encoder.layer.0.attention.self.query" in message and "(4 in all)" not in message
    with pytest.raises(ValueError, match=r"exclude='.' match none .* must select at least one of: bert\.encoder"):
        SpectralMonitor(model, exclude=".")


def test_long_layer_list_is_abbreviated():
    model = get_peft_model(tiny_bert(hidden=32, layers=4), LoraConfig(r=2, target_modules=["query", "value"]))
    with pytest.raises(ValueError, match=r"\.\.\. \(8 in all\)"):
        SpectralMonitor(model, include="nothing")


def test_filters_matching_nothing_fail_at_train_begin(tmp_path):
    callback = LoRASpectralCallback(include="no_such_layer", log_dir=str(tmp_path / "tb"))
    trainer = make_trainer(tmp_path, lora_bert(), [callback], 2, data=RandomTokens(8))
    with pytest.raises(ValueError, match=r"include='no_such_layer' .* match none of the model's PEFT adapter layers"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_model_without_lora_layers():
    with pytest.raises(ValueError, match=r"No PEFT adapter layer to monitor: wrap the model with peft\.get_peft_model"):
        SpectralMonitor(tiny_bert(hidden=32))
    with pytest.raises(ValueError, match=r"No PEFT adapter layer to monitor"):
        SpectralMonitor(tiny_bert(hidden=32), include="query", mode="lora")
