"""describe(): a meta-device model's Linear-like modules, blocks and each method's default
footprint, exact against applying the method to a real tiny model."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import peft_core
from peft_core.inspection import describe
from peft_core.methods import METHOD_LIST
from peft_core.tiny import tiny_config
from tests.peft_core.families import fresh


def meta_model(kind: str, task: str) -> torch.nn.Module:
    config = tiny_config(kind)
    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    if task == "seq-cls":
        config.num_labels = 2
    with torch.device("meta"):
        return auto.from_config(config)


def real_trainable(kind: str, task: str, config) -> int:
    """apply's trainable parameters on a real tiny model, less the classification head's."""
    torch.manual_seed(0)
    model = peft_core.apply(fresh(kind, task), config)
    return sum(
        p.numel()
        for n, p in model.named_parameters()
        if p.requires_grad and "trained_module" not in n
    )


@pytest.fixture(scope="module")
def qwen2() -> dict:
    return describe(meta_model("qwen2", "causal-lm"))


@pytest.fixture(scope="module")
def bert() -> dict:
    return describe(meta_model("bert", "seq-cls"))


def test_it_is_json(qwen2, bert):
    assert json.loads(json.dumps(qwen2)) == qwen2
    assert json.loads(json.dumps(bert)) == bert


def test_qwen2_blocks_linears_and_lora(qwen2):
    assert (qwen2["model_type"], qwen2["blocks"], qwen2["layers"]) == ("qwen2", "model.layers", 2)
    assert len(qwen2["linears"]) == 2 * 7 + 1
    assert qwen2["linears"][-1] == {"path": "lm_head", "in": 64, "out": 512, "head": True}
    assert {"path": "model.layers.1.self_attn.k_proj", "in": 64, "out": 32, "head": False} in (
        qwen2["linears"]
    )
    lora = qwen2["methods"]["lora"]
    expected = [f"model.layers.{i}.self_attn.{n}_proj" for i in range(2) for n in ("q", "v")]
    assert (lora["modules"], lora["count"]) == (expected, 4)
    assert lora["trainable"] == 2 * 8 * ((64 + 64) + (64 + 32))  # r = 8: r·(d_in + d_out)
    assert qwen2["places"]["kv_heads"] == 2 and qwen2["places"]["prefix_refused"] == ""


def test_bert_marks_its_head_and_leaves_it_out_of_the_count(bert):
    assert bert["layers"] == 2 and bert["blocks"] == "bert.encoder.layer"
    heads = [row["path"] for row in bert["linears"] if row["head"]]
    assert heads == ["classifier"]
    lora = bert["methods"]["lora"]
    assert [p.rsplit(".", 1)[-1] for p in lora["modules"]] == ["query", "value"] * 2
    assert lora["trainable"] == 2 * 2 * 8 * (64 + 64)


@pytest.mark.parametrize(("kind", "task"), [("qwen2", "causal-lm"), ("bert", "seq-cls")])
def test_every_method_counts_what_apply_trains_on_a_real_model(kind, task, qwen2, bert):
    described = {"qwen2": qwen2, "bert": bert}[kind]
    for entry in METHOD_LIST:
        footprint = described["methods"][entry.key]
        assert footprint["trainable"] == real_trainable(kind, task, entry.config_cls()), entry.key
        assert footprint["count"] == len(footprint["modules"]) > 0


def test_a_refused_method_says_why():
    methods = describe(meta_model("deberta-v2", "seq-cls"))["methods"]
    for key in ("prefix", "mam"):
        assert set(methods[key]) == {"refused"}
        assert "never calls cache.update" in methods[key]["refused"]
    assert methods["lora"]["count"] == 4
