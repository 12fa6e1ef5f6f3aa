#!/usr/bin/env python
"""Make detectron2 importable in the running Python environment.

1. A detectron2 >= 0.6 that already imports and that this script did not install (a user's
   build of a release or of upstream main, with its CUDA ops or without) is kept as it is.
2. Otherwise detectron2's Python sources are patched (PATCHES below; the README lists them) and
   installed without compiled ops, with the stand-in ``detectron2/_C.py`` (STUB). The sources
   are upstream v0.6 from the registry package ``pb1-detectron2==0.6`` (an sdist identical, file
   by file, to upstream tag v0.6, without the C++/CUDA sources), or a detectron2 source tree
   given with ``--src`` (CI installs upstream main from ../shared/vendor/detectron2-main this
   way). The source is copied to --build-dir first; the tree given is never changed.
3. A detectron2 that an earlier run installed (its _C.py is the stand-in, which records the
   source and the patch list) is reinstalled when another --src is asked for or PATCHES
   changed, so that ``make setup`` (rerun when this file changes) brings it up to date;
   otherwise only the stand-in is rewritten if STUB changed.
4. ``--target DIR`` installs into DIR (``pip install --target``) instead of the environment,
   to put that detectron2 in front of the environment's with ``PYTHONPATH=DIR``
   (``make test-d2main``).

Usage: python tools/install_detectron2.py [--build-dir build/detectron2] [--src DIR] [--target DIR]
"""
import argparse
import ast
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from collections import namedtuple

SDIST = "pb1-detectron2==0.6"

# A change to the sources: ``old`` must be found exactly once in ``file`` and becomes ``new``.
# ``upstream``: a text that a later upstream has instead of ``old`` (the patch is then skipped:
# detectron2 main needs no Pillow, numpy, caffe2 or MapDataset change). ``unless``: a path of the
# source tree whose presence makes the patch unneeded.
Patch = namedtuple("Patch", "file old new why upstream unless", defaults=(None, None))
PATCHES = [
    Patch(
        "setup.py",
        "ext_modules=get_extensions(),",
        "ext_modules=[],",
        "no C++/CUDA extension is built (the sdist has no C++/CUDA sources)",
    ),
    Patch(
        "setup.py",
        'packages=find_packages(exclude=("configs", "tests*")) + list(PROJECTS.keys()),\n    package_dir=PROJECTS,',
        'packages=find_packages(exclude=("configs", "tests*")),',
        "a source tree without projects/ (the vendored main) installs no detectron2.projects",
        unless="projects",
    ),
    Patch(
        "detectron2/model_zoo/model_zoo.py",
        "import pkg_resources\n",
        "",
        "setuptools >= 81 no longer ships pkg_resources",
    ),
    Patch(
        "detectron2/model_zoo/model_zoo.py",
        'cfg_file = pkg_resources.resource_filename(\n        "detectron2.model_zoo", os.path.join("configs", config_path)\n    )',
        'cfg_file = os.path.join(os.path.dirname(__file__), "configs", config_path)',
        "same path as pkg_resources.resource_filename, without pkg_resources",
    ),
    Patch(
        "detectron2/data/transforms/transform.py",
        "interp=Image.LINEAR",
        "interp=Image.BILINEAR",
        "Pillow >= 10 removed Image.LINEAR (an alias of BILINEAR); upstream made the same change",
        upstream="interp=Image.BILINEAR",
    ),
    Patch(
        "detectron2/export/__init__.py",
        "from .api import *\nfrom .flatten import TracingAdapter\nfrom .torchscript import scripting_with_instances, dump_torchscript_IR\n",
        "from .flatten import TracingAdapter\n"
        "from .torchscript import scripting_with_instances, dump_torchscript_IR\n"
        "\n"
        "try:\n"
        "    from caffe2.proto import caffe2_pb2 as _tmp\n"
        "    from caffe2.python import core\n"
        "\n"
        "    # caffe2 is optional (as in upstream main; torch >= 2.0 has no caffe2)\n"
        "except ImportError:\n"
        "    pass\n"
        "else:\n"
        "    from .api import *\n",
        "caffe2 is optional, as upstream made it: without it detectron2.export (TracingAdapter, "
        "TorchScript) and detectron2.utils.analysis import, the Caffe2 exporter is absent",
        upstream="# caffe2 is optional",
    ),
    Patch(
        "detectron2/data/common.py",
        "self._rng.sample(self._fallback_candidates, k=1)",
        "self._rng.sample(list(self._fallback_candidates), k=1)",
        "Python >= 3.11 random.sample takes a sequence, not a set; upstream made the same change",
        upstream="self._rng.sample(list(self._fallback_candidates), k=1)",
    ),
    Patch(
        "detectron2/engine/hooks.py",
        "    def state_dict(self):\n"
        "        if isinstance(self.scheduler, torch.optim.lr_scheduler._LRScheduler):\n"
        "            return self.scheduler.state_dict()\n"
        "        return {}\n"
        "\n"
        "    def load_state_dict(self, state_dict):\n"
        "        if isinstance(self.scheduler, torch.optim.lr_scheduler._LRScheduler):\n",
        "    def state_dict(self):\n"
        "        if isinstance(self.scheduler, torch.optim.lr_scheduler.LRScheduler):\n"
        "            return self.scheduler.state_dict()\n"
        "        return {}\n"
        "\n"
        "    def load_state_dict(self, state_dict):\n"
        "        if isinstance(self.scheduler, torch.optim.lr_scheduler.LRScheduler):\n",
        "torch >= 2.0's schedulers (StepLR, ...) derive from LRScheduler, not _LRScheduler, so the "
        "LRScheduler hook saved none of their state for a resume; upstream made the same change",
        upstream="isinstance(self.scheduler, _LRScheduler)",
    ),
]
# numpy >= 1.24 removed the aliases np.bool, np.int and np.float; each use (in v0.6:
# structures/masks.py, data/build.py, utils/visualizer.py, utils/video_visualizer.py and the
# sem-seg and Pascal VOC evaluators; none in main) becomes the builtin it aliased.
NUMPY_ALIASES = re.compile(r"\bnp\.(bool|int|float)\b(?![\w.])")
# recorded in the stand-in: a detectron2 installed with other changes is reinstalled
PATCHES_ID = hashlib.sha256(repr((PATCHES, NUMPY_ALIASES.pattern)).encode()).hexdigest()[:16]

