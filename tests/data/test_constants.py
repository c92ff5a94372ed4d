"""Tests for flowmill.data.constants: the names the help texts read are the ones the packers write."""

import subprocess
import sys

from PIL import Image

from flowmill.data import constants
from flowmill.data.images import pack_images
from flowmill.data.pack import PackOptions


def test_every_pack_source_has_a_default_shard_size():
    assert set(constants.DEFAULT_SHARD_SAMPLES) == set(constants.PACK_SOURCES)
    assert all(count >= 1 for count in constants.DEFAULT_SHARD_SAMPLES.values())


def test_a_packer_records_its_source_name_and_default(tmp_path):
    (tmp_path / "src").mkdir()
    Image.new("L", (4, 4)).save(tmp_path / "src" / "a.png")
    (tmp_path / "src" / "a.txt").write_text("a caption")
    params = pack_images(tmp_path / "src", tmp_path / "out", options=PackOptions(progress=False))["made"]["params"]
    assert params["source"] == constants.IMAGES_SOURCE
    assert params["shard_samples"] == constants.DEFAULT_SHARD_SAMPLES[constants.IMAGES_SOURCE]


def test_the_module_imports_nothing():
    script = "import sys; before = set(sys.modules); import flowmill.data.constants; print(sorted(set(sys.modules) - before))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert eval(result.stdout) == ["flowmill", "flowmill.data", "flowmill.data.constants"]
