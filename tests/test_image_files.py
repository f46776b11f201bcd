"""Image files on disk: CelebA's layout and partitions, folders of images, and decoding one file to RGB."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from tests.conftest import make_celeba, make_folder, picture
from wgan_lit.config import DataError
from wgan_lit.image_files import (
    CELEBA_HELP,
    IMAGE_EXTENSIONS,
    SkippedFilesWarning,
    celeba_files,
    decode_image,
    find_images,
    folder_files,
    read_celeba_partition,
    to_rgb,
)

# ------------------------------------------------------------------------------------------------------------

EXTRAS = ["000040.jpg", "000041.jpg", "000042.png", "000043.png"]  # corrupt, gray, RGBA, palette: all 'train'


def names(files: list[Path]) -> list[str]:
    return [f.name for f in files]


# ----------------------------------------------------------------------------------------------- CelebA


def test_celeba_train_split_is_the_partitions_train_files_in_its_order(celeba):
    folder, files = celeba_files(celeba, "train")
    assert folder == celeba / "celeba" / "img_align_celeba"
    assert files == [folder / name for name in [f"{i:06d}.jpg" for i in range(30)] + EXTRAS]


@pytest.mark.parametrize("split,files", [("valid", range(30, 35)), ("test", range(35, 40))])
def test_partition_file_picks_the_split_in_its_order(celeba, split, files):
    # The file's order, not the sorted one: the partition below lists the test split backwards.
    folder = celeba / "celeba" / "img_align_celeba"
    assert names(celeba_files(celeba, split)[1]) == [f"{i:06d}.jpg" for i in files]
    partition = celeba / "celeba" / "list_eval_partition.txt"
    partition.write_text("\n".join(reversed(partition.read_text().splitlines())) + "\n")
    assert celeba_files(celeba, split)[1] == [folder / f"{i:06d}.jpg" for i in reversed(files)]


def test_split_all_and_a_missing_partition_file_use_the_whole_folder(tmp_path):
    _, everything = celeba_files(make_celeba(tmp_path / "a"), "all")
    _, no_partition = celeba_files(make_celeba(tmp_path / "b", partition=False), "train")
    assert len(everything) == len(no_partition) == 44  # the corrupt file too: decoding is what skips it
    assert names(everything) == names(no_partition) == sorted(names(everything))


def test_celeba_directly_under_root_is_found_too(tmp_path):
    make_celeba(tmp_path / "data")
    folder, files = celeba_files(tmp_path / "data" / "celeba", "valid")  # root = the celeba folder itself
    assert folder == tmp_path / "data" / "celeba" / "img_align_celeba" and len(files) == 5


def test_files_listed_in_the_partition_but_absent_are_named_in_one_warning(celeba):
    (celeba / "celeba" / "img_align_celeba" / "000007.jpg").unlink()
    with pytest.warns(SkippedFilesWarning, match=r"1 of the 34 images .* missing .*000007\.jpg") as record:
        _, files = celeba_files(celeba)
    assert len(record) == 1 and len(files) == 33 and "000007.jpg" not in names(files)


def test_missing_celeba_explains_the_layout_and_the_manual_download(tmp_path):
    with pytest.raises(DataError) as err:
        celeba_files(tmp_path / "nowhere")
    message = str(err.value)
    for text in ("does not exist", "celeba/img_align_celeba/000001.jpg", "list_eval_partition.txt",
                 "not downloaded automatically", "mmlab.ie.cuhk.edu.hk", "Kaggle", "data.root="):
        assert text in message, message
    assert CELEBA_HELP.format(root=tmp_path / "nowhere") in message
    (tmp_path / "data").mkdir()
    with pytest.raises(DataError, match="has no celeba/img_align_celeba folder"):
        celeba_files(tmp_path / "data")
    (tmp_path / "data" / "celeba" / "img_align_celeba").mkdir(parents=True)
    with pytest.raises(DataError, match="no images for data.split=train"):
        celeba_files(tmp_path / "data")


def test_an_unknown_split_lists_celebas_splits(celeba):
    with pytest.raises(DataError, match=r"data.split='training': CelebA's splits are train, valid, test, all"):
        celeba_files(celeba, "training")


def test_kaggle_layout_nested_folder_and_csv_partition(tmp_path):
    folder = tmp_path / "celeba" / "img_align_celeba" / "img_align_celeba"
    folder.mkdir(parents=True)
    for i in range(6):
        Image.fromarray(picture(i)).save(folder / f"{i:06d}.jpg")
    rows = [f"{i:06d}.jpg,{0 if i < 4 else 2}" for i in range(6)]
    (tmp_path / "celeba" / "list_eval_partition.csv").write_text("image_id,partition\n" + "\n".join(rows))
    image_dir, files = celeba_files(tmp_path, "test")
    assert image_dir == folder and names(files) == ["000004.jpg", "000005.jpg"]


def test_read_partition_txt_and_csv(tmp_path):
    (tmp_path / "list_eval_partition.txt").write_text("000001.jpg 0\n\n000002.jpg 1\n000003.jpg 2\n")
    expected = {"000001.jpg": 0, "000002.jpg": 1, "000003.jpg": 2}
    assert read_celeba_partition(tmp_path / "list_eval_partition.txt") == expected
    (tmp_path / "with_header.csv").write_text("image_id,partition\n000001.jpg,0\n000002.jpg,1\n000003.jpg,2\n")
    (tmp_path / "no_header.csv").write_text("000001.jpg,0\n000002.jpg,1\n000003.jpg,2\n")
    assert read_celeba_partition(tmp_path / "with_header.csv") == expected
    assert read_celeba_partition(tmp_path / "no_header.csv") == expected


@pytest.mark.parametrize("line", ["000002.jpg 7", "000002.jpg", "000002.jpg 1 extra"])
def test_a_damaged_partition_line_names_the_file_and_line(tmp_path, line):
    (tmp_path / "list_eval_partition.txt").write_text(f"000001.jpg 0\n{line}\n")
    with pytest.raises(DataError, match=r"list_eval_partition.txt, line 2: .*partition file is damaged"):
        read_celeba_partition(tmp_path / "list_eval_partition.txt")


# ----------------------------------------------------------------------------------------------- folders


def test_folder_finds_every_format_recursively(tmp_path):
    root = make_folder(tmp_path / "imgs")
    folder, files = folder_files(root)
    assert folder == root
    assert files == [root / "a.JPG", root / "sub" / "b.png", root / "sub" / "d.bmp",
                     root / "sub" / "deeper" / "c.webp", root / "sub" / "e.jpeg"]  # sorted
    assert {f.suffix.lower() for f in files} == IMAGE_EXTENSIONS


def test_hidden_files_and_folders_are_skipped(tmp_path):
    """The cache lives in <root>/.wgan_cache: it must never be read back as images."""
    (tmp_path / ".wgan_cache").mkdir()
    (tmp_path / ".hidden").mkdir()
    for path in (tmp_path / "a.png", tmp_path / ".b.png", tmp_path / ".wgan_cache" / "c.png",
                 tmp_path / ".hidden" / "d.jpg"):
        Image.fromarray(picture(0)).save(path)
    assert find_images(tmp_path) == [tmp_path / "a.png"]


def test_folder_errors_missing_and_empty(tmp_path):
    with pytest.raises(DataError, match="no such folder.*data.root=PATH"):
        folder_files(tmp_path / "nope")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="holds no image files"):
        folder_files(tmp_path / "empty")
    (tmp_path / "empty" / "sub" / "x.jpg").write_bytes(b"nope")
    assert names(folder_files(tmp_path / "empty")[1]) == ["x.jpg"]  # listed; decoding is what rejects it


# ----------------------------------------------------------------------------------------------- decoding


def test_decoded_images_are_uint8_rgb_squares(celeba):
    out = decode_image(celeba / "celeba" / "img_align_celeba" / "000000.jpg", 32)
    assert out.shape == (3, 32, 32) and out.dtype == np.uint8 and out.flags.c_contiguous
    assert out.std() > 5  # the picture, not a flat colour


def test_a_corrupt_file_raises(celeba):
    with pytest.raises(Exception):  # noqa: B017 - PIL's error; the cache turns any into a skipped file
        decode_image(celeba / "celeba" / "img_align_celeba" / "000040.jpg", 32)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.fromarray(picture(0, w=60, h=40))  # landscape pixels...
    exif = Image.Exif()
    exif[0x0112] = 6  # ...stored rotated: viewers turn it 90 degrees
    img.save(tmp_path / "rotated.jpg", exif=exif)
    upright = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "rotated.jpg")).convert("RGB"))
    assert upright.shape == (60, 40, 3)
    Image.fromarray(upright).save(tmp_path / "upright.png")  # lossless: the same pixels, no EXIF
    rotated, expected = decode_image(tmp_path / "rotated.jpg", 40), decode_image(tmp_path / "upright.png", 40)
    assert np.array_equal(rotated, expected)


def test_gray_palette_and_rgba_images_become_rgb(celeba):
    folder = celeba / "celeba" / "img_align_celeba"
    gray = decode_image(folder / "000041.jpg", 32)
    assert gray.shape == (3, 32, 32) and (abs(gray.astype(int) - 100) <= 1).all()
    rgba = decode_image(folder / "000042.png", 32)
    assert (rgba[:, :, :12] == np.array([200, 0, 0])[:, None, None]).all()  # opaque red half
    assert (rgba[:, :, -12:] == 255).all()  # transparent half on white, not black
    palette = decode_image(folder / "000043.png", 32)
    expected = Image.new("P", (1, 1), 3).convert("RGB").getpixel((0, 0))
    assert (palette == np.array(expected)[:, None, None]).all()


def pixels(image: Image.Image) -> list:
    return [image.getpixel((x, 0)) for x in range(image.width)]


def test_to_rgb_puts_every_kind_of_transparency_on_white():
    la = Image.new("LA", (2, 1), (50, 255))
    la.putpixel((1, 0), (50, 0))
    assert pixels(to_rgb(la)) == [(50, 50, 50), (255, 255, 255)]
    palette = Image.new("P", (2, 1), 3)
    palette.putpixel((1, 0), 4)
    palette.info["transparency"] = 4  # palette index 4 is transparent
    opaque = Image.new("P", (1, 1), 3).convert("RGB").getpixel((0, 0))
    assert pixels(to_rgb(palette)) == [opaque, (255, 255, 255)]
    rgb = Image.new("RGB", (1, 1), (1, 2, 3))
    assert to_rgb(rgb) is rgb and to_rgb(Image.new("L", (1, 1), 9)).getpixel((0, 0)) == (9, 9, 9)


def test_center_crop_then_resize(tmp_path):
    img = np.zeros((60, 40, 3), np.uint8)
    img[10:50] = 255  # the centred 40x40 square is white, the 10-row bands above and below are black
    Image.fromarray(img).save(tmp_path / "a.png")
    assert (decode_image(tmp_path / "a.png", 16) == 255).all()  # auto: the largest centred square
    cropped = decode_image(tmp_path / "a.png", 16, center_crop=20)
    assert (cropped == 255).all()
    Image.fromarray(img).resize((40, 60)).save(tmp_path / "b.png")
    assert decode_image(tmp_path / "b.png", 16, center_crop=1000).shape == (3, 16, 16)  # crop > the image
