"""Find ComfyUI for ``make demo``, or bring it: a pinned clone in ``.cache/ComfyUI``.

Which ComfyUI (first that applies):

1. ``COMFYUI_PATH``, when it names a checkout (a folder with ``main.py``): used as it is; its
   requirements are the Makefile's business (``make comfyui-deps``);
2. the ComfyUI this folder is installed in (``ComfyUI/custom_nodes/<this pack>``);
3. otherwise ``COMFYUI_GIT_URL`` (default :data:`DEFAULT_URL`, the official repository) at
   ``COMFYUI_REF`` (a tag, branch or commit; default :data:`DEFAULT_REF`, the version this pack is
   tested with) is cloned into ``.cache/ComfyUI`` (a shallow fetch of that one ref; reused while it
   is at that ref, moved to it otherwise), and its ``requirements.txt`` is installed into the
   running Python (``.venv``) *without* torch, torchvision and torchaudio, which stay as they are.

``python tools/comfyui_bootstrap.py`` prints the path it settled on.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from typing import Callable, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_URL = "https://github.com/Comfy-Org/ComfyUI.git"
DEFAULT_REF = "v0.3.64"
DEFAULT_DEST = os.path.join(REPO, ".cache", "ComfyUI")
KEEP_OUT = ("torch", "torchvision", "torchaudio")  # the user's own build; never replaced
STAMP_NAME = ".draft-comfyui-requirements"  # in sys.prefix: hash of what was installed

Runner = Callable[..., subprocess.CompletedProcess]


class BootstrapError(RuntimeError):
    pass


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def filter_requirements(text: str, keep_out: Sequence[str] = KEEP_OUT) -> tuple:
    """``(requirements text without the packages in keep_out, the lines left out)``.

    Names are compared the way pip does (case, ``-``/``_``/``.`` alike), whatever follows the name
    (versions, extras, markers): ``torch>=2.0``, ``TorchVision; sys_platform != 'darwin'`` go,
    ``torchsde`` stays. Comments, blank lines and options (``--extra-index-url``) stay."""
    out_names = {_canonical(n) for n in keep_out}
    kept, dropped = [], []
    for line in text.splitlines():
        m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line.split("#", 1)[0])
        if m and _canonical(m.group(1)) in out_names:
            dropped.append(line.strip())
        else:
            kept.append(line)
    return "\n".join(kept) + "\n", dropped


def find_existing(env=os.environ) -> Optional[str]:
    """COMFYUI_PATH, or the ComfyUI this pack is installed in; None when neither is there."""
    path = env.get("COMFYUI_PATH")
    if path:
        if not os.path.isfile(os.path.join(path, "main.py")):
            raise BootstrapError(f"COMFYUI_PATH={path} is not a ComfyUI checkout (no main.py); "
                                 "unset it to have make demo clone ComfyUI into .cache/ComfyUI")
        return os.path.abspath(path)
    parent = os.path.dirname(os.path.dirname(REPO))
    if os.path.basename(os.path.dirname(REPO)) == "custom_nodes" and os.path.isfile(os.path.join(parent, "main.py")):
        return parent
    return None


def _git(args, cwd=None, run: Runner = subprocess.run, check=True) -> str:
    # no standard input: git never waits on a prompt (CI has none)
    proc = run(["git", *args], cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise BootstrapError(f"git {' '.join(args)} failed ({proc.returncode}): "
                             f"{(proc.stderr or proc.stdout).strip()[-1500:]}")
    return (proc.stdout or "").strip()


def _head(dest: str, run: Runner) -> Optional[str]:
    if not os.path.isdir(os.path.join(dest, ".git")):
        return None
    proc = run(["git", "rev-parse", "HEAD"], cwd=dest, capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def _resolved(dest: str, ref: str, run: Runner) -> Optional[str]:
    """The commit ``ref`` names in the clone at ``dest`` (tags peeled), or None if unknown there."""
    for candidate in (f"refs/tags/{ref}^{{commit}}", f"{ref}^{{commit}}"):
        proc = run(["git", "rev-parse", "--verify", "--quiet", candidate], cwd=dest,
                   capture_output=True, text=True)
        if proc.returncode == 0 and proc.stdout.strip():
            return proc.stdout.strip()
    return None


def _fetch_checkout(dest: str, url: str, ref: str, run: Runner) -> None:
    """Fetch just ``ref`` (shallow) into the repository at ``dest`` and check it out detached.

    ``ref`` is a tag when ``url`` has a tag of that name (a vendored bundle tags its commit with the
    short hash, ``48d368f``), else a commit when it looks like a hash, else a branch."""
    probe = run(["git", "ls-remote", "--tags", url, f"refs/tags/{ref}"], capture_output=True, text=True,
                stdin=subprocess.DEVNULL)
    is_hash = re.fullmatch(r"[0-9a-fA-F]{7,40}", ref) is not None
    if probe.returncode == 0 and probe.stdout.strip():
        spec = f"+refs/tags/{ref}:refs/tags/{ref}"
    elif is_hash or probe.returncode == 0:
        spec = ref  # a commit, or a branch (no such tag)
    else:
        spec = f"+refs/tags/{ref}:refs/tags/{ref}"  # the probe failed: its error comes with the fetch
    # --no-tags: following other tags would read a bundle a second time, which git cannot do
    _git(["fetch", "--quiet", "--no-tags", "--depth", "1", url, spec], cwd=dest, run=run)
    target = f"refs/tags/{ref}" if spec.startswith("+refs/tags/") else "FETCH_HEAD"
    _git(["-c", "advice.detachedHead=false", "checkout", "--quiet", "--detach", target], cwd=dest, run=run)


def _checkout_snapshot(snapshot: str, ref: str, dest: str, run: Runner) -> list:
    """Check out ``ref`` of a local git directory that lacks some blobs (a mirror keeping no large
    files), leaving those files out with a sparse checkout; returns their paths."""
    _git(["clone", "--quiet", "--no-checkout", snapshot, dest], run=run)
    commit = _resolved(dest, ref, run)
    if commit is None:
        raise BootstrapError(f"{snapshot} has no {ref!r}")
    tree = _git(["ls-tree", "-r", commit], cwd=dest, run=run)
    missing = []
    for line in tree.splitlines():
        meta, path = line.split("\t", 1)
        sha = meta.split()[2]
        if run(["git", "cat-file", "-e", sha], cwd=dest, capture_output=True).returncode != 0:
            missing.append(path)
    _git(["sparse-checkout", "init", "--no-cone"], cwd=dest, run=run)
    with open(os.path.join(dest, ".git", "info", "sparse-checkout"), "w") as f:
        f.write("/*\n" + "".join(f"!/{m}\n" for m in missing))
    _git(["-c", "advice.detachedHead=false", "checkout", "--quiet", "--detach", commit], cwd=dest, run=run)
    return missing


def clone(url: str = DEFAULT_URL, ref: str = DEFAULT_REF, dest: str = DEFAULT_DEST,
          run: Runner = subprocess.run, log=print, marker: str = "main.py", what: str = "ComfyUI") -> str:
    """``what`` (a git repository holding the file ``marker``) at ``ref`` in ``dest``: reused when
    it is already there, else cloned (into a side folder first, moved into place when complete: an
    interrupted clone leaves no half checkout). Returns the commit checked out."""
    head = _head(dest, run)
    if head is not None and os.path.isfile(os.path.join(dest, marker)):
        want = _resolved(dest, ref, run)
        if want == head:
            return head
        log(f"{dest} is at {head[:10]}, not {ref}: fetching {ref} from {url}")
        _fetch_checkout(dest, url, ref, run)
        return _head(dest, run)
    if os.path.exists(dest):
        raise BootstrapError(f"{dest} exists but is not a {what} clone; remove it")
    log(f"cloning {what} {ref} from {url} into {dest}")
    partial = dest + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    try:
        _git(["init", "--quiet"], cwd=partial, run=run)
        try:
            _fetch_checkout(partial, url, ref, run)
        except BootstrapError as e:
            if not (os.path.isdir(url) and "unable to read" in str(e)):
                raise
            # A local snapshot without its largest files (a mirror): check out what it has.
            shutil.rmtree(partial, ignore_errors=True)
            left_out = _checkout_snapshot(url, ref, partial, run)
            log(f"{url} lacks {len(left_out)} files; left out: {', '.join(left_out)}")
        if not os.path.isfile(os.path.join(partial, marker)):
            raise BootstrapError(f"{url} at {ref} has no {marker}: not a {what} repository")
        os.replace(partial, dest)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return _head(dest, run)


def install_requirements(comfyui: str, python: str = sys.executable, run: Runner = subprocess.run,
                         stamp_dir: Optional[str] = None, log=print) -> bool:
    """``pip install`` ComfyUI's requirements minus :data:`KEEP_OUT` into ``python``'s
    environment; skipped when the same requirements were installed there before (a stamp file in
    ``stamp_dir``, default ``sys.prefix``). Returns whether pip ran."""
    req = os.path.join(comfyui, "requirements.txt")
    with open(req, encoding="utf-8") as f:
        kept, dropped = filter_requirements(f.read())
    digest = hashlib.sha256(f"{python}\n{kept}".encode()).hexdigest()
    stamp = os.path.join(stamp_dir or sys.prefix, STAMP_NAME)
    if os.path.isfile(stamp) and open(stamp).read().strip() == digest:
        return False
    filtered = os.path.join(stamp_dir or sys.prefix, "comfyui-requirements.txt")
    with open(filtered, "w", encoding="utf-8") as f:
        f.write(kept)
    log(f"installing ComfyUI's requirements (left out, kept as installed: {', '.join(dropped) or 'none'})")
    proc = run([python, "-m", "pip", "install", "-q", "-r", filtered])
    if proc.returncode != 0:
        raise BootstrapError(f"pip install -r {filtered} failed ({proc.returncode})")
    with open(stamp, "w") as f:
        f.write(digest + "\n")
    return True


def ensure_comfyui(env=os.environ, dest: str = DEFAULT_DEST, run: Runner = subprocess.run,
                   python: str = sys.executable, stamp_dir: Optional[str] = None, log=print) -> str:
    """The ComfyUI checkout to use (see the module docstring), cloned and set up if need be."""
    existing = find_existing(env)
    if existing:
        return existing
    url = env.get("COMFYUI_GIT_URL") or DEFAULT_URL
    ref = env.get("COMFYUI_REF") or DEFAULT_REF
    if shutil.which("git") is None and run is subprocess.run:
        raise BootstrapError("make demo clones ComfyUI with git, which is not installed; install "
                             "git, or set COMFYUI_PATH to a ComfyUI checkout")
    commit = clone(url, ref, dest, run=run, log=log)
    install_requirements(dest, python=python, run=run, stamp_dir=stamp_dir, log=log)
    log(f"ComfyUI {ref} ({commit[:10] if commit else '?'}) at {dest}")
    return dest


if __name__ == "__main__":
    try:
        print(ensure_comfyui())
    except BootstrapError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
