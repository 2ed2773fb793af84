"""Packing (TrainConfig.packing, --packing): whole causal-LM examples end to end in rows of
max_length tokens, each example attending only to itself; refused, with the reason, where
the task, the method or the model's attention cannot keep the examples apart."""

import itertools
import json
import random

import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import peft_core
from peft_core import LoraConfig, catalogue
from peft_core.checkpoint import CheckpointError
from peft_core.cli import main
from peft_core.configs import (
    BottleneckConfig,
    ConfigError,
    IA3Config,
    MAMConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    refuse_packing,
)
from peft_core.data import (
    IGNORE_INDEX,
    Example,
    collate,
    collate_packed,
    pack_examples,
    tokenize_rows,
    train_batches,
)
from peft_core.packing import model_batch, no_kv_cache, refuse_unpackable
from peft_core.samples import sample_rows
from peft_core.tiny import build_tiny
from peft_core.train import TrainConfig, evaluate, train
from tests.peft_core.test_checkpoint import Recorder

SHORT = {"steps": 3, "batch_size": 2, "learning_rate": 1e-3, "max_length": 64, "eval_batches": 2}


@pytest.fixture(scope="module")
def rows():
    train_rows, val_rows = sample_rows("sample-instructions")
    return train_rows[:48], val_rows[:8]


def _examples(lengths, seed=0) -> list[Example]:
    """Causal-LM examples of random ids in 3..511: every other one has a prompt of 2
    unsupervised tokens, the others are plain text (every token supervised)."""
    generator = random.Random(seed)
    examples = []
    for index, length in enumerate(lengths):
        ids = tuple(generator.randrange(3, 512) for _ in range(length))
        prompt = min(2 * (index % 2), length - 1)
        examples.append(Example(ids, (IGNORE_INDEX,) * prompt + ids[prompt:]))
    return examples


def _lora(model_cache):
    model, tokenizer = catalogue.load_model("tiny-llama", "causal-lm", cache_dir=model_cache)
    torch.manual_seed(0)
    method = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    return peft_core.apply(model, method), tokenizer


def _train(model, tokenizer, rows, callbacks=None, resume=None, **config):
    train_rows, val_rows = rows
    return train(
        model, tokenizer, task="causal-lm", train_rows=train_rows, val_rows=val_rows,
        config=TrainConfig(**(SHORT | config)), callbacks=callbacks, resume=resume,
    )  # fmt: skip


