"""The GGUF conversion cache is published in one rename: two processes converting the same file at
once (two `dms retrofit` runs started together) never leave a reader with a half-replaced folder."""

import pytest

from dms_runtime.gguf_convert import _publish


def _folder(path, marker):
    path.mkdir()
    (path / "config.json").write_text("{}")
    (path / "marker").write_text(marker)
    return path


def test_a_new_conversion_is_moved_into_place(tmp_path):
    tmp, out = _folder(tmp_path / ".tmp-1", "ours"), tmp_path / "model"
    _publish(tmp, out, replace=False)
    assert (out / "marker").read_text() == "ours" and not tmp.exists()


def test_a_rival_conversion_published_first_is_kept(tmp_path):
    out = _folder(tmp_path / "model", "theirs")
    tmp = _folder(tmp_path / ".tmp-1", "ours")
    _publish(tmp, out, replace=False)
    assert (out / "marker").read_text() == "theirs"  # a reader of `out` keeps its files
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-1", "model"]  # the caller drops ours


def test_force_replaces_the_published_folder_and_leaves_nothing_aside(tmp_path):
    out = _folder(tmp_path / "model", "theirs")
    tmp = _folder(tmp_path / ".tmp-1", "ours")
    _publish(tmp, out, replace=True)
    assert (out / "marker").read_text() == "ours"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_foreign_folder_in_the_way_is_an_error(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "notes.txt").write_text("not a conversion")
    tmp = _folder(tmp_path / ".tmp-1", "ours")
    with pytest.raises(OSError):
        _publish(tmp, out, replace=False)
