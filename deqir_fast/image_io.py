"""Image files in and out, for the command line: Pillow decodes and encodes, scikit-image
resizes. Pillow has no 16-bit colour mode (it keeps the high byte of each sample), so
16-bit colour is read by decoding the file twice with Pillow's own decoders, once for
each byte (``_sixteen_bit_colour``), or through imageio (tifffile) for compressed TIFF,
and written through tifffile.

Pixels travel as float32 numpy arrays H x W x C in [0, 1], with C = 1 (grey) or 3
(colour). Reading reports what it changed (an alpha channel dropped, 16-bit values
rescaled) as notes for the user. Writing is all or nothing: every file goes to a
temporary name in its folder first and is renamed only once all of them are written, so
a failure leaves neither half-written files nor folders created for nothing.
"""
from __future__ import annotations

import glob
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

# The formats an output may take, by extension: lossless or near-lossless RGB and grey.
# Listed rather than taken from Pillow's registry, which also holds formats that cannot
# store an RGB image (XBM) or only store a palette (GIF).
_OUTPUT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF",
                   ".tiff": "TIFF", ".bmp": "BMP", ".webp": "WEBP", ".ppm": "PPM"}
_SAVE_OPTIONS = {"JPEG": {"quality": 95}, "WEBP": {"quality": 95}}


@dataclass
class Picture:
    """An image read from ``path``: ``pixels`` H x W x C in [0, 1], what reading did, and
    ``bits``, the depth of its samples (1, 8, 16, or 32 for floating point)."""
    path: Path
    pixels: np.ndarray
    notes: List[str] = field(default_factory=list)
    bits: int = 8


# -- reading ----------------------------------------------------------------------------
def read_image(path: Path) -> Picture:
    """Read any image Pillow opens: 1-bit, 8-bit and 16-bit, grey, RGB, RGBA and palette.
    Alpha is dropped (with a note); colour spaces such as CMYK become RGB."""
    from PIL import Image, UnidentifiedImageError
    path = Path(path)
    if not path.exists():
        raise ValueError(f"INPUT {path} does not exist")
    if path.is_dir():
        raise ValueError(f"INPUT {path} is a folder")
    try:
        with Image.open(path) as im:
            tiles = list(getattr(im, "tile", None) or [])    # before load(), which clears it
            im.load()
            pixels, notes, bits = _decode(im, path, tiles)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"INPUT {path} is not a readable image ({exc})") from None
    return Picture(path, pixels, notes, bits)


def _decode(im, path: Path, tiles) -> Tuple[np.ndarray, List[str], int]:
    notes: List[str] = []
    mode = im.mode
    raw = _raw_mode(tiles)
    if mode in ("RGB", "RGBA") and raw is not None and ";16" in raw:
        values = _sixteen_bit_colour(im, path, tiles, raw)
        channels = "L" if raw.startswith("LA") else "RGB"
        if values is not None:
            if values.shape[-1] in (2, 4):
                notes.append(f"{path.name}: alpha channel dropped (restoring the {channels} "
                             f"channels)")
            kind = "grey" if channels == "L" else "colour"
            notes.append(f"{path.name}: 16-bit {kind}, scaled by 1/65535")
            keep = 1 if channels == "L" else 3
            return (values[..., :keep].astype(np.float64) / 65535.0).astype(np.float32), notes, 16
        # Said, not silent: the low byte is lost (up to 1/256 of the range per value).
        notes.append(f"{path.name}: 16-bit samples read at 8 bits (no decoder here keeps all "
                     f"16 bits of this {raw} layout)")
        if channels == "L":
            # Pillow expands 16-bit grey + alpha to RGBA with R = G = B: it is grey.
            im = im.convert("LA")
            mode = "LA"
    if mode == "P" or mode == "PA":
        # A palette with transparency expands to RGBA, whose alpha is then dropped below.
        mode = "RGBA" if (mode == "PA" or "transparency" in im.info) else "RGB"
        im = im.convert(mode)
    if mode in ("LA", "La", "RGBA", "RGBa"):
        notes.append(f"{path.name}: alpha channel dropped (restoring the {mode[:-1]} channels)")
        im = im.convert("L" if mode[0] == "L" else "RGB")
        mode = im.mode
    if mode == "1":
        return np.asarray(im, dtype=np.float32)[..., None], notes, 1
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(im).astype(np.float64)
        if values.min() < 0 or values.max() > 65535:
            raise ValueError(f"INPUT {path} holds 32-bit integers outside 0..65535; "
                             f"save it as an 8- or 16-bit image")
        notes.append(f"{path.name}: 16-bit grey, scaled by 1/65535")
        return (values / 65535.0).astype(np.float32)[..., None], notes, 16
    if mode == "F":
        values = np.asarray(im, dtype=np.float32)
        if values.min() < 0 or values.max() > 1:
            raise ValueError(f"INPUT {path} holds floats in [{values.min():g}, {values.max():g}]; "
                             f"floating-point images must lie in [0, 1]")
        return values[..., None], notes, 32
    if mode == "L":
        return (np.asarray(im, dtype=np.float32) / 255.0)[..., None], notes, 8
    if mode != "RGB":
        notes.append(f"{path.name}: {mode} converted to RGB")
        im = im.convert("RGB")
    return np.asarray(im, dtype=np.float32) / 255.0, notes, 8


