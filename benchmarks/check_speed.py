"""How fast `lora-check-dataset` reads a folder, and whether its memory grows with the folder.

Generates `--images` 512-px JPEGs with captions (random shapes, varied sizes), then runs the checker in a fresh
process per size (a quarter, half and all of the images) and prints images/s and peak RSS. Target: >= 500
images/s on 2 cores, memory flat in the folder size. Also confirms torch is never imported.

Run: `python benchmarks/check_speed.py [--images 3000]`
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw

CHILD = """
import resource, sys, time
from datasets_tools.check import CheckOptions, check_dataset
started = time.perf_counter()
report = check_dataset(sys.argv[1], CheckOptions(resolution=512))
elapsed = time.perf_counter() - started
peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print(report.images, elapsed, peak / 1024, "torch" in sys.modules)
"""


def make_images(folder: Path, count: int, offset: int) -> None:
    rng = random.Random(offset)
    for index in range(offset, offset + count):
        size = (rng.choice([512, 576, 640, 768]), rng.choice([512, 576, 640, 768]))
        image = Image.new("RGB", size, tuple(rng.randint(0, 255) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        for _ in range(8):
            box = sorted(rng.uniform(0, size[0]) for _ in range(2)) + sorted(rng.uniform(0, size[1]) for _ in range(2))
            draw.ellipse((box[0], box[2], box[1], box[3]), fill=tuple(rng.randint(0, 255) for _ in range(3)))
        image.save(folder / f"img{index:05d}.jpg", quality=88)
        (folder / f"img{index:05d}.txt").write_text(f"sks photo {index}, {rng.choice(['red', 'blue', 'green'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3000)
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as root:
        folder = Path(root) / "data"
        folder.mkdir()
        made = 0
        print(f"{'images':>7} {'seconds':>8} {'images/s':>9} {'peak RSS MiB':>13} {'torch imported':>15}")
        for target in (args.images // 4, args.images // 2, args.images):
            make_images(folder, target - made, made)
            made = target
            started = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", CHILD, str(folder)], capture_output=True, text=True, env=env)
            images, elapsed, peak, torch_imported = out.stdout.split()
            wall = time.perf_counter() - started
            print(
                f"{images:>7} {float(elapsed):8.1f} {int(images) / float(elapsed):9.0f} {float(peak):13.0f} "
                f"{torch_imported:>15}   (process wall {wall:.1f} s)"
            )


if __name__ == "__main__":
    main()
