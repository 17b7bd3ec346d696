"""``mergevq demo``: a real run at the ``--quick`` budget, its summary and report (opened in headless Chromium), and
the parts the pipeline is built from (photos, tiles, output folder, page)."""

from __future__ import annotations

import base64
import io
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image

import mergevq.cli
from mergevq import MergeVQ
from mergevq.demo.page import render_report
from mergevq.demo.photos import (
    BUILTIN_HELD_OUT,
    BUILTIN_PHOTOS,
    DemoDataError,
    builtin_photo_dir,
    fit_for_tiling,
    load_folder_photos,
    write_training_crops,
)
from mergevq.demo.reconstruction import merge_levels
from mergevq.demo.run import prepare_output
from mergevq.demo.settings import DemoSettings
from mergevq.demo.tiles import reconstruct_tiled, stitch, tile
from mergevq.train.output_lock import release_output_dir

_CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _builtin_available() -> bool:
    try:
        builtin_photo_dir()
    except DemoDataError:
        return False
    return True


needs_photos = pytest.mark.skipif(
    not _builtin_available(), reason="the scikit-image wheel is not installed (pip install --no-deps scikit-image)"
)


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory, mergevq_cli) -> Path:
    """The real demo on the built-in photographs at the --quick budget (every stage, a few steps each)."""
    if not _builtin_available():
        pytest.skip("the scikit-image wheel is not installed (pip install --no-deps scikit-image)")
    out = tmp_path_factory.mktemp("demo") / "demo_out"
    assert mergevq_cli("demo", "--quick", "--output", out, "--no-progress", "--threads", "1") == 0
    return out


# ----------------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------------