def _raw_mode(tiles) -> Optional[str]:
    """The raw mode Pillow decodes the file's samples from (e.g. ``RGB;16B``), or None."""
    for tile in tiles:
        if len(tile) > 3:
            args = tile[3]
            raw = args if isinstance(args, str) else (args[0] if args else None)
            if isinstance(raw, str):
                return raw
    return None


# Pillow's decoders for the 16-bit colour layouts, and the raw mode that reads the other
# byte of each sample from the same bytes: unpacking "RGB;16L" takes the second byte of
# each sample where "RGB;16B" takes the first, and both step through the data 6 bytes a
# pixel, so the PNG filters are undone alike. 16-bit grey + alpha ("LA;16B", 4 bytes a
# pixel) read as 8-bit "RGBA" gives L's high and low byte in R and G, A's in B and A.
_OTHER_BYTE = {"RGB;16B": "RGB;16L", "RGB;16L": "RGB;16B",
               "RGBA;16B": "RGBA;16L", "RGBA;16L": "RGBA;16B", "LA;16B": "RGBA"}


def _sixteen_bit_colour(im, path: Path, tiles, raw: str) -> Optional[np.ndarray]:
    """All 16 bits of a colour (or grey + alpha) image that Pillow decoded to its high
    bytes, as uint16 H x W x C; None when no decoder here can read them."""
    if all(t[0] in ("zip", "raw") for t in tiles) and raw in _OTHER_BYTE:
        # PNG (zip) and uncompressed TIFF (raw): decode again, reading the other byte.
        from PIL import Image
        other = _OTHER_BYTE[raw]
        with Image.open(path) as again:
            again.tile = [(t[0], t[1], t[2], other if isinstance(t[3], str)
                           else (other, *t[3][1:])) for t in again.tile]
            again.load()
            second = np.asarray(again).astype(np.uint16)
        if raw == "LA;16B":
            return np.stack([second[..., 0] * 256 + second[..., 1],
                             second[..., 2] * 256 + second[..., 3]], -1)
        # Pillow's own decode kept each sample's high byte (whatever the byte order); the
        # second one read the low byte.
        return np.asarray(im).astype(np.uint16) * 256 + second
    try:
        # Compressed TIFF and the rest: imageio (through tifffile for TIFF).
        import imageio.v3 as iio
        values = iio.imread(path)
    except Exception:       # noqa: BLE001 - any failure here means "no 16-bit reader"
        return None
    if values.dtype == np.uint16 and values.ndim == 3 and values.shape[-1] in (3, 4):
        return values
    return None


