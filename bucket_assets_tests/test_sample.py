"""The sample dataset is deterministic and holds the hostile cases it promises."""

from __future__ import annotations

import tarfile

from PIL import Image

from bucket_assets.sample import generate


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_generate_is_deterministic(tmp_path, sample_root):
    again = tmp_path / "again"
    generate(again)
    assert _files(again) == _files(sample_root)


def test_sample_has_hostile_cases(sample_root):
    with tarfile.open(sample_root / "raw" / "laion" / "00000.tar") as tf:
        names = tf.getnames()
        cmyk = Image.open(tf.extractfile("000000007.jpg"))
        rotated = Image.open(tf.extractfile("000000009.jpg"))
        assert cmyk.mode == "CMYK"
        assert rotated.getexif().get(0x0112) == 6
        truncated = tf.extractfile("000000003.jpg").read()
        assert not truncated.endswith(b"\xff\xd9")
    assert len(names) == 36
    assert Image.open(sample_root / "raw" / "folder" / "folder_img_01.png").mode.startswith("I;16")
    assert not (sample_root / "raw" / "pcb" / "train" / "5010.jpg").exists()
