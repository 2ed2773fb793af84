"""What PeftLabCallback reads from a model: the method under PEFT Lab's name, its config as
JSON, the base model's name and revision, the parameter counts. test_tracking_live.py runs
the callback inside real Trainers."""

import json

import peft
import pytest
from transformers import GPT2Config, GPT2LMHeadModel

import peft_core
from peft_core.tiny import build_tiny
from peftlab import tracking
from peftlab.integrations import (
    PeftLabCallback,
    base_model_name,
    describe_adapter,
    parameter_counts,
    plain,
)
from webapp.experiments.models import Artifact, Run


def _gpt2():
    return GPT2LMHeadModel(
        GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    )


@pytest.mark.parametrize(
    ("config", "method"),
    [
        (peft.LoraConfig(r=4, target_modules=["c_attn"]), "lora"),
        (peft.LoraConfig(r=4, target_modules=["c_attn"], use_dora=True), "dora"),
        (
            peft.IA3Config(
                target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"]
            ),
            "ia3",
        ),
        (peft.PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"), "prefix"),
        (peft.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"), "prompt"),
        (peft.VeraConfig(r=4, target_modules=["c_fc"]), "vera"),  # not one of ours
    ],
    ids=lambda value: value if isinstance(value, str) else type(value).__name__,
)
def test_hf_peft_adapters_are_named_as_peft_lab_names_them(config, method):
    model = peft.get_peft_model(_gpt2(), config)
    name, method_config = describe_adapter(model)
    assert name == method
    assert json.loads(json.dumps(method_config)) == method_config  # plain JSON
    assert method_config["peft_type"] == config.peft_type.value


def test_a_peft_core_adapter_and_no_adapter():
    model = peft_core.apply(build_tiny("llama"), peft_core.DoraConfig(r=4))
    name, method_config = describe_adapter(model)
    assert name == "dora" and method_config["r"] == 4
    assert json.loads(json.dumps(method_config)) == method_config
    assert describe_adapter(_gpt2()) == ("full", {})


def test_the_base_model_is_its_name_at_its_revision():
    model = _gpt2()
    assert base_model_name(model) == "gpt2"  # built from a config: its type
    model.config._name_or_path = "openai-community/gpt2"
    model.config._commit_hash = "607a30d783dfa663caf39e06633721c8d4cfcd7e"
    assert (
        base_model_name(model) == "openai-community/gpt2@607a30d783dfa663caf39e06633721c8d4cfcd7e"
    )
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["c_attn"]))
    assert base_model_name(wrapped) == base_model_name(model)


def test_parameter_counts_are_those_the_trainer_trains():
    model = peft.get_peft_model(_gpt2(), peft.LoraConfig(r=4, target_modules=["c_attn"]))
    counts = parameter_counts(model)
    # LoRA on c_attn (32 → 96) in 2 layers: r·(d_in + d_out) each.
    assert counts["trainable_params"] == 2 * 4 * (32 + 96)
    assert counts["total_params"] == sum(p.numel() for p in model.parameters())


def test_configs_become_plain_json():
    from enum import Enum

    class Kind(Enum):
        A = "a"

    value = {"modules": {"q", "k"}, "kind": Kind.A, "nan": float("nan"), "t": (1, 2), 3: object}
    assert plain(value) == {"modules": ["k", "q"], "kind": "a", "nan": None, "t": [1, 2],
                            "3": str(object)}  # fmt: skip


@pytest.mark.django_db(transaction=True)
def test_an_adapter_the_server_refuses_is_kept_as_the_runs_files(switch, settings):
    settings.ADAPTER_MAX_BYTES = 1024  # the server refuses this adapter (400, too large)
    model = peft.get_peft_model(_gpt2(), peft.LoraConfig(r=4, target_modules=["c_attn"]))
    callback = PeftLabCallback(project="Default", name="refused")
    callback.run = tracking.init(
        project="Default", name="refused", base_model="gpt2", method="lora"
    )
    callback._upload_adapter(model)
    callback.run.finish()
    stored = Artifact.objects.filter(run_id=callback.run.id)
    assert sorted(stored.values_list("kind", "name")) == [
        ("file", "adapter_config.json"),
        ("file", "adapter_model.safetensors"),
    ]
    assert Run.objects.get(id=callback.run.id).profile["adapter_bytes"] == sum(
        a.size for a in stored
    )