def test_summary_holds_every_stage(quick_demo: Path) -> None:
    summary = json.loads((quick_demo / "summary.json").read_text())
    quick = DemoSettings.quick()
    assert summary["kind"] == "mergevq_demo"
    data = summary["data"]
    assert [p["name"] for p in data["held_out"]] == list(BUILTIN_HELD_OUT)
    assert len(data["train"]) == len(BUILTIN_PHOTOS) - len(BUILTIN_HELD_OUT)
    assert [p["class"] for p in data["train"]] == list(range(len(data["train"])))
    assert all(p["credit"] for p in data["train"] + data["held_out"])  # every built-in photo states its licence

    tok = summary["tokenizer"]
    assert tok["preset"] == "tiny-32" and tok["num_positions"] == 64 and tok["steps"] == quick.tokenizer_steps
    rec = summary["reconstruction"]
    assert rec["num_tokens"] == [64, 32, 16]
    num_crops = quick.eval_crops_per_photo * len(BUILTIN_HELD_OUT)
    for row in rec["crops"]:
        assert row["num_images"] == num_crops == len(row["psnr_per_image"]) == len(row["lpips_per_image"])
        assert 0 < row["psnr"] < 60 and 0 <= row["lpips"] < 2
    for photo in rec["photos"]:
        width, height = photo["size"]
        assert height == quick.photo_side and width % 32 == 0 and photo["tiles"] == (width // 32) * (height // 32)
        assert [level["num_tokens"] for level in photo["levels"]] == [64, 32, 16]
        for level in photo["levels"]:
            assert level["num_groups"] == level["num_tokens"] * photo["tiles"]
            with Image.open(quick_demo / level["reconstruction"]) as image:
                assert image.size == (width, height)
            with Image.open(quick_demo / level["merge_map"]) as image:
                assert image.size[0] > width  # enlarged so that the group boundaries show

    gen = summary["generator"]
    assert gen["kind"] == "mergear" and gen["steps"] == quick.generator_steps and gen["num_tokens"] == 32
    assert [c["class"] for c in gen["classes"]] == list(range(len(data["train"])))
    assert gen["sampling"]["distinct_groups"]["mean"] >= 1
    for name in ("tokenizer_loss", "tokenizer_psnr", "generator_loss"):
        assert (quick_demo / summary["curves"][name]).is_file(), name
    assert set(summary["timings"]["stages"]) == {"data", "tokenizer", "reconstruction", "generator"}


def test_listed_commands_are_valid_and_their_recipes_exist(quick_demo: Path) -> None:
    summary = json.loads((quick_demo / "summary.json").read_text())
    commands = summary["commands"]["tokenizer"] + summary["commands"]["generator"]
    assert [c.split()[1] for c in commands] == ["train-tokenizer", "encode", "train-generator", "sample"]
    parser = mergevq.cli.build_parser()
    for command in commands:
        argv = shlex.split(command)
        assert argv[0] == "mergevq"
        args = parser.parse_args(argv[1:])  # exits (a test failure) on an unknown option
        if argv[1].startswith("train-"):
            assert Path(args.config).is_file(), command
    assert (quick_demo / "work" / "tokenizer" / "export" / "config.json").is_file()
    MergeVQ.from_pretrained(quick_demo / "work" / "tokenizer" / "export")  # the model the report describes


def _embedded_images(page: str) -> list[bytes]:
    return [base64.b64decode(data) for data in re.findall(r'<img src="data:image/png;base64,([^"]+)"', page)]


def test_report_is_self_contained(quick_demo: Path) -> None:
    page = (quick_demo / "report.html").read_text()
    assert page.count("<img ") == len(_embedded_images(page)) > 20  # every picture is embedded
    assert not re.search(r'(src|href)="(https?:|file:|//)', page)  # nothing is fetched
    for data in _embedded_images(page):
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            assert image.format == "PNG" and image.width > 0
    for anchor in ("merge-maps", "reconstruction", "training", "generation", "data", "next"):
        assert f'id="{anchor}"' in page
    summary = json.loads((quick_demo / "summary.json").read_text())
    for command in summary["commands"]["tokenizer"] + summary["commands"]["generator"]:
        assert command.replace("&", "&amp;").replace("'", "&#x27;").replace('"', "&quot;") in page
    assert "torchrun --nproc_per_node=8 -m mergevq" in page and "configs/cifar10/" in page
    # A pure function of the summary and the PNGs.
    assert render_report(summary=summary, folder=quick_demo) == page


def test_only_a_demo_folder_is_cleared_for_a_new_run(tmp_path: Path, capsys) -> None:
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert mergevq.cli.main(["demo", "--quick", "--output", str(other)]) == 2
    err = capsys.readouterr().err
    assert "not empty and was not written by `mergevq demo`" in err and str(other) in err
    assert (other / "keep.txt").read_text() == "mine"

    demo = tmp_path / "demo_out"
    for _ in range(2):  # a fresh folder, then the same folder again: emptied but for the marker
        prepared = prepare_output(output=demo)
        release_output_dir(prepared)
        assert sorted(p.name for p in prepared.iterdir()) == [".lock", ".mergevq-demo"]
        (prepared / "report.html").write_text("old")
        (prepared / "work").mkdir()


# ----------------------------------------------------------------------------------------------------------------------
# In a browser
# ----------------------------------------------------------------------------------------------------------------------

_PROBE = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const broken = images.filter((img) => !(img.complete && img.naturalWidth > 0));
  document.body.setAttribute("data-images", String(images.length));
  document.body.setAttribute("data-broken", String(broken.length));
});
</script>"""


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    base = [
        _CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
    ]
    return subprocess.run([*base, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(_CHROMIUM is None, reason="no Chromium installed (Debian: apt-get install chromium)")
def test_report_opens_in_chromium_with_every_image_loaded(quick_demo: Path, tmp_path: Path) -> None:
    page = (quick_demo / "report.html").read_text()
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", _PROBE + "\n</body>"))
    result = _chromium("--virtual-time-budget=10000", "--dump-dom", probe.as_uri(), profile=tmp_path / "profile")
    found = re.search(r'<body data-images="(\d+)" data-broken="(\d+)"', result.stdout)
    assert found, f"the probe did not run: {result.stderr[-2000:]}"
    images, broken = int(found.group(1)), int(found.group(2))
    assert images == page.count("<img ") and broken == 0

    screenshot = quick_demo / "report_screenshot.png"
    size = "--window-size=1280,3200"
    result = _chromium(
        f"--screenshot={screenshot}", size, (quick_demo / "report.html").as_uri(), profile=tmp_path / "p2"
    )
    assert screenshot.is_file(), result.stderr[-2000:]
    with Image.open(screenshot) as shot:
        assert shot.size == (1280, 3200)
        assert len(shot.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 1000  # text and photos, not a blank page


# ----------------------------------------------------------------------------------------------------------------------
# Parts
# ----------------------------------------------------------------------------------------------------------------------


def test_merge_levels_are_l_half_and_quarter() -> None:
    assert merge_levels(64) == [64, 32, 16]
    assert merge_levels(256) == [256, 128, 64]
    assert merge_levels(2) == [2, 1]  # L/4 rounds to 0: dropped
    assert merge_levels(1) == [1]


def test_tile_and_stitch_are_inverse() -> None:
    image = torch.arange(3 * 64 * 96, dtype=torch.float32).reshape(3, 64, 96)
    tiles = tile(image, size=32)
    assert tiles.shape == (6, 3, 32, 32)
    assert torch.equal(tiles[1], image[:, :32, 32:64]) and torch.equal(tiles[3], image[:, 32:, :32])  # raster order
    assert torch.equal(stitch(tiles, rows=2, cols=3), image)
    with pytest.raises(ValueError, match="does not split into 32x32 tiles"):
        tile(image[:, :50], size=32)


def test_tiled_reconstruction_gives_every_tile_its_own_groups(tiny_tokenizer_dir: Path) -> None:
    model = MergeVQ.from_pretrained(tiny_tokenizer_dir).eval()
    image = torch.rand(3, 64, 96, generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = reconstruct_tiled(model=model, image=image, num_tokens=16)
    assert out.reconstruction.shape == image.shape and out.grid == (16, 24) and out.num_groups == 6 * 16
    assert out.assignment.shape == (16, 24)
    assert sorted(out.assignment.unique().tolist()) == list(range(96))  # 16 groups in each of the 6 tiles
    for t in range(6):  # tile t (8x8 cells) holds exactly groups 16t .. 16t + 15
        r, c = divmod(t, 3)
        cells = out.assignment[8 * r : 8 * r + 8, 8 * c : 8 * c + 8]
        assert sorted(cells.unique().tolist()) == list(range(16 * t, 16 * t + 16))
    # The same as encoding the tiles one by one.
    first = model.decode(model.encode(image[None, :, :32, :32], num_tokens=16)).clamp(-1, 1)[0]
    torch.testing.assert_close(out.reconstruction[:, :32, :32], first, rtol=0, atol=1e-5)


def test_folder_photos_hold_out_whole_photos(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    colours = ["red", "green", "blue", "yellow", "white"]
    for i, colour in enumerate(colours):  # ImageFolder layout: two sub-folders
        folder = root / ("city" if i < 3 else "sea")
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (60 + 10 * i, 40), colour).save(folder / f"{i}_{colour}.png")
    photos = load_folder_photos(root=root, held_out=2, max_photos=16)
    names = [p.name for p in photos.train + photos.held_out]
    assert sorted(names) == ["city_0_red", "city_1_green", "city_2_blue", "sea_3_yellow", "sea_4_white"]
    # Held out: spread over the sorted list (the 2nd and 4th), so both sub-folders keep training photos.
    assert [p.name for p in photos.held_out] == ["city_1_green", "sea_3_yellow"]
    assert photos.class_names == ["city_0_red", "city_2_blue", "sea_4_white"]
    assert str(root) in photos.source
    assert [p.image.size for p in photos.train] == [(60, 40), (80, 40), (100, 40)]

    crops = write_training_crops(
        photos=photos.train, output=tmp_path / "crops", count=5, size=32, scales=(32, 48), seed=0
    )
    folders = sorted(p.name for p in crops.iterdir())
    assert folders == [f"{i:02d}_{p.name}" for i, p in enumerate(photos.train)]  # class index = photo index
    for folder in crops.iterdir():
        files = sorted(folder.iterdir())
        assert len(files) == 5
        with Image.open(files[0]) as crop:
            assert crop.size == (32, 32)

    with pytest.raises(DemoDataError, match="at least 2"):
        single = tmp_path / "single"
        single.mkdir()
        Image.new("RGB", (40, 40)).save(single / "a.png")
        load_folder_photos(root=single, held_out=2, max_photos=16)
    with pytest.raises(DemoDataError, match="does not exist"):
        load_folder_photos(root=tmp_path / "missing", held_out=2, max_photos=16)


def test_fit_for_tiling_keeps_whole_tiles() -> None:
    fitted = fit_for_tiling(Image.new("RGB", (451, 300)), shorter=128, multiple=32)
    assert fitted.size == (192, 128)  # 451·128/300 = 192.4 → 192, a multiple of 32
    fitted = fit_for_tiling(Image.new("RGB", (300, 700)), shorter=64, multiple=32)
    assert fitted.size == (64, 128)  # 700·64/300 = 149 → 128


@needs_photos
def test_builtin_photos_are_the_wheels_files() -> None:
    folder = builtin_photo_dir()
    for source in BUILTIN_PHOTOS:
        with Image.open(folder / source.file) as image:
            assert min(image.size) >= 256, source.file  # large enough for crops at every demo scale
    assert set(BUILTIN_HELD_OUT) <= {s.name for s in BUILTIN_PHOTOS}


def test_settings_reject_nonsense() -> None:
    with pytest.raises(ValueError, match="tokenizer_steps"):
        DemoSettings(tokenizer_steps=0)
    with pytest.raises(ValueError, match="crop_scales"):
        DemoSettings(crop_scales=())
    assert DemoSettings().replace(tokenizer_steps=None, seed=3) == DemoSettings(seed=3)  # None keeps the default


def test_help_documents_every_option(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        mergevq.cli.main(["demo", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps to the terminal's width
    demo = mergevq.cli.build_parser()._subparsers._group_actions[0].choices["demo"]  # type: ignore[union-attr]
    for action in demo._actions:
        assert action.help, f"{action.option_strings} has no help"
        for option in action.option_strings:
            assert option in text, option
    assert "examples:" in text and "report.html" in text and "scikit-image" in text
    assert f"default: {DemoSettings().tokenizer_steps}; --quick: {DemoSettings.quick().tokenizer_steps}" in text
    assert "demo" in mergevq.cli.build_parser().format_help()  # listed by `mergevq --help`
