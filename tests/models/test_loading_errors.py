"""Bad model folders and settings fail with errors that name what is wrong."""

import json
import shutil

import pytest

from dms_runtime.models import load_model


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_path: folder .* does not exist"):
        load_model(tmp_path / "nope")


def test_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json' is missing"):
        load_model(tmp_path)


def test_missing_weights(tiny_factory, tmp_path):
    folder, _ = tiny_factory(arch="llama")
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_model(tmp_path)


def test_missing_shard(tiny_factory, tmp_path):
    folder, _ = tiny_factory(arch="llama", shard=True)
    dst = tmp_path / "m"
    shutil.copytree(folder, dst)
    next(dst.glob("model-00001-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="shards listed .* are missing"):
        load_model(dst)


def copy_with_config(folder, dst, **changes):
    """A copy of a model folder with some config.json keys changed."""
    shutil.copytree(folder, dst)
    raw = json.loads((dst / "config.json").read_text())
    raw.update(changes)
    (dst / "config.json").write_text(json.dumps(raw))
    return dst


def test_unsupported_architecture(tiny_factory, tmp_path):
    folder, _ = tiny_factory(arch="llama")
    dst = copy_with_config(folder, tmp_path / "m", architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match="unsupported architecture .*GPT2LMHeadModel.*supported: LlamaForCausalLM"):
        load_model(dst)


@pytest.mark.parametrize("dms,match", [
    ({"dms_window_size": 0}, "dms_window_size: expected an int >= 1"),
    ({"window_size": -3}, "dms_window_size"),
    ({"dms_alpha_per": "token"}, "dms_alpha_per"),
    ({"dms_bogus": 1}, "dms: unknown setting"),
])
def test_bad_dms_settings(tiny_factory, dms, match):
    folder, _ = tiny_factory(arch="llama")
    with pytest.raises(ValueError, match=match):
        load_model(folder, dms=dms)


def test_bad_window_in_config(tiny_factory):
    folder, _ = tiny_factory(arch="llama", extra_config={"dms_window_size": 0})
    with pytest.raises(ValueError, match="dms_window_size"):
        load_model(folder)


def test_wrong_weight_shape(tiny_factory, tmp_path):
    folder, _ = tiny_factory(arch="llama")
    dst = copy_with_config(folder, tmp_path / "m", intermediate_size=100)
    with pytest.raises(ValueError, match="has shape .* the config implies"):
        load_model(dst)
