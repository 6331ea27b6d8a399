"""Peak memory of decoding high-bit-depth images: ``open_image`` and ``python -m effnetv2.data check``.

    python benchmarks/memory.py                         # the goals below, on this checkout
    python benchmarks/memory.py --root /tmp/old-tree    # the same on another checkout (e.g. before a fix)
    python benchmarks/memory.py --skip-check            # open_image only

Writes, in a temporary folder, 16-bit PNGs that compress ~1000:1 (one ramp row, then rows stored with
PNG's "Up" filter: all zeros), a 16-bit RGB PNG, and 32-bit integer ("I") and float ("F") TIFFs. Each
measurement runs in a fresh child process that reads its own peak RSS (see :func:`measure`): the increase
is the peak while decoding minus the RSS right after the imports. Goals: ``open_image`` on a 6300x6300
16-bit PNG (just under the app's 40-million-pixel limit) raises peak RSS by < 400 MB; the data check on
four 13000x13000 16-bit PNGs peaks (whole process, imports included) under 1.5 GB.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
OPEN_GOAL = 400e6
CHECK_GOAL = 1.5e9
sys.path.insert(0, str(ROOT / "tests"))

from pngs import png_claiming  # noqa: E402


def write_png16(path: Path, row: np.ndarray, height: int) -> Path:
    """A 16-bit PNG of ``height`` copies of ``row`` (``[W]`` grey or ``[W, 3]`` RGB, values 0..65535).

    Every row after the first is stored with filter "Up" (difference to the row above: zeros), so the file
    is about 1/1000 of the decoded size, like the small uploads that decode to gigabytes.
    """
    first = np.ascontiguousarray(row, ">u2").tobytes()
    zeros = bytes(len(first))
    packer = zlib.compressobj(9)
    data = [packer.compress(b"\0" + first)] + [packer.compress(b"\2" + zeros) for _ in range(height - 1)]
    data.append(packer.flush())
    path.write_bytes(png_claiming(len(row), height, 2 if row.ndim == 2 else 0, bit_depth=16, idat=b"".join(data)))
    return path


def ramp(width: int, channels: int = 1) -> np.ndarray:
    """``[W]`` (or ``[W, channels]``) values rising from 0 to 65535 left to right."""
    values = np.arange(width, dtype=np.int64) * 65535 // max(width - 1, 1)
    return values if channels == 1 else np.repeat(values[:, None], channels, axis=1)


_CHILD = """\
import re, sys
def _status(key):
    return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
{setup}
_import_peak, _before = _status("VmHWM"), _status("VmRSS")
try:
    with open("/proc/self/clear_refs", "w") as _file:
        _file.write("5")  # the kernel's peak-RSS mark := RSS now (Linux >= 4.0)
except OSError:
    pass  # then the peak below also covers the imports: an upper bound on the work's own
try:
    {work}
finally:
    print("memory", _import_peak, _before, _status("VmHWM"))
