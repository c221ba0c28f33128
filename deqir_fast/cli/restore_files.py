"""restore's files, all checked before the model loads: the model folder's config (its
channels, size and schedule length, read without the weights), the inputs the INPUT
arguments name, read and brought to the size the task takes, and the outputs --out names,
with the bits each is written at."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

from .. import image_io as io
from .. import models
from .reporting import Reporter


@dataclass
class ModelSpec:
    """What a model folder's config says, read without loading the weights."""
    folder: Path
    channels: int
    size: Tuple[int, int]
    train_steps: int


BUNDLED_MODEL = Path(__file__).resolve().parents[1] / "assets" / "model"


def read_model_spec(folder: Path) -> ModelSpec:
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--model {folder} is not a folder (a diffusers UNet2DModel folder "
                         f"with config.json and weights is expected)")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ValueError(f"--model {folder} has no config.json (a diffusers UNet2DModel folder "
                         f"is expected)")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise ValueError(f"--model {folder} holds no weights (*.safetensors or *.bin)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        sample = config["sample_size"]
        sample = [sample, sample] if isinstance(sample, int) else sample
        size = tuple(int(s) for s in sample)
        channels = int(config.get("in_channels", 3))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"--model {folder}: cannot read sample_size and in_channels from "
                         f"config.json ({exc})") from None
    train_steps = 1000
    # The model's own schedule, if a scheduler config comes with it, bounds --steps.
    find = getattr(models, "find_scheduler_config", None)
    found = find(folder) if find is not None else None
    if found is not None:
        schedule = models.read_scheduler_config(found)[0]
        train_steps = schedule.num_train_timesteps
    return ModelSpec(folder, channels, size, train_steps)


def gather_inputs(items: List[str]) -> List[Path]:
    """Every file the INPUT arguments name, in order, each once."""
    seen, paths = set(), []
    for item in items:
        for path in io.image_files(item):
            key = path.resolve()
            if key not in seen:
                seen.add(key)
                paths.append(path)
    return paths


def plan_outputs(out: Optional[str], inputs: List[Path], simulate: bool):
    """(output path per input, comparison figure path or None), checked writable.

    ``--out`` names a file for one input, or a folder (ending in / or already one) that
    receives INPUT-STEM.png for each input."""
    several = len(inputs) > 1
    if out is None:
        out = "restored/" if several else "restored.png"
    is_folder = out.endswith(("/", os.sep)) or Path(out).is_dir()
    if several and not is_folder:
        raise ValueError(f"{len(inputs)} inputs need --out to name a folder (end it with /), "
                         f"got --out {out}")
    if is_folder:
        folder = Path(out)
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"--out {out} is a file, not a folder")
        io.check_folder_writable(folder, f"--out {out}")
        paths = [folder / f"{p.stem}.png" for p in inputs]
        figure = folder / "compare.png" if simulate else None
    else:
        path = Path(out)
        io.output_format(path)
        io.check_writable(path)
        paths = [path]
        figure = path.with_name(f"{path.stem}_compare.png") if simulate else None
    for path in paths + ([figure] if figure else []):
        if path.exists() and not os.access(path, os.W_OK):
            raise ValueError(f"--out: {path} exists and is read-only")
    named = [(f"the output of {p}", o) for p, o in zip(inputs, paths)]
    io.unique_outputs(named + ([("the comparison figure", figure)] if figure else []), inputs)
    return paths, figure


def prepare_pixels(paths: List[Path], channels: int, size: Tuple[int, int], args,
                   reporter: Reporter, wrong_size: str):
    """Read every input and bring it to ``channels`` x ``size``, or fail naming the input
    (``wrong_size`` says what the task takes). Returns (pixels, bits of each input)."""
    prepared, depths = [], []
    for path in paths:
        picture = io.read_image(path)
        for text in picture.notes:
            reporter.note(text)
        pixels = picture.pixels
        if pixels.shape[-1] != channels:
            if channels == 1:
                reporter.note(f"{path.name}: colour, but {args.task} measures grey: using the "
                              f"mean of its channels")
            elif pixels.shape[-1] == 1:
                reporter.note(f"{path.name}: grey, repeated into {channels} channels")
            pixels = io.match_channels(pixels, channels)
        h, w = pixels.shape[:2]
        if (h, w) != tuple(size):
            if not (args.resize or args.crop):
                raise ValueError(f"INPUT {path} is {h}x{w}, but {wrong_size} (--resize scales "
                                 f"an input, --crop cuts its centre, both do both)")
            pixels = io.fit_size(pixels, size, args.resize, args.crop, name=f"INPUT {path}")
            how = {(True, False): "resized", (False, True): "cropped"}.get(
                (args.resize, args.crop), "resized and cropped")
            reporter.note(f"{path.name}: {how} from {h}x{w} to {size[0]}x{size[1]}")
        if args.simulate and args.task == "colorize" and _is_grey(pixels):
            # The truth is then grey too: the pseudo-inverse (the channel mean repeated) is
            # exact, so the baseline scores >100 dB and no score measures colourisation.
            reporter.note(f"{path.name}: grey (its channels are equal), so colorize has no "
                          f"colour to restore: the truth is grey, the baseline reproduces it "
                          f"exactly, and the scores only say how far the restoration strays "
                          f"from grey; simulate with a colour image")
        prepared.append(pixels)
        depths.append(picture.bits)
    return prepared, depths


def _is_grey(pixels) -> bool:
    """Every pixel's channels within half an 8-bit level of each other."""
    return pixels.shape[-1] == 1 or float((pixels.max(-1) - pixels.min(-1)).max()) <= 0.5 / 255


def output_depths(outputs: List[Path], depths: List[int], channels: int,
                  reporter: Reporter) -> List[int]:
    """Each output's bits per sample: 16 for an input of more than 8 bits where the format
    stores 16 (``image_io.can_write_16bit``), else 8, with a note when depth is lost."""
    bits = []
    for path, depth in zip(outputs, depths):
        fmt = io.output_format(path)
        keep = depth > 8 and io.can_write_16bit(fmt, channels)
        if depth > 8 and not keep:
            reporter.note(f"{path.name}: written at 8 bits from a {depth}-bit input ({fmt} "
                          f"{'colour ' if channels > 1 else ''}is written at 8 bits here; "
                          f".tif keeps 16)")
        bits.append(16 if keep else 8)
    return bits
