"""A tiny local FEMNIST with the schema of ``flwrlabs/femnist`` (image, writer_id, hsf_id, character)."""

from pathlib import Path

import datasets
import numpy as np
from PIL import Image

CHARACTERS = [str(d) for d in range(10)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)] + [
    chr(c) for c in range(ord("a"), ord("z") + 1)
]
FEATURES = datasets.Features(
    {
        "image": datasets.Image(),
        "writer_id": datasets.Value("string"),
        "hsf_id": datasets.Value("int64"),
        "character": datasets.ClassLabel(names=CHARACTERS),
    }
)


def write_femnist(root: Path, writers: int = 6, per_writer: int = 12, seed: int = 0) -> Path:
    """Writer w's images are filled with pixel value 10*(w+1), so a test can tell who wrote a sample."""
    rng = np.random.default_rng(seed)
    rows = {"image": [], "writer_id": [], "hsf_id": [], "character": []}
    for w in range(writers):
        for _ in range(per_writer):
            pixels = np.full((28, 28), 10 * (w + 1), dtype=np.uint8)
            rows["image"].append(Image.fromarray(pixels, mode="L"))
            rows["writer_id"].append(f"f{w:04d}_{w % 7:02d}")
            rows["hsf_id"].append(w % 4)
            rows["character"].append(int(rng.integers(0, 62)))
    ds = datasets.Dataset.from_dict(rows, features=FEATURES)
    (root / "data").mkdir(parents=True, exist_ok=True)
    ds.to_parquet(root / "data" / "train-00000-of-00001.parquet")
    return root
