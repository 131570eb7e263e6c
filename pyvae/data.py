"""Image datasets for ``pyvae train``: scikit-learn's bundled handwritten digits (no download) and
users' own ``.npz`` / ``.npy`` arrays, as float32 ``[N, C, H, W]`` tensors in [0, 1] with a fixed
train/test split, and the number of levels the pixel values take where they lie on a grid
(``num_levels``: what a discretized likelihood needs)."""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass

import numpy as np
import torch

# The train/test split is fixed (its own seed, not the training seed), so that runs with different
# --seed values are evaluated on the same test images.
SPLIT_SEED = 20240601
TEST_FRACTION = 0.2

IMAGE_KEYS = ("x", "images")
LABEL_KEYS = ("y", "labels")


class DatasetError(ValueError):
    """A dataset that cannot be used; the message names the source and the problem."""


@dataclass(frozen=True)
class ImageDataset:
    """Images as float32 ``[N, C, H, W]`` in [0, 1], int64 labels (or None), split into train/test.
    ``num_levels``: L when every pixel value is on the grid ``k / (L - 1)`` (the digits: 17, uint8
    images: 256, binary images: 2), None for continuous values."""

    name: str
    x_train: torch.Tensor
    x_test: torch.Tensor
    y_train: torch.Tensor | None = None
    y_test: torch.Tensor | None = None
    num_classes: int | None = None
    num_levels: int | None = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])

    @property
    def has_labels(self) -> bool:
        return self.y_train is not None


def load_dataset(spec: str, *, binarize: bool = False) -> ImageDataset:
    """``"digits"`` (scikit-learn's 1797 8x8 digits, pixel values 0..16 scaled to [0, 1]: 17 levels)
    or the path of an ``.npz`` / ``.npy`` file (see :func:`load_array_file`; its levels from
    :func:`grid_levels`). ``binarize``: pixels become 0 or 1 (>= 0.5 -> 1; 2 levels), for a
    Bernoulli likelihood that is a true likelihood of its data."""
    if spec == "digits":
        images, labels, name = _digits()
        levels = DIGITS_LEVELS
    else:
        images, labels = load_array_file(spec)
        name = os.path.abspath(spec)
        levels = grid_levels(images)
    if binarize:
        images = (images >= 0.5).astype(np.float32)
        levels = 2
    return split(images, labels, name, levels)


DIGITS_LEVELS = 17  # the digits' pixels count 0..16 ink in a 4x4 block
MAX_LEVELS = 65536  # 16-bit data: the most levels a dataset is taken to be on a grid of


def grid_levels(images: np.ndarray) -> int | None:
    """The levels L such that every value of ``images`` (in [0, 1]) is ``k / (L - 1)`` for an
    integer k, within a hundredth of a level (float32 rounding), else None: the smallest of the
    spacing of its distinct values (``1 / min gap``), 2, 256 and 65536 that fits. uint8 images
    (divided by 255 on loading) give 256 unless their levels are a coarser grid; bool ones 2."""
    values = np.unique(images).astype(np.float64)
    if len(values) > MAX_LEVELS:
        return None
    candidates = {2, 256, MAX_LEVELS}
    if len(values) > 1:
        spacing = round(1.0 / np.diff(values).min())
        if 1 <= spacing < MAX_LEVELS:
            candidates.add(spacing + 1)
    for levels in sorted(candidates):
        scaled = values * (levels - 1)
        if np.abs(scaled - np.round(scaled)).max() < 0.01:
            return levels
    return None


def _digits() -> tuple[np.ndarray, np.ndarray, str]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # an optional dependency (the [train] extra): say how to get it, no traceback
        raise DatasetError("--dataset digits needs scikit-learn, which is not installed: "
                           'pip install "pyvae[train]" (or scikit-learn), or pass an .npz/.npy file') from None

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]  # [1797, 1, 8, 8]
    return images, digits.target.astype(np.int64), "digits"


