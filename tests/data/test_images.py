"""Tests for flowmill.data.images: packing a folder of captioned images."""

import io
import json

import pytest
from PIL import Image

from flowmill.data.images import image_key, pack_images
from flowmill.data.pack import PackOptions
from tests.helpers import shard_members

QUIET = PackOptions(progress=False)


def save(path, size=(40, 20), color=(200, 10, 10), fmt=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)


def test_folder_of_captioned_images(tmp_path):
    src = tmp_path / "src"
    save(src / "cat.png")
    (src / "cat.txt").write_text("a red cat\n")
    save(src / "dogs" / "rex.v2.jpeg")
    (src / "dogs" / "rex.v2.json").write_text(json.dumps({"caption": "a dog", "source": "camera"}))
    save(src / "nocaption.png")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 30)
    (src / "broken.txt").write_text("never packed")
    (src / "latin.png").write_bytes((src / "cat.png").read_bytes())
    (src / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    (src / "cat.webp").write_bytes((src / "cat.png").read_bytes())  # same key as cat.png, which sorts first
    lines = []
    manifest = pack_images(src, tmp_path / "out", size=16, options=PackOptions(processes=2, progress=False), on_reject=lines.append)
    assert manifest["total_samples"] == 2 and manifest["fields"] == ["jpg", "json", "png", "txt"]
    files = shard_members(tmp_path / "out")
    assert files["cat.txt"] == b"a red cat" and files["dogs/rex_v2.txt"] == b"a dog"
    assert json.loads(files["dogs/rex_v2.json"]) == {"caption": "a dog", "source": "camera"}
    with Image.open(io.BytesIO(files["cat.png"])) as image:
        assert image.size == (16, 16) and image.format == "PNG"
    with Image.open(io.BytesIO(files["dogs/rex_v2.jpg"])) as image:
        assert image.size == (16, 16) and image.format == "JPEG"
    reasons = {item["input"]: item["reason"] for item in manifest["made"]["notes"]["rejected"]}
    assert reasons["cat.webp"] == "its key 'cat' is taken by cat.png"
    assert reasons["nocaption.png"].startswith("no caption")
    assert reasons["broken.png"].startswith("cannot decode the image")
    assert reasons["latin.png"].startswith("caption latin.txt is not UTF-8")
    assert len(lines) == 4


def test_images_are_copied_unchanged_without_size(tmp_path):
    save(tmp_path / "src" / "a.png", size=(7, 5))
    (tmp_path / "src" / "a.txt").write_text("x")
    pack_images(tmp_path / "src", tmp_path / "out", options=QUIET)
    assert shard_members(tmp_path / "out")["a.png"] == (tmp_path / "src" / "a.png").read_bytes()


def test_repacking_is_idempotent_until_an_input_changes(tmp_path):
    save(tmp_path / "src" / "a.png")
    (tmp_path / "src" / "a.txt").write_text("one")
    first = pack_images(tmp_path / "src", tmp_path / "out", options=QUIET)
    assert pack_images(tmp_path / "src", tmp_path / "out", options=QUIET) == first
    (tmp_path / "src" / "a.txt").write_text("two words")
    with pytest.raises(FileExistsError, match="overwrite"):
        pack_images(tmp_path / "src", tmp_path / "out", options=QUIET)
    pack_images(tmp_path / "src", tmp_path / "out", options=PackOptions(progress=False, overwrite=True))
    assert shard_members(tmp_path / "out")["a.txt"] == b"two words"


def test_missing_and_empty_folders_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        pack_images(tmp_path / "nowhere", tmp_path / "out", options=QUIET)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty holds no images"):
        pack_images(tmp_path / "empty", tmp_path / "out", options=QUIET)
    assert image_key("a/b.c.d.png") == "a/b_c_d"
