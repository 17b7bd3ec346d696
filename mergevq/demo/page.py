"""``report.html``: the demo's summary as one self-contained page (every picture embedded as a base64 PNG).

The page is a pure function of ``summary.json`` and the PNG files it names, which sit beside it; nothing is fetched
when it is opened, so it can be mailed or archived as a single file.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

__all__ = ["render_report", "write_report"]

_STYLE = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d1d1f; margin: 0;
       background: #fafafa; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 64px; background: #fff; }
h1 { font-size: 28px; margin: 8px 0 4px; } h2 { margin-top: 40px; border-bottom: 1px solid #ddd; }
h3 { margin-bottom: 6px; }
.lead { font-size: 17px; color: #333; } .facts { color: #555; font-size: 14px; }
nav a { margin-right: 14px; }
figure { display: inline-table; margin: 6px 10px 12px 0; vertical-align: top; }
figcaption { display: table-caption; caption-side: bottom; font-size: 13px; color: #444; padding-top: 2px; }
img { max-width: 100%; height: auto; }
img.pixel { image-rendering: pixelated; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 14px; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: middle; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f4f4f4; padding: 10px 12px; font-size: 13px; white-space: pre-wrap; overflow-wrap: anywhere; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: 8px 12px; }
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: float | None, digits: int) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}"


class _Images:
    """Reads the PNGs named by the summary from ``folder`` and turns them into ``<img>`` tags."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def tag(
        self, name: str, *, alt: str, width: int | None = None, scale: float | None = None, pixelated: bool = False
    ) -> str:
        """``width``: display width in CSS pixels; ``scale``: display at this multiple of the PNG's own width."""
        path = self.folder / name
        try:
            data = path.read_bytes()
        except OSError as error:
            raise FileNotFoundError(f"the report needs {path}, which summary.json names: {error}") from error
        if scale is not None:
            with Image.open(io.BytesIO(data)) as image:
                width = round(image.width * scale)
        size = f' width="{width}"' if width else ""
        cls = ' class="pixel"' if pixelated else ""
        encoded = base64.b64encode(data).decode("ascii")
        return f'<img src="data:image/png;base64,{encoded}" alt="{_e(alt)}"{size}{cls}>'

    def figure(self, name: str, *, caption: str, width: int | None = None, pixelated: bool = False) -> str:
        image = self.tag(name, alt=caption, width=width, pixelated=pixelated)
        return f"<figure>{image}<figcaption>{_e(caption)}</figcaption></figure>"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], *, numeric: set[int] = frozenset()) -> str:
    """``rows`` hold HTML already; ``numeric``: column indices aligned right."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>" for i, c in enumerate(r))
        + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def _header(s: Mapping[str, Any]) -> list[str]:
    tok, gen, data = s["tokenizer"], s["generator"], s["data"]
    timing = s["timings"]["total_seconds_before_report"]
    machine = s["machine"]
    return [
        "<h1>MergeVQ on real photographs</h1>",
        '<p class="lead">MergeVQ turns an image into a grid of L tokens, <b>merges</b> them down to any K inside its '
        "encoder (recording which grid positions each merged token absorbed), quantizes the K tokens and decodes "
        "the full grid again. This page shows a tiny MergeVQ trained from scratch on this machine in minutes: its "
        "merge maps, its reconstructions of photos it never saw at K = L, L/2 and L/4, and a small generator "
        "trained on its tokens.</p>",
        f'<p class="facts">Tokenizer <code>{_e(tok["preset"])}</code> ({tok["parameters"] / 1e6:.2f}M parameters, '
        f"{tok['image_size']}×{tok['image_size']} px, L = {tok['num_positions']} tokens on a "
        f"{tok['grid'][0]}×{tok['grid'][1]} grid), {tok['steps']} training steps; "
        f"{_e(gen['kind'])} generator ({gen['parameters'] / 1e6:.2f}M parameters), {gen['steps']} steps. "
        f"Data: {len(data['train'])} training photos and {len(data['held_out'])} held-out photos from "
        f"{_e(data['source'])}. Whole run: {_minutes(timing)} on {machine['torch_threads']} CPU thread(s) "
        f"({_e(machine['device'])}, torch {_e(machine['torch'])}).</p>",
        '<nav><a href="#merge-maps">Merge maps</a><a href="#reconstruction">Reconstruction vs K</a>'
        '<a href="#training">Training curves</a><a href="#generation">Generated samples</a>'
        '<a href="#data">Photographs</a><a href="#next">Go further</a></nav>',
    ]


def _overview(s: Mapping[str, Any], images: _Images) -> str:
    rec, full = s["reconstruction"], s["tokenizer"]["num_positions"]
    photo = next(p for p in rec["photos"] if p["name"] == rec["overview"]["photo"])
    merged = [level["num_tokens"] for level in photo["levels"] if level["num_tokens"] < full]
    smallest = min(level["num_tokens"] for level in photo["levels"])
    maps = ", ".join(f"K = {k}" for k in merged) or f"K = {full}"
    caption = (
        f"{photo['name']}, held out of training: the photo, its merge maps at {maps} of L = {full} tokens per tile "
        f"(one coloured region per merged token) and its reconstruction from K = {smallest}."
    )
    return images.figure(rec["overview"]["file"], caption=caption, width=1120)


def _merge_maps(s: Mapping[str, Any], images: _Images) -> list[str]:
    rec, full = s["reconstruction"], s["tokenizer"]["num_positions"]
    out = [
        '<h2 id="merge-maps">Merge maps</h2>',
        "<p>Each coloured region is one merged token: the grid positions its encoder merged into one group (the "
        "rows of the source matrix S, made visible), with a black line where neighbouring positions belong to "
        "different groups. The photo is cut into tiles of the tokenizer's size and every tile is encoded with K "
        "merged tokens. The encoder merges the most similar pairs of tokens (by their attention keys) block after "
        "block, so groups tend to gather positions that look alike; after minutes of training many are still short "
        "runs along rows and columns. These photos were held out of training.</p>",
    ]
    for photo in rec["photos"]:
        out.append(f"<h3>{_e(photo['name'])} ({photo['size'][0]}×{photo['size'][1]} px, {photo['tiles']} tiles)</h3>")
        out.append(images.figure(photo["original"], caption="the held-out photo", width=360, pixelated=True))
        merged = [level for level in photo["levels"] if level["num_tokens"] < full] or photo["levels"]
        for level in merged:  # K = L merges nothing: every cell its own group
            caption = f"K = {level['num_tokens']} of {full} per tile: {level['num_groups']} groups over the photo"
            out.append(images.figure(level["merge_map"], caption=caption, width=360))
    return out


def _reconstruction(s: Mapping[str, Any], images: _Images) -> list[str]:
    rec, tok = s["reconstruction"], s["tokenizer"]
    full = tok["num_positions"]
    photo_scores: dict[int, list[dict[str, Any]]] = {}
    for photo in rec["photos"]:
        for level in photo["levels"]:
            photo_scores.setdefault(level["num_tokens"], []).append(level)
    rows = []
    for row in rec["crops"]:
        k = row["num_tokens"]
        whole = photo_scores.get(k, [])
        mean_psnr = sum(x["psnr"] for x in whole) / len(whole) if whole else None
        lpips = [x["lpips"] for x in whole if x["lpips"] is not None]
        rows.append(
            [
                f"{k}" + (" (L, no merging)" if k == full else f" (L/{full // k})" if full % k == 0 else ""),
                _fmt(row["psnr"], 2),
                _fmt(row["lpips"], 3),
                _fmt(mean_psnr, 2),
                _fmt(sum(lpips) / len(lpips) if lpips else None, 3),
            ]
        )
    num_crops = rec["crops"][0]["num_images"] if rec["crops"] else 0
    out = [
        '<h2 id="reconstruction">Reconstruction vs K</h2>',
        f"<p>Held-out data only: {num_crops} random {tok['image_size']}×{tok['image_size']} crops of the held-out "
        "photos, and the whole held-out photos (tiled). PSNR in dB, higher is better; LPIPS (shift-tolerant VGG "
        "LPIPS, offline weights), lower is better. Each figure is the mean over the images.</p>",
        _table(
            ["K merged tokens", "crops: PSNR", "crops: LPIPS", "whole photos: PSNR", "whole photos: LPIPS"],
            rows,
            numeric={1, 2, 3, 4},
        ),
    ]
    width = 265  # four pictures to a row: the original and three K
    for photo in rec["photos"]:
        out.append(f"<h3>{_e(photo['name'])}: original and reconstructions</h3>")
        out.append(images.figure(photo["original"], caption="original (held out)", width=width, pixelated=True))
        for level in photo["levels"]:
            caption = (
                f"K = {level['num_tokens']} per tile: PSNR {_fmt(level['psnr'], 2)} dB, LPIPS {_fmt(level['lpips'], 3)}"
            )
            out.append(images.figure(level["reconstruction"], caption=caption, width=width, pixelated=True))
    out.append("<h3>Held-out crops, enlarged</h3>")
    out.append(
        "<p>Each row: the input crop, then for every K its merge map over the crop and the reconstruction "
        "(PSNR in the label).</p>"
    )
    for panel in rec["panels"]:
        out.append(images.figure(panel["file"], caption=f"a crop of {panel['photo']}"))
    return out


def _training(s: Mapping[str, Any], images: _Images) -> list[str]:
    curves = s["curves"]
    captions = {
        "tokenizer_loss": "Tokenizer: L1 reconstruction loss on the training crops (mean over each logging window).",
        "tokenizer_psnr": "Tokenizer: PSNR of the EMA weights on held-out crops during training, at the default K "
        "and at K = L.",
        "generator_loss": "Generator: cross-entropy of the next code on the training tokens.",
    }
    out = ['<h2 id="training">Training curves</h2>']
    for name, caption in captions.items():
        if name in curves:
            out.append(images.figure(curves[name], caption=caption, width=560))
    return out


def _generation(s: Mapping[str, Any], images: _Images) -> list[str]:
    gen, tok = s["generator"], s["tokenizer"]
    sampling = gen.get("sampling") or {}
    speed = sampling.get("speed") or {}
    groups = sampling.get("distinct_groups") or {}
    scale = 2  # 32-px samples shown at 64 px, as large as the merge maps below
    rows = []
    for entry in gen["classes"]:
        source = images.tag(
            next(p["thumbnail"] for p in s["data"]["train"] if p["name"] == entry["photo"]),
            alt=f"training photo {entry['photo']}",
            width=96,
        )
        samples = images.tag(entry["samples"], alt=f"samples of class {entry['class']}", scale=scale, pixelated=True)
        maps = ""
        if entry["merge_map"]:
            alt = f"merge maps of class {entry['class']}"
            # merge_map() drew each tile at >= 128 px so that its boundaries show; halve it to sit beside the samples.
            maps = images.tag(entry["merge_map"], alt=alt, scale=0.5)
        rows.append([f"{entry['class']}: {_e(entry['photo'])}<br>{source}", samples + ("<br>" + maps if maps else "")])
    stats = []
    if groups:
        stats.append(f"distinct groups per image {groups.get('mean', 0):.1f} (asked for K = {gen['num_tokens']})")
    if speed.get("end_to_end_images_per_s"):
        stats.append(f"{speed['end_to_end_images_per_s']:.1f} images/s end to end")
    if sampling.get("peak_cache_bytes"):
        stats.append(f"peak KV cache {sampling['peak_cache_bytes'] / 1024:.0f} KiB")
    return [
        '<h2 id="generation">Generated samples</h2>',
        f"<p>A class-conditional {_e(gen['kind'])} generator trained on the tokenizer's codes of the training crops; "
        f"the class of a crop is the photo it was cut from. Each sample is a {tok['grid'][0]}×{tok['grid'][1]} grid "
        f"of codes generated at merge level K = {gen['num_tokens']} and decoded by the tokenizer; its merge map "
        "shows the groups read from the repeated codes. After minutes of training expect the colours and textures "
        "of each photo rather than recognisable objects.</p>",
        f'<p class="facts">{_e("; ".join(stats))}.</p>' if stats else "",
        _table(["class (training photo)", "samples, and below them their merge maps"], rows),
    ]


def _data(s: Mapping[str, Any], images: _Images) -> list[str]:
    data = s["data"]
    rows = []
    for split, photos in (("training", data["train"]), ("held out", data["held_out"])):
        for p in photos:
            thumb = images.tag(p["thumbnail"], alt=p["name"], width=72)
            rows.append([thumb, _e(p["name"]), split, f"{p['size'][0]}×{p['size'][1]}", _e(p["credit"] or "—")])
    settings = s["settings"]
    return [
        '<h2 id="data">Photographs</h2>',
        f"<p>Source: {_e(data['source'])}. Training uses {settings['crops_per_photo']} random crops per training "
        f"photo, taken from the photo resized to a shorter side of {', '.join(map(str, settings['crop_scales']))} "
        f"px; evaluation uses only the held-out photos (whole, at a shorter side of {settings['photo_side']} px). "
        "Credits and licences as stated in the scikit-image wheel.</p>",
        _table(["", "name", "split", "pixels", "source and licence"], rows),
    ]


def _next(s: Mapping[str, Any]) -> list[str]:
    cmds = s["commands"]
    tok = s["tokenizer"]
    ran = "\n".join(cmds["tokenizer"] + cmds["generator"])
    further = "\n".join(
        [
            "# this demo on your own photos (any folder of images; two whole photos are held out)",
            "mergevq demo --data ~/Pictures/holiday --output demo_mine",
            "# reconstruct any images with the demo tokenizer, merge maps side by side",
            f"mergevq reconstruct --model {tok['export']} --input photos/ --num-tokens 16 32 64 --output recon/",
            "# continue training the demo tokenizer (it resumes from its checkpoint)",
            f"mergevq train-tokenizer {tok['recipe']} max_steps=3000",
            "# CIFAR-10 (ImageFolder layout): tokenizer, tokens, generator, samples",
            "mergevq train-tokenizer configs/cifar10/gr.yaml data.train=cifar10/train data.val=cifar10/test",
            "mergevq encode --model runs/cifar10-gr/export --data cifar10/train --num-tokens 16 32 64 \\",
            "    --output runs/tokens/cifar10_train.safetensors",
            "mergevq encode --model runs/cifar10-gr/export --data cifar10/test --num-tokens 16 32 64 \\",
            "    --output runs/tokens/cifar10_test.safetensors --split-name val",
            "mergevq train-generator configs/cifar10/mergear.yaml",
            "# several GPUs or machines: the same commands under torchrun",
            "torchrun --nproc_per_node=8 -m mergevq train-tokenizer configs/imagenet/gr-d64.yaml "
            "data.train=/data/imagenet/train",
        ]
    )
    return [
        '<h2 id="next">Go further</h2>',
        "<p>The stages of this demo, as it ran them (rerun any of them as is):</p>",
        f"<pre>{_e(ran)}</pre>",
        "<p>Next steps:</p>",
        f"<pre>{_e(further)}</pre>",
        '<p class="note">What the demo leaves out, for time: the perceptual and adversarial losses and the '
        "representation alignment of the CLS token (it needs a teacher such as DINOv2, whose weights are not "
        "shipped). Every command has a complete <code>--help</code>.</p>",
    ]


def _footer(s: Mapping[str, Any]) -> list[str]:
    stages = s["timings"]["stages"]
    parts = ", ".join(f"{name} {_minutes(seconds)}" for name, seconds in stages.items())
    command = s.get("command") or "mergevq demo"
    return [
        "<hr>",
        f'<p class="facts">Produced by <code>{_e(command)}</code>. Stages: {_e(parts)}. '
        f"Python {_e(s['machine']['python'])}, {_e(s['machine']['platform'])}, "
        f"{s['machine']['logical_cpus']} logical CPUs. All numbers: <code>summary.json</code> beside this page.</p>",
    ]


def render_report(*, summary: Mapping[str, Any], folder: Path) -> str:
    """The page's HTML for ``summary`` (the demo's summary.json), embedding the PNGs it names from ``folder``."""
    images = _Images(folder)
    body = [
        *_header(summary),
        _overview(summary, images),
        *_merge_maps(summary, images),
        *_reconstruction(summary, images),
        *_training(summary, images),
        *_generation(summary, images),
        *_data(summary, images),
        *_next(summary),
        *_footer(summary),
    ]
    return (
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>MergeVQ demo</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n<main>\n"
        + "\n".join(part for part in body if part)
        + "\n</main>\n</body>\n</html>\n"
    )


def write_report(*, output: Path, summary: Mapping[str, Any]) -> Path:
    """Write ``output/report.html`` from ``summary`` and the PNGs in ``output``."""
    path = output / "report.html"
    path.write_text(render_report(summary=summary, folder=output), encoding="utf-8")
    return path