def load_array_file(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Images (float32 ``[N, C, H, W]`` in [0, 1]) and labels (int64 ``[N]`` or None) from a file.

    ``.npy``: one array of images. ``.npz``: the images are the array named ``x`` or ``images``,
    else the first array that is not a label array; labels (optional) are named ``y`` or
    ``labels``. Images are ``[N, H, W]``, ``[N, C, H, W]`` or ``[N, H, W, C]`` (channel-last when the
    last dimension is 1, 3 or 4 and the second is not), uint8 (divided by 255), bool, or floating
    point with every value in [0, 1]. Raises :class:`DatasetError` naming the file and the problem.
    """
    if not os.path.exists(path):
        raise DatasetError(f"dataset file not found: {path} (--dataset takes 'digits' or an .npz/.npy file)")
    if os.path.isdir(path):
        raise DatasetError(f"dataset {path} is a directory; --dataset takes 'digits' or an .npz/.npy file")
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".npz", ".npy"):
        raise DatasetError(f"dataset {path}: unsupported file type {ext or '(none)'!r}; expected .npz or .npy")
    try:
        if ext == ".npy":
            images, labels = np.load(path, allow_pickle=False), None
        else:
            with np.load(path, allow_pickle=False) as archive:
                images, labels = _pick_arrays(path, {k: archive[k] for k in archive.files})
    except DatasetError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DatasetError(f"dataset {path} cannot be read as {ext}: {exc}") from None
    images = to_images(images, path)
    if labels is not None:
        labels = to_labels(labels, len(images), path)
    return images, labels


def _pick_arrays(path: str, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
    label_key = next((k for k in LABEL_KEYS if k in arrays), None)
    image_key = next((k for k in IMAGE_KEYS if k in arrays), None)
    if image_key is None:
        image_key = next((k for k in arrays if k != label_key), None)
    if image_key is None:
        raise DatasetError(f"dataset {path} holds no image array (expected one named "
                           f"{' or '.join(map(repr, IMAGE_KEYS))}, or any array besides the labels)")
    return arrays[image_key], arrays[label_key] if label_key is not None else None


def to_images(array: np.ndarray, source: str) -> np.ndarray:
    """``array`` as float32 ``[N, C, H, W]`` in [0, 1] (see :func:`load_array_file`)."""
    shape = tuple(array.shape)
    if array.ndim == 3:
        array = array[:, None]
    elif array.ndim == 4:
        if shape[-1] in (1, 3, 4) and shape[1] not in (1, 3, 4):
            array = array.transpose(0, 3, 1, 2)
    else:
        raise DatasetError(f"dataset {source}: images must be [N, H, W], [N, C, H, W] or [N, H, W, C]; "
                           f"got an array of shape {shape}")
    if min(array.shape) == 0:
        raise DatasetError(f"dataset {source}: the image array of shape {shape} is empty")
    if len(array) < 2:
        raise DatasetError(f"dataset {source}: needs at least 2 images (a train and a test split); got {len(array)}")
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array, dtype=np.float32) / 255.0
    if array.dtype == np.bool_:
        return np.ascontiguousarray(array, dtype=np.float32)
    if not np.issubdtype(array.dtype, np.floating):
        raise DatasetError(f"dataset {source}: images must be uint8 (0..255), bool, or floating point in "
                           f"[0, 1]; got dtype {array.dtype}")
    array = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise DatasetError(f"dataset {source}: the images contain NaN or infinite values")
    lo, hi = float(array.min()), float(array.max())
    if lo < 0.0 or hi > 1.0:
        raise DatasetError(f"dataset {source}: floating-point images must lie in [0, 1]; got values in "
                           f"[{lo:g}, {hi:g}] (scale them, or save them as uint8)")
    return array


def to_labels(labels: np.ndarray, n: int, source: str) -> np.ndarray:
    """``labels`` as int64 ``[n]`` class indices >= 0."""
    if labels.ndim != 1 or len(labels) != n:
        raise DatasetError(f"dataset {source}: labels must be a 1-D array with one label per image ({n}); "
                           f"got shape {tuple(labels.shape)}")
    if not (np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.bool_)):
        raise DatasetError(f"dataset {source}: labels must be integers (class indices); got dtype {labels.dtype}")
    if labels.min() < 0:
        raise DatasetError(f"dataset {source}: labels must be class indices >= 0; got {labels.min()}")
    return labels.astype(np.int64)


def test_count(n: int) -> int:
    """How many of ``n`` images (n >= 2) :func:`split` puts in the test split."""
    return min(n - 1, max(1, round(n * TEST_FRACTION)))


def split(images: np.ndarray, labels: np.ndarray | None, name: str, num_levels: int | None = None) -> ImageDataset:
    """A fixed (``SPLIT_SEED``) random split, ``TEST_FRACTION`` of the images (at least 1) for test."""
    n = len(images)
    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    n_test = test_count(n)
    test, train = order[:n_test], order[n_test:]
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    if labels is None:
        return ImageDataset(name, x[train], x[test], num_levels=num_levels)
    y = torch.from_numpy(labels)
    return ImageDataset(name, x[train], x[test], y[train], y[test], int(labels.max()) + 1, num_levels)