def image_files(pattern_or_path: str) -> List[Path]:
    """The files an INPUT argument names: one file, every image in a folder (sorted, not
    recursive), or the matches of a glob pattern (sorted)."""
    from PIL import Image
    path = Path(pattern_or_path)
    if path.is_dir():
        readable = {ext.lower() for ext in Image.registered_extensions()}
        found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in readable
                       and not p.name.startswith("."))
        if not found:
            raise ValueError(f"INPUT folder {path} holds no image files")
        return found
    if not path.exists() and glob.has_magic(pattern_or_path):
        found = sorted(Path(p) for p in glob.glob(pattern_or_path) if Path(p).is_file())
        if not found:
            raise ValueError(f"INPUT pattern {pattern_or_path!r} matches no file")
        return found
    if not path.exists():
        raise ValueError(f"INPUT {path} does not exist")
    return [path]


# -- shaping ----------------------------------------------------------------------------
def match_channels(pixels: np.ndarray, channels: int) -> np.ndarray:
    """Grey to colour by repeating the channel; colour to grey by the channel mean (the
    grey that the colorize task measures)."""
    have = pixels.shape[-1]
    if have == channels:
        return pixels
    if have == 1:
        return np.repeat(pixels, channels, axis=-1)
    if channels == 1:
        return pixels.mean(-1, keepdims=True)
    raise ValueError(f"cannot turn a {have}-channel image into {channels} channels")


def fit_size(pixels: np.ndarray, size: Tuple[int, int], resize: bool, crop: bool,
             name: str = "the image") -> np.ndarray:
    """Bring an image to ``size`` = (H, W).

    ``resize`` alone scales to exactly ``size`` (the aspect ratio may change); ``crop``
    alone takes the centred ``size`` window (the image must be at least that large);
    both scale the image until it covers ``size``, keeping its aspect ratio, then crop
    the centre. Neither: the size must already match.
    """
    from skimage.transform import resize as sk_resize
    H, W = size
    h, w = pixels.shape[:2]
    if (h, w) == (H, W):
        return pixels
    if resize and crop:
        scale = max(H / h, W / w)
        h, w = max(H, round(h * scale)), max(W, round(w * scale))
        pixels = _resized(sk_resize, pixels, (h, w))
    elif resize:
        return _resized(sk_resize, pixels, (H, W))
    elif crop:
        if h < H or w < W:
            raise ValueError(f"{name} is {h}x{w}, smaller than the {H}x{W} crop; add "
                             f"--resize to scale it up first")
    else:
        raise ValueError(f"{name} is {h}x{w}, but {H}x{W} is needed (--resize scales it, "
                         f"--crop cuts the centre, both do both)")
    top, left = (h - H) // 2, (w - W) // 2
    return pixels[top:top + H, left:left + W]


def _resized(sk_resize, pixels: np.ndarray, shape: Tuple[int, int]) -> np.ndarray:
    # anti_aliasing low-pass filters before shrinking; order 3: cubic interpolation.
    out = sk_resize(pixels, (*shape, pixels.shape[-1]), order=3, anti_aliasing=True,
                    mode="reflect")
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def to_model_range(pixels: np.ndarray):
    """H x W x C in [0, 1] -> a torch tensor [C, H, W] in [-1, 1]."""
    import torch
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float() * 2 - 1


