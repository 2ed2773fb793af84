"""Checkpoints: exact resume, refusal of foreign checkpoints, and the two files' checks."""

import hashlib
import itertools
import json

import pytest
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

import peft_core
from peft_core import BottleneckConfig, LoraConfig, PrefixTuningConfig, catalogue
from peft_core.checkpoint import (
    META_FILE,
    TENSORS_FILE,
    Checkpoint,
    CheckpointError,
    checkpoint_from_files,
    checkpoint_to_files,
    read_checkpoint,
    write_checkpoint,
)
from peft_core.data import Example, train_batches
from peft_core.samples import sample_rows
from peft_core.train import Callbacks, TrainConfig, train

# 10 rows in batches of 4: 3 batches an epoch, so resuming after step 4 starts mid-epoch 2.
CONFIG = TrainConfig(
    steps=7,
    batch_size=4,
    learning_rate=1e-2,
    max_length=48,
    warmup_steps=2,
    eval_every=2,
    eval_batches=1,
    checkpoint_every=4,
)
CHECKPOINT_STEP = 4
# What pickle.dumps({"a": 1}, protocol=2) gives: a file no loader of ours may ever accept.
PICKLE_BYTES = b"\x80\x02}q\x00X\x01\x00\x00\x00aq\x01K\x01s."

CASES = {
    "lora-llama": ("tiny-llama", "causal-lm", LoraConfig(r=4, dropout=0.1)),
    "bottleneck-llama": (
        "tiny-llama",
        "causal-lm",
        BottleneckConfig(bottleneck_dim=8, dropout=0.1),
    ),
    "prefix-llama": ("tiny-llama", "causal-lm", PrefixTuningConfig(4, projection_dim=16)),
    "lora-bert-cls": ("tiny-bert", "seq-cls", LoraConfig(r=4, dropout=0.1)),
}


class Recorder(Callbacks):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}
        self.checkpoints: list[Checkpoint] = []
        self.lines: list[str] = []

    def on_step(self, step, metrics):
        self.losses[step] = metrics["train_loss"]

    def on_checkpoint(self, checkpoint):
        self.checkpoints.append(checkpoint)

    def on_log(self, line):
        self.lines.append(line)


def adapted(model_cache, case: str):
    """A fresh base model with the case's adapter, initialised under seed 0."""
    key, task, method_config = CASES[case]
    model, tokenizer = catalogue.load_model(key, task, cache_dir=model_cache)
    torch.manual_seed(0)
    return peft_core.apply(model, method_config), tokenizer, task


def rows_for(task: str) -> tuple[list[dict], list[dict]]:
    name = "sample-sentiment" if task == "seq-cls" else "sample-instructions"
    train_rows, val_rows = sample_rows(name)
    return train_rows[:10], val_rows[:4]


def run(model, tokenizer, task, config=CONFIG, callbacks=None, resume=None):
    train_rows, val_rows = rows_for(task)
    return train(
        model, tokenizer, task=task, train_rows=train_rows, val_rows=val_rows,
        config=config, callbacks=callbacks, resume=resume,
    )  # fmt: skip


