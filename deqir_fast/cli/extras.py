"""Optional dependencies: a command that needs a module the base install lacks says so,
naming the extra that installs it, before any work starts (``check_modules``), and a
module found missing later gets the same message (``missing_extras_message``).

Only the standard library at module level."""
from __future__ import annotations

import importlib.util
import re
from typing import List

# The modules that the optional extra installs, by import name -> distribution name.
EXTRA_MODULES = {"PIL": "pillow", "skimage": "scikit-image", "tqdm": "tqdm",
                 "diffusers": "diffusers", "safetensors": "safetensors",
                 "matplotlib": "matplotlib"}


def required_modules(args) -> List[str]:
    """The optional modules a command will import, so that a missing one is reported
    before any work (the model, a benchmark) starts."""
    if args.command == "restore":
        needed = ["PIL", "tqdm", "diffusers", "safetensors"]
        if args.simulate or args.resize or args.crop:
            needed.append("skimage")                   # metrics, resizing
        if args.simulate:
            needed.append("matplotlib")                # the comparison figure
        return needed
    if args.command == "demo":
        return ["diffusers", "safetensors", "skimage", "matplotlib", "tqdm"]
    if args.command == "bench":
        return ["tqdm"] + ([] if getattr(args, "no_plots", False) else ["matplotlib"])
    return []


def extra_for(distribution: str) -> str:
    """The extra of deqir_fast that installs ``distribution``, read from the installed
    metadata (setup.py's extras_require); "demo" when the metadata cannot say."""
    from importlib import metadata           # loaded only when a message needs it
    try:
        requirements = metadata.requires("deqir_fast") or []
    except metadata.PackageNotFoundError:
        return "demo"
    for line in requirements:
        match = re.match(r"\s*([A-Za-z0-9_.\-]+).*;\s*extra\s*==\s*['\"]([^'\"]+)['\"]", line)
        if match and match.group(1).lower() == distribution.lower():
            return match.group(2)
    return "demo"


def missing_extras_message(command: str, modules: List[str]) -> str:
    names = [EXTRA_MODULES.get(m, m) for m in modules]
    extras = sorted({extra_for(n) for n in names})
    install = " ".join(f'"deqir_fast[{e}]"' for e in extras)
    return (f"deqir-fast {command} needs {', '.join(names)}, which "
            f"{'is' if len(names) == 1 else 'are'} not installed: pip install {install}")


def check_modules(args) -> None:
    """Raise one error naming every missing optional module and the extra to install."""
    missing = []
    for name in required_modules(args):
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    if missing:
        raise ModuleNotFoundError(missing_extras_message(args.command, missing),
                                  name=missing[0])
