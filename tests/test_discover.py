"""Finding labelled images: class folders, nesting, hidden and non-image files, duplicates, errors."""

from __future__ import annotations

import os

import pytest

from bottleneck.errors import DataError
from bottleneck.features.discover import discover_images

from .conftest import make_dataset, synthetic_image


def test_one_class_per_folder_nested_folders_belong_to_their_class(tmp_path):
    make_dataset(tmp_path, per_class=2)
    nested = tmp_path / "red" / "more" / "deeper"
    nested.mkdir(parents=True)
    synthetic_image((1, 2, 3), 9).save(nested / "x.PNG")
    found = discover_images(tmp_path)
    assert found.classes == ["blue", "green", "red"]
    assert len(found.images) == 7
    deep = [im for im in found.images if im.relpath == "red/more/deeper/x.PNG"]
    assert deep and deep[0].label == "red"


def test_labels_are_folder_names_unchanged(tmp_path):
    make_dataset(tmp_path, per_class=1, classes={"Great Dane": (1, 1, 1), "great_dane": (9, 9, 9)})
    assert discover_images(tmp_path).classes == ["Great Dane", "great_dane"]


def test_hidden_non_image_and_stray_files_are_skipped_and_counted(tmp_path):
    make_dataset(tmp_path, per_class=1)
    (tmp_path / "red" / ".DS_Store").write_bytes(b"junk")
    (tmp_path / "red" / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden_class").mkdir()
    (tmp_path / "README.md").write_text("top level file")
    (tmp_path / "__MACOSX").mkdir()
    found = discover_images(tmp_path)
    assert len(found.images) == 3
    assert found.skipped == {"hidden": 3, "not an image extension": 1, "outside a class folder": 1}


def test_extensions_are_case_insensitive_and_links_count_once(tmp_path):
    make_dataset(tmp_path, per_class=1)
    original = next((tmp_path / "red").iterdir())
    os.link(original, tmp_path / "red" / "HARDLINK.JPEG")
    os.symlink(original, tmp_path / "red" / "symlink.Png")
    os.symlink(tmp_path / "red", tmp_path / "red" / "loop")  # a folder link back to itself
    found = discover_images(tmp_path)
    assert len(found.images) == 3
    assert found.skipped["same file listed twice"] == 2


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda root: None, "data folder not found: {root}"),
        (
            lambda root: root.mkdir(),
            "no images found in {root} (expected one sub-folder per class holding image files)",
        ),
        (lambda root: root.write_text("x"), "data path is not a folder: {root}"),
        (
            lambda root: make_dataset(root, per_class=2, classes={"only": (1, 2, 3)}),
            "found 1 class folder with images in {root} (only); need at least 2, one sub-folder per class",
        ),
    ],
    ids=["missing", "empty", "file", "one-class"],
)
def test_unusable_data_folders_get_one_line_errors(tmp_path, setup, message):
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(DataError) as caught:
        discover_images(root)
    assert str(caught.value) == message.format(root=root.absolute())


def _save_mpo(path, first, second) -> None:
    from PIL import Image

    frames = [Image.new("RGB", (64, 48), first), Image.new("RGB", (64, 48), second)]
    frames[0].save(path, "MPO", save_all=True, append_images=frames[1:])


def test_mpo_camera_files_are_discovered_and_decode_to_their_first_picture(tmp_path):
    from PIL import Image

    from bottleneck.features.decode import decode_image

    make_dataset(tmp_path, per_class=1)
    mpo = tmp_path / "red" / "stereo.MPO"
    _save_mpo(mpo, (220, 20, 20), (20, 20, 220))
    with Image.open(mpo) as opened:  # the file really holds two pictures, so Pillow calls it MPO
        assert (opened.format, opened.n_frames) == ("MPO", 2)
    found = discover_images(tmp_path)
    assert "red/stereo.MPO" in [im.relpath for im in found.images]
    pixel = decode_image(mpo.read_bytes(), 16)[8, 8]
    assert abs(int(pixel[0]) - 220) < 30 and int(pixel[2]) < 60


def test_every_extension_of_a_format_pillow_opens_is_an_image_extension():
    from PIL import Image, ImageFile

    from bottleneck.features.discover import IMAGE_EXTENSIONS

    Image.init()
    openable = {
        fmt
        for fmt, (opener, _accept) in Image.OPEN.items()
        if not (isinstance(opener, type) and issubclass(opener, ImageFile.StubImageFile))
        and fmt not in {"MPEG", "FITSSTUB"}  # identify-only plugins that are not StubImageFiles
    }
    expected = {ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in openable}
    assert expected - IMAGE_EXTENSIONS == set()
    assert {".mpo", ".jpg", ".png", ".tif"} <= IMAGE_EXTENSIONS
    assert not {".bufr", ".grib", ".h5", ".mpg", ".wmf", ".pdf"} & IMAGE_EXTENSIONS  # stubs, save-only


def test_a_link_from_one_class_into_another_never_relabels_images(tmp_path):
    make_dataset(tmp_path, per_class=2)
    os.symlink("../blue", tmp_path / "red" / "blue_link")  # ln -s ../bees data/ants/bees_link
    found = discover_images(tmp_path)
    assert sorted((im.relpath, im.label) for im in found.images) == sorted(
        (p.relative_to(tmp_path).as_posix(), p.parent.name) for p in tmp_path.glob("*/*.png")
    )
    assert found.skipped["link into another class (left out)"] == 2
    assert (
        len(found.conflicts) == 2 and "red/blue_link/" in found.conflicts[0] and "(class 'blue')" in found.conflicts[0]
    )


def test_a_link_to_data_itself_leaves_every_label_alone(tmp_path):
    make_dataset(tmp_path, per_class=2)
    os.symlink("..", tmp_path / "red" / "everything")
    found = discover_images(tmp_path)
    assert {im.relpath.split("/")[0] + ":" + im.label for im in found.images} == {"red:red", "green:green", "blue:blue"}
    assert len(found.images) == 6


def test_a_hard_link_in_two_classes_is_a_conflict_left_out_of_both(tmp_path):
    make_dataset(tmp_path, per_class=2)
    first = sorted((tmp_path / "blue").glob("*.png"))[0]
    os.link(first, tmp_path / "red" / "also-blue.png")
    found = discover_images(tmp_path)
    assert all(im.path != first and im.relpath != "red/also-blue.png" for im in found.images)
    assert found.skipped["in two classes (left out)"] == 2
    assert found.conflicts == [
        f"blue/{first.name} and red/also-blue.png are one file in classes 'blue', 'red': left out of every class"
    ]


def test_features_names_the_link_in_its_summary(tmp_path, capsys):
    from bottleneck.cli import main

    data = tmp_path / "data"
    make_dataset(data, per_class=2)
    os.symlink("../blue", data / "red" / "blue_link")
    assert (
        main(
            [
                "features",
                str(data),
                "--cache",
                str(tmp_path / "cache"),
                "--backbone",
                "pixels",
                "--image-size",
                "8",
                "--no-progress",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "6 images in 3 classes" in out and "link into another class (left out) 2" in out
    assert "WARNING: 2 files are reachable from two class folders" in out and "red/blue_link/" in out
