"""What a model directory or Hub id may be: nothing outside the allowed roots is opened, a
model that needs its own code or has pickle weights only is refused, a Hub id resolves from
the HF cache when the Hub is off. Each refusal says why."""

import json
import shutil

import pytest

from peft_core.sources import (
    HubRef,
    ModelSourceError,
    hub_snapshot,
    is_hub_ref,
    local_directory,
    model_files,
    parse_hub_ref,
)
from tests.conftest import save_tiny_qwen2


@pytest.fixture
def root(tmp_path, model_root):
    """A fresh root with a copy of my-qwen (tests change files in it)."""
    allowed = tmp_path / "models"
    shutil.copytree(model_root / "my-qwen", allowed / "my-qwen")
    return allowed


def test_a_directory_under_the_root_resolves_by_absolute_or_relative_path(root):
    assert local_directory(str(root / "my-qwen"), [root]) == (root / "my-qwen").resolve()
    assert local_directory("my-qwen", [root]) == (root / "my-qwen").resolve()


@pytest.mark.parametrize("path", ["/etc", "../x", "my-qwen/../../x", "/", ""])
def test_paths_outside_the_roots_are_refused(root, path):
    with pytest.raises(ModelSourceError, match="outside the allowed model roots|directory"):
        local_directory(path, [root])


def test_a_symlink_out_of_the_root_is_refused(root, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(root / "my-qwen", elsewhere)
    (root / "linked").symlink_to(elsewhere)
    with pytest.raises(ModelSourceError, match=r"symlink to .*elsewhere, outside"):
        local_directory("linked", [root])


def test_a_file_symlinked_out_of_the_root_is_refused(root, tmp_path):
    secret = tmp_path / "secret.json"
    secret.write_text("{}")
    (root / "my-qwen" / "extra.json").symlink_to(secret)
    with pytest.raises(ModelSourceError, match=r"extra.json .* links to .*secret.json"):
        local_directory("my-qwen", [root])


def test_a_symlink_inside_the_root_is_fine(root):
    (root / "alias").symlink_to(root / "my-qwen")
    assert local_directory("alias", [root]) == (root / "my-qwen").resolve()


def test_no_roots_refuses_everything(root):
    with pytest.raises(ModelSourceError, match="PEFTLAB_MODEL_ROOTS is empty"):
        local_directory(str(root / "my-qwen"), [])


def test_model_files_reads_what_a_directory_holds(root):
    files = model_files(root / "my-qwen")
    assert files.model_type == "qwen2" and files.architectures == ("Qwen2ForCausalLM",)
    assert files.dtype == "float32" and files.weight_files == ("model.safetensors",)
    assert files.weight_bytes == (root / "my-qwen" / "model.safetensors").stat().st_size
    assert files.has_chat_template and len(files.content_sha256) == 64


def test_the_content_hash_changes_with_the_config_and_the_weights_layout(root):
    before = model_files(root / "my-qwen").content_sha256
    config = root / "my-qwen" / "config.json"
    config.write_text(config.read_text().replace('"rms_norm_eps"', '"rms_norm_eps_x"'))
    assert model_files(root / "my-qwen").content_sha256 != before


def test_a_model_that_needs_its_own_code_is_refused(root):
    config_path = root / "my-qwen" / "config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelSourceError, match="trust_remote_code stays off"):
        model_files(root / "my-qwen")


def test_pickle_only_weights_are_refused(root):
    directory = root / "my-qwen"
    (directory / "model.safetensors").rename(directory / "pytorch_model.bin")
    with pytest.raises(ModelSourceError, match=r"pickle weights only \(pytorch_model.bin\)"):
        model_files(directory)


def test_a_directory_without_config_or_tokenizer_is_refused(root):
    (root / "my-qwen" / "tokenizer.json").unlink()
    (root / "my-qwen" / "tokenizer_config.json").unlink()
    with pytest.raises(ModelSourceError, match="no tokenizer files"):
        model_files(root / "my-qwen")
    (root / "my-qwen" / "config.json").unlink()
    with pytest.raises(ModelSourceError, match="no config.json"):
        model_files(root / "my-qwen")


@pytest.mark.parametrize(
    ("text", "ref"),
    [
        ("Qwen/Qwen2.5-0.5B", HubRef("Qwen/Qwen2.5-0.5B", "main")),
        ("Qwen/Qwen2.5-0.5B@v1.0", HubRef("Qwen/Qwen2.5-0.5B", "v1.0")),
        ("org/name@" + "a" * 40, HubRef("org/name", "a" * 40)),
    ],
)
def test_hub_refs_parse(text, ref):
    assert is_hub_ref(text) and parse_hub_ref(text) == ref


@pytest.mark.parametrize("text", ["../etc/passwd", "org/../x", "org/name@../../x", "/abs/path"])
def test_what_is_not_a_hub_id_is_refused(text):
    with pytest.raises(ModelSourceError):
        parse_hub_ref(text)


def fill_hub_cache(cache, repo_id: str, source, commit: str = "c0ffee" * 6 + "abcd") -> str:
    """The HF cache layout huggingface_hub writes: blobs, snapshots/<commit> linking to them,
    refs/main naming the commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir()
    snapshot.mkdir(parents=True)
    for index, path in enumerate(sorted(source.iterdir())):
        blob = repo / "blobs" / f"blob{index}"
        shutil.copy(path, blob)
        (snapshot / path.name).symlink_to(blob)
    return commit


def test_a_hub_id_resolves_offline_from_the_cache_by_revision_or_commit(tmp_path, model_root):
    commit = fill_hub_cache(tmp_path / "hub", "acme/tiny-qwen", model_root / "my-qwen")
    snapshot = hub_snapshot(HubRef("acme/tiny-qwen", "main"), tmp_path / "hub", offline=True)
    assert snapshot.name == commit and (snapshot / "config.json").is_file()
    pinned = hub_snapshot(HubRef("acme/tiny-qwen", commit), tmp_path / "hub", offline=True)
    assert pinned == snapshot
    assert local_directory(str(snapshot), [tmp_path / "hub"]) == snapshot.resolve()


def test_a_hub_id_not_in_the_cache_is_refused_saying_how_to_put_it_there(tmp_path):
    with pytest.raises(ModelSourceError) as refused:
        hub_snapshot(HubRef("acme/absent", "main"), tmp_path / "hub", offline=True)
    message = str(refused.value)
    assert "not in the HF cache" in message and "HF_HUB_OFFLINE=1" in message
    assert "hf download acme/absent --revision main" in message
    assert "models--acme--absent" in message


def test_the_tiny_qwen_builder_makes_a_loadable_directory(tmp_path):
    save_tiny_qwen2(tmp_path / "plain", chat_template=False)
    assert not model_files(tmp_path / "plain").has_chat_template
