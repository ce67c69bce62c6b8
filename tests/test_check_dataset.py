"""`lora-check-dataset` on a folder with one planted example of every problem it must find."""

from __future__ import annotations

import json
import random
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from datasets_tools.check import CheckOptions, check_dataset
from tests.conftest import run_command

CLEAN = [f"clean_{i}" for i in range(8)]
WORDS = ("red", "blue", "green", "yellow", "purple", "orange", "black", "white")


def picture(seed: int, size: tuple[int, int] = (96, 96)) -> Image.Image:
    """A distinct picture per seed (random polygons), so clean images are never near-duplicates."""
    rng = random.Random(seed)
    image = Image.new("RGB", size, tuple(rng.randint(0, 255) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        points = [(rng.uniform(0, size[0]), rng.uniform(0, size[1])) for _ in range(4)]
        draw.polygon(points, fill=tuple(rng.randint(0, 255) for _ in range(3)))
    return image


def caption(folder: Path, stem: str, text: str | bytes, extension: str = ".txt") -> None:
    path = folder / f"{stem}{extension}"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())


def bomb_png(path: Path, side: int) -> None:
    """A valid PNG header that declares side x side pixels (with correct CRCs) and no real data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("planted")
    for i, stem in enumerate(CLEAN):
        picture(i).save(folder / f"{stem}.png")
        caption(folder, stem, f"sks, picture number {i}, {WORDS[i]}")
    # Files
    picture(100).save(folder / "truncated.jpg", quality=90)
    data = (folder / "truncated.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "zero.png").write_bytes(b"")
    bomb_png(folder / "bomb.png", 60_000)
    picture(101).save(folder / "liar.jpg", format="PNG")
    frames = [picture(102 + k) for k in range(3)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:])
    (folder / "photo.heic").write_bytes(b"\x00" * 64)
    (folder / ".DS_Store").write_bytes(b"\x00\x01")
    # Pixels
    picture(110).convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6
    picture(111, (120, 90)).save(folder / "rotated.jpg", exif=exif, quality=95)
    rgba = picture(112).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(folder / "alpha.png")
    picture(113).convert("L").save(folder / "gray.png")
    Image.new("RGB", (1, 1), "red").save(folder / "tiny.png")
    picture(114, (400, 60)).save(folder / "panorama.png")
    # Captions
    picture(120).save(folder / "latin1.png")
    caption(folder, "latin1", "sks caf\xe9 au lait".encode("latin-1"))
    picture(121).save(folder / "other_ext.png")
    caption(folder, "other_ext", "sks with a .caption file", ".caption")
    picture(122).save(folder / "blank.png")
    caption(folder, "blank", "   \n")
    picture(123).save(folder / "uncaptioned.png")
    caption(folder, "ghost", "sks caption without an image")
    picture(124).save(folder / "no_trigger.png")
    caption(folder, "no_trigger", "a caption that forgot the word")
    picture(125).save(folder / "long.png")
    caption(folder, "long", "sks " + " ".join(["red circle"] * 60))
    for stem in ("same_a", "same_b", "same_c"):
        picture(126 + len(stem)).save(folder / f"{stem}.png")
        caption(folder, stem, "sks one caption for several images")
    # Duplicates
    picture(3).save(folder / "copy_of_clean_3.bmp")
    caption(folder, "copy_of_clean_3", "sks copy")
    picture(5).resize((80, 80), Image.Resampling.LANCZOS).save(folder / "resized_clean_5.jpg", quality=80)
    caption(folder, "resized_clean_5", "sks resized copy")
    picture(6).crop((5, 5, 91, 91)).save(folder / "cropped_clean_6.png")
    caption(folder, "cropped_clean_6", "sks lightly cropped copy")
    # A kohya repeat folder
    (folder / "3_extra").mkdir()
    picture(130).save(folder / "3_extra" / "repeat.png")
    caption(folder / "3_extra", "repeat", "sks from a repeat folder")
    return folder


@pytest.fixture(scope="module")
def report(planted: Path, tiny_sd: Path):
    from lora_cli.cli.check_dataset import _token_counter

    count, limit, _ = _token_counter(str(tiny_sd / "tokenizer"))
    options = CheckOptions(
        resolution=64,
        caption_extensions=[".txt"],
        batch_size=2,
        trigger="sks",
        count_tokens=count,
        max_tokens=limit,
        workers=1,
    )
    return check_dataset(planted, options)


EXPECTED = [
    ("truncated.jpg", "error", "truncated"),
    ("zero.png", "error", "zero-byte"),
    ("bomb.png", "error", "decompression-bomb"),
    ("liar.jpg", "warning", "extension-mismatch"),
    ("animated.gif", "warning", "animated"),
    ("photo.heic", "warning", "unsupported-format"),
    ("cmyk.jpg", "warning", "mode"),
    ("rotated.jpg", "info", "exif-rotation"),
    ("alpha.png", "warning", "alpha"),
    ("gray.png", "info", "mode"),
    ("tiny.png", "error", "too-small"),
    ("panorama.png", "warning", "aspect"),
    ("latin1.txt", "error", "not-utf8"),
    ("other_ext.caption", "warning", "caption-extension"),
    ("blank.txt", "warning", "empty-caption"),
    ("uncaptioned.png", "warning", "missing-caption"),
    ("ghost.txt", "warning", "orphan-caption"),
    ("no_trigger.txt", "warning", "trigger-missing"),
    ("long.txt", "warning", "too-long"),
]


@pytest.mark.parametrize(("name", "severity", "code"), EXPECTED, ids=[e[0] for e in EXPECTED])
def test_each_planted_problem_is_found(report, name: str, severity: str, code: str) -> None:
    matches = [f for f in report.findings if Path(f.file).name == name and f.code == code]
    assert matches, f"{name}: expected {code}; found {[(f.code, Path(f.file).name) for f in report.findings]}"
    assert matches[0].severity == severity and matches[0].reason and matches[0].fix


def test_duplicates_buckets_and_variety(report, planted: Path) -> None:
    exact = [sorted(Path(p).name for p in c) for c in report.exact_duplicates]
    assert ["clean_3.png", "copy_of_clean_3.bmp"] in exact
    near = [sorted(Path(p).name for p in c) for c in report.near_duplicates]
    assert ["clean_5.png", "resized_clean_5.jpg"] in near
    assert ["clean_6.png", "cropped_clean_6.png"] in near
    assert len(near) == 2  # distinct pictures are never grouped
    shared = next(f for f in report.findings if f.code == "shared-caption")
    assert 'the caption "sks one caption for several images" is on' in shared.reason
    assert ".png" in shared.reason  # names the files
    assert Path(shared.file).is_file()
    assert any(f.code == "thin-bucket" for f in report.findings)  # the panorama's bucket holds one image
    assert sum(report.buckets.values()) == report.images - 4  # truncated, zero-byte, bomb and 1x1 are not usable
    assert report.images == len([p for p in planted.rglob("*") if p.suffix in {".png", ".jpg", ".gif", ".bmp"}])


def test_clean_images_and_hidden_files_are_not_flagged(report) -> None:
    flagged = {Path(f.file).name for f in report.findings if f.severity != "info"}
    clean = {f"{stem}.png" for stem in CLEAN} - {"clean_3.png", "clean_5.png", "clean_6.png"}  # planted copies
    assert not flagged & clean, flagged & clean
    assert not any(".DS_Store" in f.file for f in report.findings)


def run_checker(*args: str) -> subprocess.CompletedProcess:
    return run_command("check_dataset", *args)


def test_cli_exit_codes_json_and_one_line_errors(planted: Path, tmp_path: Path) -> None:
    result = run_checker(str(planted), "--resolution", "64", "--json")
    assert result.returncode == 2
    data = json.loads(result.stdout)
    assert data["counts"]["error"] >= 4 and {"severity", "category", "code", "file", "reason", "fix"} <= set(
        data["findings"][0]
    )

    clean = tmp_path / "clean"
    clean.mkdir()
    for i in range(16):
        picture(200 + i, (80, 80)).save(clean / f"img{i}.png")
        caption(clean, f"img{i}", f"sks picture {i} " + "abcdefghijklmnop"[i])
    assert run_checker(str(clean), "--resolution", "64").returncode == 0
    caption(clean, "img0", " ")
    assert run_checker(str(clean), "--resolution", "64").returncode == 0
    assert run_checker(str(clean), "--resolution", "64", "--strict").returncode == 1
    rendered = run_checker(str(clean), "--resolution", "64").stdout
    assert "Findings" in rendered and "empty-caption" in rendered and "Aspect-ratio buckets" in rendered

    missing = run_checker(str(tmp_path / "nope"))
    assert (
        missing.returncode == 2 and missing.stderr.strip().startswith("error: ") and "no such folder" in missing.stderr
    )
    assert "Traceback" not in missing.stderr


def test_metadata_jsonl_datasets(tmp_path: Path) -> None:
    for i in range(6):
        picture(300 + i).save(tmp_path / f"m{i}.png")
    lines = [json.dumps({"file_name": f"m{i}.png", "text": f"picture {i}"}) for i in range(6)]
    lines += ["not json", json.dumps({"file_name": "absent.png", "text": "x"})]
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines))
    report = check_dataset(tmp_path, CheckOptions(resolution=64, workers=1))
    assert report.images == 6
    assert {f.code for f in report.findings if f.severity == "error"} == {"bad-metadata", "missing-image"}