STUB = '''"""Stand-in for detectron2's compiled ops (written by convmae-det's tools/install_detectron2.py).

This detectron2 was installed from upstream Python sources without its C++/CUDA ops.
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
        "ops (Python sources only, by convmae-det's set-up). Deformable conv, rotated boxes and the "
        "fast COCO evaluator need them: build detectron2 from source (with CUDA) to use them."
    )
'''


def stub_text(source):
    """STUB plus what it was installed from and with which changes."""
    return STUB + f"\n\n# installed by convmae-det's tools/install_detectron2.py\nCONVMAE_DET_SOURCE = {source!r}\nCONVMAE_DET_PATCHES = {PATCHES_ID!r}\n"


def installed(env=None):
    """(version, path of detectron2._C or None) of the detectron2 that imports, or None."""
    code = ("import detectron2, importlib.util, json, sys; s = importlib.util.find_spec('detectron2._C'); "
            "sys.stdout.write(json.dumps([detectron2.__version__, detectron2.__file__, s.origin if s else None]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    return json.loads(r.stdout) if r.returncode == 0 else None


def read_stub(path):
    """(source, patches id) recorded in a stand-in this script wrote, or None for any other _C."""
    if not path or not path.endswith(".py"):
        return None
    text = open(path).read()
    if "\nCONVMAE_DET_STUB = True\n" not in text:
        return None
    rec = dict(re.findall(r"^CONVMAE_DET_(SOURCE|PATCHES) = (.*)$", text, re.M))
    return tuple(ast.literal_eval(rec[k]) if k in rec else None for k in ("SOURCE", "PATCHES"))


def refresh_stub(path, source):
    """Rewrite a stand-in that differs from stub_text(source) (STUB changed)."""
    text = stub_text(source)
    if open(path).read() != text:
        with open(path + ".tmp", "w") as f:
            f.write(text)
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


def apply_patches(src, source):
    for p in PATCHES:
        if p.unless and os.path.exists(os.path.join(src, p.unless)):
            continue
        path = os.path.join(src, p.file)
        text = open(path).read()
        n = text.count(p.old)
        if n == 0 and p.upstream and p.upstream in text:
            print(f"{p.file}: this source already has the change (upstream made it)")
            continue
        if n != 1:
            raise SystemExit(f"patch for {p.file} ({p.why}): expected the text once, found it {n} times")
        with open(path, "w") as f:
            f.write(text.replace(p.old, p.new))
    changed = []
    for path in sorted(glob.glob(os.path.join(src, "detectron2", "**", "*.py"), recursive=True)):
        text = open(path).read()
        new = NUMPY_ALIASES.sub(r"\1", text)
        if new != text:
            with open(path, "w") as f:
                f.write(new)
            changed.append(os.path.relpath(path, src))
    print("replaced removed numpy aliases in: " + (", ".join(changed) or "no file"))
    with open(os.path.join(src, "detectron2", "_C.py"), "w") as f:
        f.write(stub_text(source))


def fetch(source, build):
    """Copy of the sources under ``build``: the registry sdist ``source``, or the tree ``source``."""
    if os.path.isdir(build):
        shutil.rmtree(build)
    os.makedirs(build)
    if os.path.isdir(source):
        src = os.path.join(build, os.path.basename(source.rstrip(os.sep)))
        # symlinks kept as links; earlier build outputs and byte code of the tree left out
        shutil.copytree(source, src, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "build", "*.egg-info", "_C*.so"))
        return src
    # --no-build-isolation: the sdist's setup.py imports torch to prepare its metadata.
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation", source, "-d", build],
                   check=True)
    (archive,) = glob.glob(os.path.join(build, "*.tar.gz"))
    with tarfile.open(archive) as tar:
        tar.extractall(build, filter="data")
    (src,) = [p for p in glob.glob(os.path.join(build, "*")) if os.path.isdir(p)]
    return src