def to_display(x) -> np.ndarray:
    """A torch tensor [C, H, W] in [-1, 1] -> H x W x C in [0, 1] (clamped)."""
    return ((x.detach().float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).cpu().numpy()


# -- writing ----------------------------------------------------------------------------
def output_format(path: Path) -> str:
    """Pillow's format name for an output path, from its extension."""
    from PIL import features
    ext = Path(path).suffix.lower()
    known = ", ".join(sorted({e for e, f in _OUTPUT_FORMATS.items() if _available(f, features)}))
    if not ext:
        raise ValueError(f"--out {path} has no image extension: name a file ({known}), or "
                         f"a folder by ending it with /")
    fmt = _OUTPUT_FORMATS.get(ext)
    if fmt is None or not _available(fmt, features):
        raise ValueError(f"--out {path}: cannot write {ext} images; use one of {known}")
    return fmt


def _available(fmt: str, features) -> bool:
    return fmt != "WEBP" or bool(features.check("webp"))


def check_writable(path: Path) -> None:
    """Fail now, before any work, if ``path`` could not be written later: its nearest
    existing ancestor must be a folder we can create files in."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"--out {path} is a folder; name a file inside it")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"--out {path} exists and is read-only")
    check_folder_writable(path.parent, for_what=f"--out {path}")


def check_folder_writable(folder: Path, for_what: str) -> None:
    """``folder`` (which may not exist yet) can be created and written to."""
    folder = Path(folder)
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{for_what}: {existing} is a file, not a folder")
    # os.access is not enough (it passes root whatever the permissions): try a file.
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".deqir-fast-probe-")
    except OSError as exc:
        reason = exc.strerror or exc
        raise ValueError(f"{for_what}: cannot write in {existing} ({reason})") from None
    os.close(fd)
    os.unlink(probe)


def can_write_16bit(fmt: str, channels: int) -> bool:
    """Whether ``save_pixels`` writes this format at 16 bits: TIFF (through tifffile for
    colour) and grey PNG. Pillow writes no 16-bit colour PNG."""
    return fmt == "TIFF" or (fmt == "PNG" and channels == 1)


def quantize(pixels: np.ndarray, bits: int) -> np.ndarray:
    """[0, 1] -> the nearest of the 2**bits levels, as uint8 or uint16. Rounded, not
    truncated: truncation maps 0.999 to 254 instead of 255 and darkens every value by
    half a level on average."""
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, got {bits}")
    top = 2 ** bits - 1
    scaled = np.clip(np.asarray(pixels, dtype=np.float64), 0.0, 1.0) * top
    return np.rint(scaled).astype(np.uint8 if bits == 8 else np.uint16)


def save_pixels(pixels: np.ndarray, path: Path, fmt: str, bits: int = 8) -> None:
    """Write H x W x C in [0, 1] (grey or RGB) in format ``fmt`` at ``bits`` = 8 or 16
    per sample (16 where ``can_write_16bit``)."""
    if bits == 16 and not can_write_16bit(fmt, pixels.shape[-1]):
        raise ValueError(f"cannot write {pixels.shape[-1]}-channel {fmt} at 16 bits")
    data = quantize(pixels, bits)
    if data.shape[-1] == 1:
        data = data[..., 0]
    if bits == 16 and data.ndim == 3:
        import tifffile
        tifffile.imwrite(path, data, photometric="rgb")
        return
    from PIL import Image
    Image.fromarray(data).save(path, format=fmt, **_SAVE_OPTIONS.get(fmt, {}))


Writer = Callable[[Path], None]


def write_all(outputs: Sequence[Tuple[Path, Writer]]) -> None:
    """Run every ``writer(temporary_path)`` and then move each file to its path.

    Nothing is left behind on failure (or Ctrl-C): temporary files are removed, and so
    are the folders this call created.
    """
    created: List[Path] = []
    pending: List[Tuple[Path, Path]] = []
    try:
        for path, writer in outputs:
            path = Path(path)
            _make_folders(path.parent, created)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".part")
            os.close(fd)
            pending.append((Path(tmp), path))
            writer(Path(tmp))
        mode = _new_file_mode()
        for tmp, path in pending:
            os.chmod(tmp, mode)          # mkstemp makes files private (0600)
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in pending:
            if tmp.exists():
                tmp.unlink()
        for folder in reversed(created):
            try:
                folder.rmdir()
            except OSError:
                pass
        raise


def _new_file_mode() -> int:
    """The permissions an ordinary new file gets under the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _make_folders(folder: Path, created: List[Path]) -> None:
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for f in reversed(missing):
        f.mkdir()
        created.append(f)


def unique_outputs(named: Sequence[Tuple[str, Path]], inputs: Sequence[Path]) -> None:
    """No two outputs share a path, and none overwrites an input."""
    seen = {}
    sources = {p.resolve() for p in inputs}
    for what, path in named:
        key = Path(path).resolve()
        if key in seen:
            raise ValueError(f"{what} and {seen[key]} would both be written to {path}; "
                             f"rename one of the inputs")
        if key in sources:
            raise ValueError(f"{what} would overwrite the input {path}; choose another --out")
        seen[key] = what

