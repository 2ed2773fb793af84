"""Full fine-tuning in peft_core: every weight trains, nothing is injected, the model is
saved whole and loads without peft_core; switching it off or merging it is refused saying
why; its cost is measured against another copy of the base."""

import pytest
import torch

import peft_core
from peft_core import FullFineTuningConfig, LoraConfig
from peft_core.catalogue import load_model
from peft_core.checks import ConfigError
from peft_core.configs import refuse_quantized
from peft_core.pretrained import load_directory
from peft_core.profile import inference_latency, latency_flags, sample_generations

BATCH = {"input_ids": torch.tensor([[5, 6, 7, 8, 9, 10]]), "attention_mask": torch.ones(1, 6)}


def test_every_weight_trains_and_the_model_saves_whole(tmp_path):
    model, tokenizer = load_model("tiny-llama", "causal-lm")
    everything = sum(p.numel() for p in model.parameters())
    peft_core.apply(model, FullFineTuningConfig())
    assert peft_core.trainable_parameters(model) == everything
    assert peft_core.is_whole_model(model)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.01)
    peft_core.save_adapter(model, tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert not (tmp_path / "adapter_config.json").exists()
    loaded, _ = load_directory(tmp_path, "causal-lm")
    with torch.no_grad():
        assert torch.equal(loaded(**BATCH).logits, model(**BATCH).logits)


def test_switching_off_merging_and_a_quantised_base_are_refused():
    model, _ = load_model("tiny-llama", "causal-lm")
    peft_core.apply(model, FullFineTuningConfig())
    with pytest.raises(ValueError, match="no adapter to switch off"):
        with peft_core.disabled(model):
            pass
    with pytest.raises(ValueError, match="no adapter to merge"):
        peft_core.merge(model)
    with pytest.raises(ConfigError, match="packed integers"):
        refuse_quantized("full", "nf4")
    with pytest.raises(ConfigError, match="every module already"):
        FullFineTuningConfig(modules_to_save=("lm_head",))
    with pytest.raises(ValueError, match="fully fine-tuned model, not an adapter"):
        peft_core.load_adapter_files(model, {"config.json": b"{}", "model.safetensors": b""})


def test_its_cost_is_measured_against_another_copy_of_the_base():
    model, tokenizer = load_model("tiny-llama", "causal-lm")
    base, _ = load_model("tiny-llama", "causal-lm")
    peft_core.apply(model, FullFineTuningConfig())
    figures = inference_latency(model, BATCH, repeats=3, base=base)
    assert figures["same_architecture"] is True and "merged_ms" not in figures
    assert figures["base_ms"] > 0 and figures["adapter_ms"] > 0
    samples = sample_generations(
        model, tokenizer, [{"prompt": "Reverse: abc", "completion": "cba"}],
        max_new_tokens=3, base=base,
    )  # fmt: skip
    assert samples[0]["base"] == samples[0]["adapter"]  # untrained: the same weights

    adapted, _ = load_model("tiny-llama", "causal-lm")
    peft_core.apply(adapted, LoraConfig(r=2))
    figures = inference_latency(adapted, BATCH, repeats=3)
    assert "same_architecture" not in figures and "merged_ms" in figures


def test_a_same_architecture_ratio_off_one_is_flagged_either_way():
    slower = {"same_architecture": True, "overhead": 1.3, "overhead_spread": 0.05}
    faster = {"same_architecture": True, "overhead": 0.7, "overhead_spread": 0.05}
    assert "fully fine-tuned model measured 1.30×" in latency_flags(slower)[0]
    assert "fully fine-tuned model measured 0.70×" in latency_flags(faster)[0]
    assert (
        latency_flags({"same_architecture": True, "overhead": 1.01, "overhead_spread": 0.0}) == []
    )
    adapter = latency_flags({"overhead": 0.7, "overhead_spread": 0.05})
    assert "adapter measured faster" in adapter[0]
    assert latency_flags({"overhead": 1.3, "overhead_spread": 0.05}) == []  # an adapter costs
