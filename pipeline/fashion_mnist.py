"""Fashion-MNIST, the embedded default (`data.builtin: fashion_mnist`): read the four standard IDX files from
disk and write a train subset, a validation split carved from the rest of train, and the test set as shards.

Nothing is downloaded. The files are found in `$FASHION_MNIST_DIR` when it is set, else where Debian's
package `dataset-fashion-mnist` puts them (`/usr/share/datasets/fashion-mnist/`; `make install` installs it
where apt and root are at hand). The IDX format (LeCun's MNIST page): a 4-byte magic `0 0 <type> <ndim>`,
`ndim` big-endian uint32 sizes, then the values in C order, big-endian; the files may be gzipped.

The protocol the splits serve: `val` (carved from the 60,000 train images, disjoint from the train subset)
is what every setting is chosen on; `test` (the 10,000 t10k images) is evaluated once per run and chooses
nothing.
"""

from __future__ import annotations

import gzip
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.shards import CLASS_MAP_NAME, _write_class_map, _write_shards

ENV_VAR = "FASHION_MNIST_DIR"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_PACKAGE = "dataset-fashion-mnist"
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
IDX_TYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
             0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
SPLITS = ("train", "val", "test")


class FashionMNISTError(FileNotFoundError):
    """The Fashion-MNIST files are missing or malformed; the message names the file and both ways to get them."""


def how_to_get() -> str:
    return (f"install Debian's package (`sudo apt-get install {DEBIAN_PACKAGE}`, which `make install` does where "
            f"it can; files in {DEBIAN_DIR}), or set {ENV_VAR} to a directory holding the four standard files "
            f"({', '.join(name + '.gz' for pair in FILES.values() for name in pair)}, gzipped or not)")


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (gzipped or plain, told apart by the gzip magic) as a numpy array of its own shape."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise FashionMNISTError(f"{path} is a damaged gzip file ({e}): replace it; {how_to_get()}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_TYPES:
        raise FashionMNISTError(f"{path} is not an IDX file (magic {raw[:4].hex()}, expected 0000<type><ndim>): "
                                f"replace it; {how_to_get()}")
    dtype, ndim = IDX_TYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise FashionMNISTError(f"{path} ends inside its IDX header: the file is truncated; replace it")
    shape = tuple(int(n) for n in np.frombuffer(raw, ">u4", ndim, 4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise FashionMNISTError(f"{path}: the IDX header says shape {shape} ({expected} bytes), the file has "
                                f"{len(raw)} bytes: it is truncated or damaged; replace it")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def find_file(directory: Path, name: str) -> Path:
    for candidate in (directory / f"{name}.gz", directory / name):
        if candidate.is_file():
            return candidate
    raise FashionMNISTError(f"{directory} has no {name}.gz (or {name}): {how_to_get()}")


def data_dir() -> Path:
    """$FASHION_MNIST_DIR when set (it must hold the files), else Debian's directory."""
    chosen = os.environ.get(ENV_VAR)
    directory = Path(chosen) if chosen else DEBIAN_DIR
    if not directory.is_dir():
        where = f"{ENV_VAR}={chosen}" if chosen else f"{ENV_VAR} is not set and {DEBIAN_DIR}"
        raise FashionMNISTError(f"Fashion-MNIST not found: {where} is not a directory. To get it, {how_to_get()}")
    return directory


def load(split: str, directory: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [N, 28, 28] and int64 labels [N] of `train` (60,000) or `test` (10,000)."""
    directory = data_dir() if directory is None else Path(directory)
    image_path, label_path = (find_file(directory, name) for name in FILES[split])
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise FashionMNISTError(f"{image_path}: expected uint8 images [N, H, W], got {images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise FashionMNISTError(f"{label_path}: {labels.shape} labels for {len(images)} images in {image_path}: "
                                f"the pair does not match; replace them")
    if labels.size and int(labels.max()) >= len(CLASSES):
        raise FashionMNISTError(f"{label_path}: label {int(labels.max())} outside the {len(CLASSES)} classes")
    return images, labels.astype(np.int64)


def split_indices(labels: np.ndarray, train_size: int | None, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint stratified (train subset, validation) indices into the train file, drawn from `seed`;
    `train_size=None` keeps everything that is not validation."""
    from sklearn.model_selection import train_test_split

    if val_size < len(CLASSES) or val_size >= len(labels):
        raise ValueError(f"data.val_size={val_size} must lie in [{len(CLASSES)}, {len(labels)})")
    rest, val = train_test_split(np.arange(len(labels)), test_size=val_size, stratify=labels, random_state=seed)
    if train_size is not None and train_size < len(rest):
        if train_size < len(CLASSES):
            raise ValueError(f"data.train_size={train_size} must be at least {len(CLASSES)}")
        rest, _ = train_test_split(rest, train_size=train_size, stratify=labels[rest], random_state=seed)
    return np.sort(rest), np.sort(val)


def _samples(images: np.ndarray, labels: np.ndarray, indices: np.ndarray, prefix: str):
    for i in indices:
        png = io.BytesIO()
        Image.fromarray(images[i], mode="L").save(png, format="PNG")
        yield {"__key__": f"{prefix}{i:05d}", "cls": str(labels[i]).encode(), "png": png.getvalue()}


def write_fashion_mnist(out_dir: str | Path, shard_size: int, train_size: int | None, val_size: int,
                        seed: int = 0, directory: Path | None = None) -> dict[str, Path]:
    """out_dir/{train,val,test}/<split>-NNNNNN.tar + shardlist.json and out_dir/class_map.json. Keys name the
    source: `trainNNNNN` (index in the train file, for the train subset and validation) and `testNNNNN`.
    Images are the original 28x28 grey levels as PNG (the reader turns them into RGB)."""
    out_dir = Path(out_dir)
    train_images, train_labels = load("train", directory)
    test_images, test_labels = load("test", directory)
    train, val = split_indices(train_labels, train_size, val_size, seed)
    parts = {"train": (train_images, train_labels, train, "train"), "val": (train_images, train_labels, val, "train"),
             "test": (test_images, test_labels, np.arange(len(test_labels)), "test")}
    paths = {split: _write_shards(out_dir / split, split, _samples(*parts[split]), shard_size, CLASSES)
             for split in SPLITS}
    _write_class_map(out_dir / CLASS_MAP_NAME, CLASSES)
    return paths