def _adapter(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# --- rows and batches ------------------------------------------------------------


def test_rows_hold_whole_examples_in_order_up_to_the_length():
    lengths = [5, 9, 3, 12, 1, 7, 7, 2, 16, 4]
    examples = _examples(lengths)
    rows = pack_examples(examples, 16)
    assert [e for row in rows for e in row] == examples  # each once, in order, never split
    assert [sum(len(e.input_ids) for e in row) for row in rows] == [14, 16, 16, 16, 4]
    with pytest.raises(ValueError, match="an example of 16 tokens does not fit a row of 12"):
        pack_examples(examples, 12)
    with pytest.raises(ValueError, match="packing is for causal LM"):
        pack_examples([Example((5, 6), 1)], 12)


def test_a_packed_batch_restarts_positions_and_never_predicts_across_examples():
    a, b, c = (
        Example((10, 11, 12), (-100, 11, 12)),
        Example((20, 21), (20, 21)),
        Example((30,), (30,)),
    )
    batch = collate_packed([(a, b), (c,)], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[10, 11, 12, 20, 21], [30, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 0, 1, 2, 3]]
    assert batch["labels"].tolist() == [[-100, 11, 12, -100, 21], [-100, -100, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert set(model_batch(batch)) == {"input_ids", "labels", "position_ids"}
    assert model_batch(collate([a], pad_token_id=0)).keys() == {
        "input_ids",
        "attention_mask",
        "labels",
    }


def test_the_packed_stream_resumes_after_skipped_batches_across_epochs():
    examples = _examples([3, 8, 5, 2, 7, 6, 4, 9, 1, 5, 3])

    def stream(skip: int, count: int) -> list[list[int]]:
        batches = train_batches(
            examples, batch_size=2, pad_token_id=0, seed=5, skip=skip, pack_length=12
        )
        return [b["input_ids"].flatten().tolist() for b in itertools.islice(batches, count)]

    whole = stream(0, 12)
    epoch = len(pack_examples(examples, 12))
    assert 2 <= (epoch + 1) // 2 < 6  # a few batches an epoch, so skips cross epochs
    for skip in (1, 2, 3, 5, 7):
        assert stream(skip, 5) == whole[skip : skip + 5]
    # every epoch packs every example once, in a new order
    first = [e for b in whole[: (epoch + 1) // 2] for e in b if e]
    assert sorted(first) == sorted(t for e in examples for t in e.input_ids)


# --- exactness on the model ------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_each_packed_example_gets_its_own_logits_and_loss(kind, attn):
    model = build_tiny(kind, "causal-lm")
    model.set_attn_implementation(attn)
    model.train()  # as when training: transformers builds a KV cache here unless told not to
    examples = _examples([6, 11, 4, 9, 3, 7], seed=1)
    rows = pack_examples(examples, 24)
    assert any(len(row) > 1 for row in rows)
    packed = collate_packed(rows, pad_token_id=0)
    with torch.no_grad(), no_kv_cache(model):
        out = model(**model_batch(packed))
    alone_sum, supervised = 0.0, 0
    at = {
        id(e): (r, sum(len(x.input_ids) for x in row[: row.index(e)]))
        for r, row in enumerate(rows)
        for e in row
    }
    for example in examples:
        single = collate([example], pad_token_id=0)
        with torch.no_grad():
            alone = model(input_ids=single["input_ids"], labels=single["labels"])
        row, start = at[id(example)]
        length = len(example.input_ids)
        torch.testing.assert_close(
            out.logits[row, start : start + length], alone.logits[0], rtol=1e-5, atol=1e-5
        )
        count = sum(label != IGNORE_INDEX for label in example.labels[1:])
        alone_sum, supervised = alone_sum + alone.loss.item() * count, supervised + count
    # the model's own loss: a mean over the packed batch's supervised tokens, the same ones
    assert int((packed["labels"][:, 1:] != IGNORE_INDEX).sum()) == supervised
    assert out.loss.item() == pytest.approx(alone_sum / supervised, rel=1e-5)


def test_without_the_position_ids_the_examples_would_see_each_other():
    """The check above can fail: the same packed rows with a 2-D mask instead cross examples."""
    model = build_tiny("llama", "causal-lm")
    rows = pack_examples(_examples([6, 11], seed=1), 24)
    packed = collate_packed(rows, pad_token_id=0)
    single = collate([rows[0][1]], pad_token_id=0)
    with torch.no_grad(), no_kv_cache(model):
        crossed = model(input_ids=packed["input_ids"], attention_mask=packed["attention_mask"])
        alone = model(input_ids=single["input_ids"])
    assert (crossed.logits[0, 6:17] - alone.logits[0]).abs().max() > 1e-2


# --- training ----------------------------------------------------------------------


def test_packed_training_counts_true_tokens_and_evaluates_unpacked(model_cache, rows):
    """One step over the whole epoch (a batch never straddles two): its loss is the
    unpacked mean over the same supervised tokens, the tokens counted are exactly the
    examples' tokens, and the eval loss is the unpacked one."""
    model, tokenizer = _lora(model_cache)
    examples = tokenize_rows(rows[0], tokenizer, task="causal-lm", max_length=128)
    assert len(pack_examples(examples, 128)) < len(examples) / 2  # several examples a row
    config = {"steps": 1, "batch_size": len(examples), "max_length": 128}
    unpacked_config = TrainConfig(**(SHORT | config | {"eval_batches": 1}))
    before = evaluate(model, tokenizer, task="causal-lm", rows=rows[0], config=unpacked_config)
    result = _train(model, tokenizer, rows, packing=True, **config)
    assert result.metrics["train_loss"] == pytest.approx(before["eval_loss"], rel=1e-5)
    assert result.tokens == sum(len(example.input_ids) for example in examples)
    unpacked = evaluate(model, tokenizer, task="causal-lm", rows=rows[1], config=unpacked_config)
    assert result.metrics["eval_loss"] == unpacked["eval_loss"]
    assert model.config.use_cache is True  # the KV cache is off only while training packed


def test_the_same_seed_trains_the_same_adapter_bytes_and_resumes_exactly(model_cache, rows):
    from peft_core.checkpoint import checkpoint_from_files, checkpoint_to_files

    results, recorders = [], []
    for _ in range(2):
        model, tokenizer = _lora(model_cache)
        recorder = Recorder()
        _train(model, tokenizer, rows, recorder, steps=6, checkpoint_every=3, packing=True, seed=4)
        results.append(_adapter(model))
        recorders.append(recorder)
    for name, value in results[0].items():
        assert torch.equal(results[1][name], value), name

    fresh, tokenizer = _lora(model_cache)
    checkpoint = checkpoint_from_files(checkpoint_to_files(recorders[0].checkpoints[0]))
    _train(
        fresh, tokenizer, rows, steps=6, checkpoint_every=3, packing=True, seed=4, resume=checkpoint
    )
    for name, value in _adapter(fresh).items():
        assert torch.equal(value, results[0][name]), name
    unpacked, tokenizer = _lora(model_cache)
    with pytest.raises(CheckpointError, match="another training config"):
        _train(unpacked, tokenizer, rows, steps=6, checkpoint_every=3, seed=4, resume=checkpoint)


def test_packing_changes_the_trajectory_digest():
    assert TrainConfig(packing=True).trajectory_digest() != TrainConfig().trajectory_digest()


# --- refusals ----------------------------------------------------------------------


def test_the_judge_refuses_classification_and_methods_before_a_row():
    refuse_packing(False, method="prompt", task="seq-cls")  # packing off: nothing to judge
    refuse_packing(True, method="lora", task="causal-lm")
    with pytest.raises(ConfigError, match="packing is for causal LM training") as error:
        refuse_packing(True, task="seq-cls")
    assert error.value.field == "packing"
    with pytest.raises(ConfigError, match="prompt cannot train packed: its virtual tokens"):
        refuse_packing(True, method="prompt")
    for method in ("prefix", "mam"):
        with pytest.raises(ConfigError, match=f"{method} cannot train packed: .*KV cache"):
            refuse_packing(True, method=method)


@pytest.mark.parametrize(
    "method",
    [PromptTuningConfig(num_virtual_tokens=4), PrefixTuningConfig(4),
     MAMConfig(num_virtual_tokens=4)],
    ids=["prompt", "prefix", "mam"],
)  # fmt: skip
def test_train_refuses_a_method_before_a_row(model_cache, rows, method):
    model, tokenizer = catalogue.load_model("tiny-llama", "causal-lm", cache_dir=model_cache)
    peft_core.apply(model, method)
    before = _adapter(model)
    with pytest.raises(ConfigError, match="cannot train packed"):
        _train(model, tokenizer, rows, packing=True)
    assert all(torch.equal(p, before[n]) for n, p in _adapter(model).items())  # nothing trained


def test_train_refuses_classification(model_cache):
    model, tokenizer = catalogue.load_model("tiny-bert", "seq-cls", cache_dir=model_cache)
    peft_core.apply(model, LoraConfig(r=4))
    train_rows, val_rows = sample_rows("sample-sentiment")
    with pytest.raises(ConfigError, match="packing is for causal LM training"):
        train(
            model, tokenizer, task="seq-cls", train_rows=train_rows[:8], val_rows=val_rows[:4],
            config=TrainConfig(**(SHORT | {"packing": True})),
        )  # fmt: skip


def _tiny(config: transformers.PretrainedConfig):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


ALIBI_AND_OTHERS = {
    "opt": lambda: build_tiny("opt", "causal-lm"),
    "bloom": lambda: _tiny(transformers.BloomConfig(
        vocab_size=512, hidden_size=64, n_layer=2, n_head=4, pad_token_id=0)),
    "mpt": lambda: _tiny(transformers.MptConfig(
        vocab_size=512, d_model=64, n_layers=2, n_heads=4, max_seq_len=128)),
}  # fmt: skip


@pytest.mark.parametrize("kind", ALIBI_AND_OTHERS)
def test_models_whose_attention_cannot_keep_examples_apart_are_refused(kind):
    """OPT builds its mask without the position ids; Bloom and MPT (ALiBi) build theirs and
    their biases from the attention mask: the probe sees an example's logits move."""
    model = ALIBI_AND_OTHERS[kind]()
    with pytest.raises(ConfigError, match="cannot train packed: its attention does not keep"):
        refuse_unpackable(model, task="causal-lm")


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2", "gemma2", "falcon-alibi"])
def test_models_that_keep_examples_apart_are_accepted(kind):
    """Falcon's ALiBi is relative and its mask comes from transformers' utilities: it packs."""
    if kind == "falcon-alibi":
        model = _tiny(transformers.FalconConfig(
            vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            alibi=True, pad_token_id=0))  # fmt: skip
    else:
        model = build_tiny(kind, "causal-lm")
    model.train()
    refuse_unpackable(model, task="causal-lm")
    assert model.training and model.config.use_cache is not False


@pytest.mark.parametrize(
    "method", [IA3Config(), BottleneckConfig(bottleneck_dim=8)], ids=["ia3", "bottleneck"]
)
def test_methods_that_adapt_layers_train_packed(model_cache, rows, method):
    model, tokenizer = catalogue.load_model("tiny-llama", "causal-lm", cache_dir=model_cache)
    torch.manual_seed(0)
    peft_core.apply(model, method)
    before = _adapter(model)
    _train(model, tokenizer, rows, packing=True, learning_rate=1e-2)
    assert any(not torch.equal(p, before[n]) for n, p in _adapter(model).items())


# --- CLI ----------------------------------------------------------------------------

CLI = ["train", "--model", "tiny-llama", "--dataset", "sample-instructions", "--method", "lora"]
CLI += ["--steps", "3", "--batch-size", "2", "--max-length", "64", "--seed", "2", "--packing"]


def test_the_cli_trains_packed_reproducibly(tmp_path, model_cache):
    """Twice packed: the same bytes; unpacked: another adapter, from fewer tokens a step."""
    runs = {"first": CLI, "second": CLI, "unpacked": CLI[:-1]}
    for name, args in runs.items():
        out = tmp_path / name
        assert main([*args, "--output", str(out), "--cache-dir", str(model_cache)]) == 0
    first, second, unpacked = (tmp_path / name / "adapter_model.safetensors" for name in runs)
    assert first.read_bytes() == second.read_bytes()
    assert first.read_bytes() != unpacked.read_bytes()
    assert max(float(t.abs().max()) for k, t in load_file(first).items() if "lora_B" in k) > 0
    tokens = {name: _last_tokens(tmp_path / name / "metrics.jsonl") for name in runs}
    assert tokens["unpacked"] < tokens["first"] <= 3 * 2 * 64  # 3 steps of 2 rows of <= 64


def _last_tokens(path) -> float:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [line for line in lines if "train_loss" in line][-1]["tokens"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--method", "prompt"], "prompt cannot train packed"),
        (["--dataset", "sample-sentiment", "--model", "tiny-bert"], "packing is for causal LM"),
    ],
)
def test_the_cli_refuses_packing_where_it_cannot_work(
    tmp_path, model_cache, capsys, change, message
):
    args = [*CLI, *change, "--output", str(tmp_path), "--cache-dir", str(model_cache)]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "adapter_model.safetensors").exists()


def test_the_cli_refuses_a_model_whose_attention_cannot_pack_and_trains_one_that_can(
    tmp_path, model_root, capsys
):
    """A team's own OPT directory: the probe refuses it, as a usage error, before any step;
    the tiny Qwen2 directory trains packed."""
    from peft_core.catalogue import build_byte_tokenizer

    opt = tmp_path / "my-opt"
    build_tiny("opt", "causal-lm").save_pretrained(opt, safe_serialization=True)
    build_byte_tokenizer().save_pretrained(opt)
    args = ["--dataset", "sample-instructions", "--steps", "2", "--batch-size", "2", "--packing"]
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--model", str(opt), *args, "--output", str(tmp_path / "opt-out")])
    assert exit_.value.code == 2
    assert "OPTForCausalLM cannot train packed: its attention" in capsys.readouterr().err
    assert not (tmp_path / "opt-out" / "adapter_model.safetensors").exists()
    qwen_out = tmp_path / "qwen-out"
    assert (
        main(["train", "--model", str(model_root / "my-qwen"), *args, "--output", str(qwen_out)])
        == 0
    )
    assert (qwen_out / "adapter_model.safetensors").exists()
