"""Image files on disk: CelebA in torchvision's layout, any folder tree of images, and decoding one file.

Every image becomes RGB (transparency over white), stands upright (EXIF), is centre-cropped to a square and
resized (antialiased) to the model's size.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from wgan_lit.config import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
CELEBA_PARTITIONS = {"train": 0, "valid": 1, "test": 2}  # codes in list_eval_partition.txt; "all" = all

CELEBA_HELP = """Expected CelebA in torchvision's layout:
  {root}/celeba/img_align_celeba/000001.jpg ... 202599.jpg   (the aligned and cropped faces, 178x218 JPEGs)
  {root}/celeba/list_eval_partition.txt                      (optional: picks data.split=train|valid|test;
                                                              without it every image in the folder is used)
CelebA is not downloaded automatically (its Google Drive links are rate-limited). Get img_align_celeba.zip and
list_eval_partition.txt by hand from the official page https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html
(Google Drive: Img/ and Eval/) or from Kaggle (datasets/jessicali9530/celeba-dataset), unzip them into
{root}/celeba/, and pass data.root=FOLDER_THAT_HOLDS_celeba."""


class SkippedFilesWarning(UserWarning):
    """Some image files could not be read and were left out of the dataset."""


def find_images(folder: Path) -> list[Path]:
    """Image files (jpg, jpeg, png, webp, bmp; any case) under ``folder``, recursively, sorted.

    Hidden files and folders are skipped: the cache lives in ``.wgan_cache`` beside the images.
    """
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(Path(dirpath) / f for f in filenames
                     if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS)
    return sorted(found)


def read_celeba_partition(path: Path) -> dict[str, int]:
    """file name -> 0/1/2 (train/valid/test) from list_eval_partition.txt (or Kaggle's .csv)."""
    out: dict[str, int] = {}
    lines = path.read_text().splitlines()
    if path.suffix == ".csv" and lines and not lines[0].split(",")[-1].strip().isdigit():
        lines = lines[1:]  # Kaggle's header: image_id,partition
    for number, line in enumerate(lines, start=1):
        parts = line.replace(",", " ").split()
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise DataError(f"{path}, line {number}: {line!r} is not '<file name> <0|1|2>'; the partition "
                            "file is damaged. Fetch it again or delete it to use the whole folder.")
        out[parts[0]] = int(parts[1])
    return out


def celeba_files(root: str | Path, split: str = "train") -> tuple[Path, list[Path]]:
    """(folder, files of ``split``) of CelebA under ``root``; DataError explaining the layout if absent."""
    root = Path(root)
    if split not in (*CELEBA_PARTITIONS, "all"):
        raise DataError(f"data.split={split!r}: CelebA's splits are {', '.join([*CELEBA_PARTITIONS, 'all'])}")
    base = next((b for b in (root / "celeba", root) if (b / "img_align_celeba").is_dir()), None)
    if base is None:
        found = "does not exist" if not root.exists() else "has no celeba/img_align_celeba folder"
        raise DataError(f"CelebA not found: data.root={root} {found}.\n" + CELEBA_HELP.format(root=root))
    image_dir = base / "img_align_celeba"
    if (image_dir / "img_align_celeba").is_dir() and not any(image_dir.glob("*.jpg")):
        image_dir = image_dir / "img_align_celeba"  # Kaggle's zip nests the folder once more
    partition = next((p for p in (base / "list_eval_partition.txt", base / "list_eval_partition.csv")
                      if p.is_file()), None)
    if partition is None or split == "all":
        files = find_images(image_dir)
        if partition is None:
            log.info("No list_eval_partition.txt in %s: data.split=%s uses every image in %s",
                     base, split, image_dir)
    else:
        code = CELEBA_PARTITIONS[split]
        listed = [image_dir / name for name, c in read_celeba_partition(partition).items() if c == code]
        files = [f for f in listed if f.is_file()]
        if len(files) < len(listed):
            missing = [f.name for f in listed if not f.is_file()]
            warnings.warn(f"{len(missing)} of the {len(listed)} images that {partition.name} puts in split "
                          f"{split!r} are missing from {image_dir} (e.g. {', '.join(missing[:5])}); using "
                          f"the {len(files)} present. Unzip img_align_celeba.zip completely to use them all.",
                          SkippedFilesWarning, stacklevel=2)
    if not files:
        raise DataError(f"CelebA: no images for data.split={split} in {image_dir}.\n"
                        + CELEBA_HELP.format(root=root))
    return image_dir, files


def folder_files(root: str | Path) -> tuple[Path, list[Path]]:
    """(folder, every image file under it); DataError if the folder is missing or holds no images."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data.root={root}: no such folder. data=folder reads every .jpg/.jpeg/.png/.webp/"
                        ".bmp file under data.root (recursively); pass data.root=PATH_TO_YOUR_IMAGES.")
    files = find_images(root)
    if not files:
        raise DataError(f"data.root={root}: the folder holds no image files (looked recursively for "
                        f"{', '.join(sorted(IMAGE_EXTENSIONS))}); point data.root at a folder of images.")
    return root, files


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB; transparent pixels (RGBA, LA, palette with transparency) become white, gray and palette expand."""
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(path: str | Path, image_size: int, center_crop: int = 0) -> np.ndarray:
    """One image file -> uint8 array 3 x S x S: RGB, centre-cropped to a square, resized (antialiased).

    ``center_crop`` = side of the centred square cut before resizing; 0 (or more than the short side) takes
    the largest one, which for CelebA's 178x218 faces equals torchvision's ``Resize(S) + CenterCrop(S)``.
    """
    with Image.open(path) as image:
        rgb = to_rgb(ImageOps.exif_transpose(image))  # photos from cameras and phones stand upright
        side = min(rgb.size)
        crop = min(center_crop, side) if center_crop > 0 else side
        rgb = TF.center_crop(rgb, [crop, crop])
        rgb = TF.resize(rgb, [image_size] * 2, interpolation=InterpolationMode.BILINEAR, antialias=True)
        return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1).copy()