def install(source, build, target=None):
    src = fetch(source, build)
    apply_patches(src, source)
    pip = [sys.executable, "-m", "pip"]
    env = None
    if target:
        if os.path.isdir(target):
            shutil.rmtree(target)
        cmd = pip + ["install", "--no-deps", "--no-build-isolation", "--target", target, src]
        env = dict(os.environ, PYTHONPATH=target)
    else:
        # the earlier install may be another distribution (pb1-detectron2 or detectron2): remove
        # it, so that no file of it stays behind
        subprocess.run(pip + ["uninstall", "-y", "pb1-detectron2", "detectron2"], check=True)
        cmd = pip + ["install", "--no-deps", "--no-build-isolation", src]
    subprocess.run(cmd, check=True)
    found = installed(env)
    if found is None:
        raise SystemExit("detectron2 was installed but does not import")
    if target and not os.path.realpath(found[1]).startswith(os.path.realpath(target) + os.sep):
        raise SystemExit(f"detectron2 was installed into {target}, but PYTHONPATH={target} imports {found[1]}")
    where = f" into {target}" if target else ""
    print(f"installed detectron2 {found[0]}{where} (Python sources of {source}, no compiled ops)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build-dir", default=os.path.join("build", "detectron2"))
    parser.add_argument("--src", help="a detectron2 source tree to install instead of " + SDIST)
    parser.add_argument("--target", help="install into this folder (for PYTHONPATH) instead of the environment")
    args = parser.parse_args()
    build = os.path.abspath(args.build_dir)
    src = None
    if args.src:
        src = os.path.realpath(args.src)
        if not os.path.isfile(os.path.join(src, "detectron2", "__init__.py")):
            raise SystemExit(f"--src {args.src}: not a detectron2 source tree (no detectron2/__init__.py)")

    if args.target:
        install(src or SDIST, build, os.path.abspath(args.target))
        return

    found = installed()
    if found is None:
        install(src or SDIST, build)
        return
    version, _, c_path = found
    if version_tuple(version) < (0, 6):
        raise SystemExit(f"detectron2 {version} is installed but convmae-det needs >= 0.6")
    ours = read_stub(c_path)
    if ours is None:
        print(f"detectron2 {version} already imports (not installed by this script); using it"
              + (f", not --src {args.src}" if src else ""))
        return
    source, patches = ours
    want = src or source or SDIST  # a stand-in of an older version of this script records no source
    if want == source and patches == PATCHES_ID:
        print(f"detectron2 {version} (from {source}) already imports with the current changes; using it")
        refresh_stub(c_path, source)
        return
    if os.path.isabs(want) and not os.path.isdir(want):
        print(f"detectron2 {version} was installed from {want}, which no longer exists; using it as it is")
        return
    if source is None:
        why = "by an earlier version of this script, which recorded neither source nor changes"
    elif want != source:
        why = f"from {source}, but --src {want} is asked for"
    else:
        why = f"from {source} with changes that differ from this script's"
    print(f"detectron2 {version} was installed {why}: reinstalling from {want}")
    install(want, build)


if __name__ == "__main__":
    main()