"""


def measure(setup: str, work: str, root: Path = ROOT) -> dict:
    """Run ``setup`` then ``work`` (one line of Python each) in a fresh process importing from ``root``.

    Returns ``code`` (exit status), ``output``, ``before`` (RSS after ``setup``), ``increase`` (peak RSS
    during ``work`` minus ``before``) and ``peak`` (the process's peak RSS, imports included), in bytes.
    Read from the child's own /proc/self/status (Linux): ``ru_maxrss`` of a child also counts its parent's
    peak, which ``fork``/``vfork`` hand over until ``exec``, and a baseline child's peak would count
    transient import memory as if the work could reuse it.
    """
    env = dict(os.environ, PYTHONPATH=str(root), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", _CHILD.format(setup=setup, work=work)], cwd=root, env=env,
                          capture_output=True, text=True)
    lines = proc.stdout.splitlines()
    import_peak, before, peak = (int(v) for v in lines[-1].split()[1:])
    return {"code": proc.returncode, "output": "\n".join(lines[:-1]) + proc.stderr, "before": before,
            "increase": peak - before, "peak": max(import_peak, peak)}


def measure_open_image(path: Path, root: Path = ROOT) -> dict:
    """:func:`measure` of ``open_image(path)``, with ``effnetv2/images.py`` loaded on its own.

    That module imports only PIL and numpy: the child starts in a second instead of importing torch, and
    the decode costs the same.
    """
    module = root / "effnetv2" / "images.py"
    setup = (f"import importlib.util as u; spec = u.spec_from_file_location('images', {str(module)!r}); "
             "images = u.module_from_spec(spec); spec.loader.exec_module(images)")
    return measure(setup, f"images.open_image({str(path)!r})", root)


def make_files(folder: Path, open_size: int, check_size: int | None) -> dict[str, Path]:
    """The inputs: name -> path (``check`` is a 2-class folder of four ``check_size``² 16-bit PNGs)."""
    files = {"16-bit grey PNG": write_png16(folder / "grey16.png", ramp(open_size), open_size),
             "16-bit RGB PNG": write_png16(folder / "rgb16.png", ramp(open_size, 3), open_size)}
    for mode, row in (("I", ramp(open_size).astype(np.int32)), ("F", (ramp(open_size) / 65535).astype(np.float32))):
        path = folder / f"{mode}.tif"
        Image.fromarray(np.ascontiguousarray(np.broadcast_to(row, (open_size, open_size)))).save(
            path, compression="tiff_adobe_deflate")
        files[f'"{mode}" TIFF'] = path
    if check_size:
        big = write_png16(folder / "big.png", ramp(check_size), check_size)
        files[f"16-bit grey PNG {check_size}²"] = big
        for name in ("a/1.png", "a/2.png", "b/1.png", "b/2.png"):
            (folder / "check" / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(big, folder / "check" / name)
        files["check"] = folder / "check"
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="checkout whose effnetv2 is measured")
    parser.add_argument("--open-size", type=int, default=6300)
    parser.add_argument("--check-size", type=int, default=13000)
    parser.add_argument("--skip-check", action="store_true", help="no 13000² files, no data check")
    args = parser.parse_args()
    mb = 1e6
    with tempfile.TemporaryDirectory() as tmp:
        files = make_files(Path(tmp), args.open_size, None if args.skip_check else args.check_size)
        sizes = ", ".join(f"{name} {path.stat().st_size / 1e3:.0f} KB" for name, path in files.items()
                          if path.is_file())
        print(f"files: {sizes}")
        for name, path in files.items():
            if name == "check":
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # only the header is read
                with Image.open(path) as image:
                    size = image.size
            result = measure_open_image(path, args.root)
            goal = f"goal < {OPEN_GOAL / mb:.0f} MB: {'met' if result['increase'] < OPEN_GOAL else 'MISSED'}"
            failed = f"  FAILED: {result['output'].strip().splitlines()[-1]}" if result["code"] else ""
            print(f"open_image, {name} {size[0]}x{size[1]}: +{result['increase'] / mb:.0f} MB over "
                  f"{result['before'] / mb:.0f} MB after imports ({goal if size[0] == args.open_size else 'no goal'})"
                  f"{failed}")
        if "check" in files:
            result = measure("import runpy, effnetv2.images", "sys.argv = ['effnetv2.data', 'check', "
                             f"{str(files['check'])!r}]; runpy.run_module('effnetv2.data', run_name='__main__')",
                             args.root)
            goal = f"goal < {CHECK_GOAL / mb:.0f} MB: {'met' if result['peak'] < CHECK_GOAL else 'MISSED'}"
            print(f"python -m effnetv2.data check, four {args.check_size}x{args.check_size} 16-bit PNGs: "
                  f"{result['peak'] / mb:.0f} MB process peak ({goal}), +{result['increase'] / mb:.0f} MB over "
                  f"{result['before'] / mb:.0f} MB after imports, exit code {result['code']}")
            print(result["output"].strip())


if __name__ == "__main__":
    main()
