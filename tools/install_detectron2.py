#!/usr/bin/env python
"""Make detectron2 importable in the running Python environment.

1. If a detectron2 >= 0.6 already imports (a user's source build with CUDA ops, say), it is
   kept; only a compiled-ops stand-in (_C.py) that an earlier run of this script wrote is
   brought up to date with STUB below.
2. Otherwise upstream v0.6's Python sources are taken from the registry package
   ``pb1-detectron2==0.6`` (an sdist identical, file by file, to upstream tag v0.6, without the
   C++/CUDA sources), patched for current torch, Pillow, numpy and setuptools, and installed
   without compiled ops. Every change is listed in PATCHES below and in the README.

Usage: python tools/install_detectron2.py [--build-dir build/detectron2]
"""
import argparse
import glob
import re
import os
import shutil
import subprocess
import sys
import tarfile

SDIST = "pb1-detectron2==0.6"

# (file, old text, new text, why). Each old text must be found exactly once.
PATCHES = [
    (
        "setup.py",
        "ext_modules=get_extensions(),",
        "ext_modules=[],",
        "the sdist has no C++/CUDA sources; build no extension",
    ),
    (
        "detectron2/model_zoo/model_zoo.py",
        "import pkg_resources\n",
        "",
        "setuptools >= 81 no longer ships pkg_resources",
    ),
    (
        "detectron2/model_zoo/model_zoo.py",
        'cfg_file = pkg_resources.resource_filename(\n        "detectron2.model_zoo", os.path.join("configs", config_path)\n    )',
        'cfg_file = os.path.join(os.path.dirname(__file__), "configs", config_path)',
        "same path as pkg_resources.resource_filename, without pkg_resources",
    ),
    (
        "detectron2/data/transforms/transform.py",
        "interp=Image.LINEAR",
        "interp=Image.BILINEAR",
        "Pillow >= 10 removed Image.LINEAR (an alias of BILINEAR); upstream made the same change",
    ),
]
# numpy >= 1.24 removed the aliases np.bool, np.int and np.float; each use (in structures/masks.py,
# data/build.py, utils/visualizer.py, utils/video_visualizer.py and the sem-seg and Pascal VOC
# evaluators) becomes the builtin it aliased.
NUMPY_ALIASES = re.compile(r"\bnp\.(bool|int|float)\b(?![\w.])")

STUB = '''"""Stand-in for detectron2's compiled ops (written by convmae-det's tools/install_detectron2.py).

This detectron2 was installed from upstream v0.6's Python sources without its C++/CUDA ops.
Mask R-CNN does not need them (it uses torchvision's roi_align and nms). They are needed by
deformable convolution, rotated boxes (nms_rotated, box_iou_rotated, ROIAlignRotated, RRPN)
and the fast COCO evaluator; looking any of them up raises convmae-det's MissingCompiledOpError
(convmae_det.utils.compat, an AttributeError) naming the op.
"""
CONVMAE_DET_STUB = True


# what detectron2.utils.collect_env asks of the extension when it reports the environment
def get_compiler_version():
    return "none (detectron2 installed without compiled ops)"


def get_cuda_version():
    return "none (detectron2 installed without compiled ops)"


def has_cuda():
    return False


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    # imported here, not at the top: detectron2 imports this module while it loads, and
    # convmae_det imports detectron2
    try:
        from convmae_det.utils.compat import MissingCompiledOpError as error
    except ImportError:  # detectron2 used without convmae_det
        error = AttributeError
    raise error(
        f"detectron2._C.{name} is a compiled op, and this detectron2 was installed without compiled "
        "ops (pure-Python v0.6 from convmae-det's set-up). Deformable conv, rotated boxes and the "
        "fast COCO evaluator need them: build detectron2 from source (with CUDA) to use them."
    )
'''


def installed_version():
    code = "import detectron2, sys; sys.stdout.write(detectron2.__version__)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else None


def refresh_stub():
    """If the detectron2 that imports is one this script installed (its _C.py is the stand-in),
    rewrite that _C.py when it differs from STUB, so that a changed STUB reaches an existing
    environment (``make setup`` reruns this script when it changes)."""
    code = "import importlib.util, sys; sys.stdout.write(importlib.util.find_spec('detectron2._C').origin or '')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    path = r.stdout.strip() if r.returncode == 0 else ""
    if not path.endswith(".py"):
        return
    with open(path) as f:
        text = f.read()
    if "\nCONVMAE_DET_STUB = True\n" in text and text != STUB:
        with open(path + ".tmp", "w") as f:
            f.write(STUB)
        os.replace(path + ".tmp", path)  # a process importing detectron2 meanwhile sees one or the other
        print(f"updated the compiled-ops stand-in {path}")


def version_tuple(v):
    parts = []
    for p in v.split("+")[0].split("."):
        digits = "".join(c for c in p if c.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def apply_patches(src):
    for rel, old, new, why in PATCHES:
        path = os.path.join(src, rel)
        text = open(path).read()
        n = text.count(old)
        if n != 1:
            raise SystemExit(f"patch for {rel} ({why}): expected the text once, found it {n} times")
        open(path, "w").write(text.replace(old, new))
    changed = []
    for path in sorted(glob.glob(os.path.join(src, "detectron2", "**", "*.py"), recursive=True)):
        text = open(path).read()
        new = NUMPY_ALIASES.sub(r"\1", text)
        if new != text:
            open(path, "w").write(new)
            changed.append(os.path.relpath(path, src))
    print("replaced removed numpy aliases in: " + ", ".join(changed))
    with open(os.path.join(src, "detectron2", "_C.py"), "w") as f:
        f.write(STUB)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build-dir", default=os.path.join("build", "detectron2"))
    args = parser.parse_args()

    v = installed_version()
    if v is not None and version_tuple(v) >= (0, 6):
        print(f"detectron2 {v} already imports; using it")
        refresh_stub()
        return
    if v is not None:
        raise SystemExit(f"detectron2 {v} is installed but convmae-det needs >= 0.6")

    build = os.path.abspath(args.build_dir)
    if os.path.isdir(build):
        shutil.rmtree(build)
    os.makedirs(build)
    pip = [sys.executable, "-m", "pip"]
    # --no-build-isolation: the sdist's setup.py imports torch to prepare its metadata.
    subprocess.run(pip + ["download", "--no-deps", "--no-build-isolation", SDIST, "-d", build], check=True)
    (archive,) = glob.glob(os.path.join(build, "*.tar.gz"))
    with tarfile.open(archive) as tar:
        tar.extractall(build, filter="data")
    (src,) = [p for p in glob.glob(os.path.join(build, "*")) if os.path.isdir(p)]
    apply_patches(src)
    subprocess.run(pip + ["install", "--no-deps", "--no-build-isolation", src], check=True)
    v = installed_version()
    if v is None:
        raise SystemExit("detectron2 was installed but does not import")
    print(f"installed detectron2 {v} (Python sources of v0.6, no compiled ops)")


if __name__ == "__main__":
    main()