def without_elapsed(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics but the clocks (elapsed, train_s), which no two runs share."""
    return {name: value for name, value in metrics.items() if name not in ("elapsed", "train_s")}


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def written(model_cache):
    """One checkpoint from a short LoRA run, for the file-format tests."""
    model, tokenizer, task = adapted(model_cache, "lora-llama")
    recorder = Recorder()
    run(model, tokenizer, task, callbacks=recorder)
    return recorder.checkpoints[0]


# --- exact resume ----------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_a_resumed_run_ends_where_the_uninterrupted_one_does(model_cache, case):
    model, tokenizer, task = adapted(model_cache, case)
    whole = Recorder()
    whole_result = run(model, tokenizer, task, callbacks=whole)
    assert [c.step for c in whole.checkpoints] == [CHECKPOINT_STEP]  # never at the last step

    fresh, tokenizer, task = adapted(model_cache, case)
    checkpoint = checkpoint_from_files(checkpoint_to_files(whole.checkpoints[0]))
    resumed = Recorder()
    result = run(fresh, tokenizer, task, callbacks=resumed, resume=checkpoint)

    assert resumed.lines[0] == f"resumed from step {CHECKPOINT_STEP}"
    assert resumed.losses == {s: whole.losses[s] for s in range(CHECKPOINT_STEP + 1, 8)}
    expected = trainable(model)
    for name, param in trainable(fresh).items():
        assert torch.equal(param, expected[name]), name
    assert (result.steps_done, result.tokens) == (whole_result.steps_done, whole_result.tokens)
    assert without_elapsed(result.metrics) == without_elapsed(whole_result.metrics)


def test_resume_continues_the_rng_so_dropout_draws_the_same_masks(model_cache):
    """Without the RNG state, the resumed losses differ: dropout is on and matters."""
    model, tokenizer, task = adapted(model_cache, "lora-llama")
    whole = Recorder()
    run(model, tokenizer, task, callbacks=whole)
    checkpoint = whole.checkpoints[0]
    other_rng = Checkpoint(**{**vars(checkpoint), "cpu_rng_state": torch.get_rng_state()})
    fresh, tokenizer, task = adapted(model_cache, "lora-llama")
    resumed = Recorder()
    run(fresh, tokenizer, task, callbacks=resumed, resume=other_rng)
    assert resumed.losses[CHECKPOINT_STEP + 1] != whole.losses[CHECKPOINT_STEP + 1]


def test_the_batch_stream_resumes_after_skipped_batches():
    examples = [Example(input_ids=(i + 1,), labels=i % 2) for i in range(10)]

    def rows_of(skip: int, count: int = 6) -> list[list[int]]:
        batches = train_batches(examples, batch_size=4, pad_token_id=0, seed=3, skip=skip)
        return [batch["input_ids"][:, 0].tolist() for batch in itertools.islice(batches, count)]

    stream = rows_of(0, count=16)
    for skip in (2, 3, 4, 7, 10):  # 3 batches an epoch: mid-epoch, at a boundary, later epochs
        assert rows_of(skip) == stream[skip : skip + 6]


def test_a_checkpoint_of_another_config_or_model_is_refused(model_cache, written):
    model, tokenizer, task = adapted(model_cache, "lora-llama")
    changed = TrainConfig(**{**vars(CONFIG), "learning_rate": 2e-2})
    with pytest.raises(CheckpointError, match="another training config"):
        run(model, tokenizer, task, config=changed, resume=written)
    longer_eval = TrainConfig(**{**vars(CONFIG), "eval_every": 3, "checkpoint_every": 0})
    assert longer_eval.trajectory_digest() == CONFIG.trajectory_digest()

    model, tokenizer = catalogue.load_model("tiny-llama", "causal-lm", cache_dir=model_cache)
    peft_core.apply(model, LoraConfig(r=8))
    with pytest.raises(CheckpointError, match=r"parameter .*lora_A.* is \(4, 64\)"):
        run(model, tokenizer, task, resume=written)
    model, tokenizer = catalogue.load_model("tiny-llama", "causal-lm", cache_dir=model_cache)
    peft_core.apply(model, BottleneckConfig(bottleneck_dim=8))
    with pytest.raises(CheckpointError, match="other trainable parameters"):
        run(model, tokenizer, task, resume=written)


# --- the two files ----------------------------------------------------------------


def test_files_round_trip_exactly(written, tmp_path):
    write_checkpoint(tmp_path / "ckpt", written)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [META_FILE, TENSORS_FILE]
    back = read_checkpoint(tmp_path / "ckpt")
    assert back.step == written.step == CHECKPOINT_STEP
    assert back.param_groups == json.loads(json.dumps(written.param_groups))
    assert back.scheduler_state == written.scheduler_state
    assert (back.tokens, back.metrics) == (written.tokens, written.metrics)
    assert torch.equal(back.cpu_rng_state, written.cpu_rng_state)
    for name, tensor in written.params.items():
        assert torch.equal(back.params[name], tensor)
        for key, value in written.optimizer_state[name].items():
            assert torch.equal(back.optimizer_state[name][key], value)


def test_a_missing_file_is_refused(written, tmp_path):
    files = checkpoint_to_files(written)
    with pytest.raises(CheckpointError, match="missing \\['checkpoint.json'\\]"):
        checkpoint_from_files({TENSORS_FILE: files[TENSORS_FILE]})
    with pytest.raises(CheckpointError, match="missing"):
        read_checkpoint(tmp_path)


def test_a_pickle_is_refused_even_with_a_matching_sha(written):
    files = checkpoint_to_files(written)
    with pytest.raises(CheckpointError, match="does not match the sha256"):
        checkpoint_from_files({**files, TENSORS_FILE: PICKLE_BYTES})
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        checkpoint_from_files(_with_tensors_bytes(files, PICKLE_BYTES))


def test_a_truncated_or_altered_safetensors_is_refused(written):
    files = checkpoint_to_files(written)
    truncated = files[TENSORS_FILE][: len(files[TENSORS_FILE]) // 2]
    with pytest.raises(CheckpointError, match="does not match the sha256"):
        checkpoint_from_files({**files, TENSORS_FILE: truncated})
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        checkpoint_from_files(_with_tensors_bytes(files, truncated))
    flipped = bytearray(files[TENSORS_FILE])
    flipped[-1] ^= 1
    with pytest.raises(CheckpointError, match="does not match the sha256"):
        checkpoint_from_files({**files, TENSORS_FILE: bytes(flipped)})


@pytest.mark.parametrize("change", ["extra", "missing"])
def test_extra_or_missing_tensors_are_refused(written, change):
    files = checkpoint_to_files(written)
    tensors = load_tensors(files[TENSORS_FILE])
    if change == "extra":
        tensors["param/smuggled"] = torch.zeros(2)
    else:
        tensors.pop(next(key for key in tensors if key.startswith("adam/exp_avg/")))
    message = "unexpected param/smuggled" if change == "extra" else "missing adam/exp_avg/"
    with pytest.raises(CheckpointError, match=message):
        checkpoint_from_files(_with_tensors_bytes(files, save_tensors(tensors)))


def test_a_wrong_rng_state_is_refused(written):
    files = checkpoint_to_files(written)
    tensors = load_tensors(files[TENSORS_FILE])
    for forged in (tensors["rng/cpu"].to(torch.int32), tensors["rng/cpu"][:100]):
        forged_files = _with_tensors_bytes(files, save_tensors({**tensors, "rng/cpu": forged}))
        with pytest.raises(CheckpointError, match="RNG state"):
            checkpoint_from_files(forged_files)


@pytest.mark.parametrize(
    ("meta_bytes", "message"),
    [
        (b"\x80\x02not json", "is not JSON"),
        (b'{"step": NaN}', "is not JSON"),
        (b"[]", "is not a peft-lab-checkpoint file"),
    ],
)
def test_a_broken_json_is_refused(written, meta_bytes, message):
    files = checkpoint_to_files(written)
    with pytest.raises(CheckpointError, match=message):
        checkpoint_from_files({**files, META_FILE: meta_bytes})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"version": 2}, "version 2 is not supported"),
        ({"step": -1}, r"invalid fields: \['step'\]"),
        ({"params": ["a", "a"]}, "invalid fields"),
        ({"scheduler_state": {"last_epoch": 1}}, "invalid fields"),
        ({"param_groups": [{"lr": 1e-3, "foreach": "yes"}]}, "invalid fields"),
    ],
)
def test_invalid_meta_fields_are_refused(written, changes, message):
    files = checkpoint_to_files(written)
    meta = json.loads(files[META_FILE]) | changes
    with pytest.raises(CheckpointError, match=message):
        checkpoint_from_files({**files, META_FILE: json.dumps(meta).encode()})


def _with_tensors_bytes(files: dict[str, bytes], tensors_bytes: bytes) -> dict[str, bytes]:
    """`files` with other tensor bytes and a json that vouches for them (a forged pair)."""
    meta = json.loads(files[META_FILE])
    meta["tensors_sha256"] = hashlib.sha256(tensors_bytes).hexdigest()
    return {TENSORS_FILE: tensors_bytes, META_FILE: json.dumps(meta).encode()}
