"""The checkouts ``make test`` needs beyond PyPI: ComfyUI, kohya-ss/sd-scripts and musubi-tuner.

Each source, in :data:`SOURCES`, comes from (first that applies):

1. its ``*_PATH`` variable (``COMFYUI_PATH``, ``KOHYA_SD_SCRIPTS_PATH``, ``MUSUBI_TUNER_PATH``),
   used as it is (ComfyUI also: the ComfyUI this pack is installed in);
2. a clone in ``.cache/<name>`` of ``*_GIT_URL`` at ``*_REF``; where unset, of the git bundle in
   ``DRAFT_VENDOR_DIR`` (``.ci/run`` points it at ``../shared/vendor``) at the bundle's tag, or
   else of the official repository at the pinned commit. ComfyUI's requirements (without torch,
   torchvision, torchaudio) are installed into the running Python, as for ``make demo``.

``python tools/test_sources.py`` prints ``export NAME=PATH`` lines for the shell (``make test``
evaluates them) and one line per source on stderr: where it is, or why its tier is skipped.
With ``CI`` set (``true``/``1``), a source that cannot be had is an error (exit 1): CI runs
every tier.
"""
from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import comfyui_bootstrap as boot  # noqa: E402


@dataclass(frozen=True)
class Source:
    """One checkout the test tiers need.

    ``marker`` is a file (relative to the checkout) that proves it; ``official_ref`` is a full
    commit hash or tag of ``official_url``; ``bundle`` / ``bundle_ref`` name the git bundle in the
    vendor folder and its tag (a bundle's history is rewritten: its commit hashes differ)."""
    name: str
    env: str  # prefix of the variables: <env>_PATH, <env>_GIT_URL, <env>_REF
    tiers: str
    official_url: str
    official_ref: str
    bundle: str
    bundle_ref: str
    marker: str


CACHE = os.path.join(boot.REPO, ".cache")  # clones go to CACHE/<name>


SOURCES = (
    Source("ComfyUI", "COMFYUI", "comfyui, browser", boot.DEFAULT_URL, boot.DEFAULT_REF,
           "ComfyUI-v0.3.64.bundle", "v0.3.64", "main.py"),
    Source("sd-scripts", "KOHYA_SD_SCRIPTS", "kohya", "https://github.com/kohya-ss/sd-scripts.git",
           "48d368fa557731ad0488c07304dfeba8c07910eb", "sd-scripts-48d368f.bundle", "48d368f",
           os.path.join("networks", "lora_flux.py")),
    Source("musubi-tuner", "MUSUBI_TUNER", "musubi", "https://github.com/kohya-ss/musubi-tuner.git",
           "30c658c4f4b0bf05038b3346eff9670259b10fc7", "musubi-tuner-30c658c.bundle", "30c658c",
           os.path.join("src", "musubi_tuner", "networks", "lora_qwen_image.py")),
)


def in_ci(env=os.environ) -> bool:
    return env.get("CI", "").strip().lower() in ("1", "true", "yes")


def origin(src: Source, env=os.environ) -> tuple:
    """``(url, ref)`` to clone ``src`` from: the variables, else the vendored bundle, else the
    official repository."""
    url, ref = env.get(f"{src.env}_GIT_URL"), env.get(f"{src.env}_REF")
    if url:
        return url, ref or src.official_ref
    vendor = env.get("DRAFT_VENDOR_DIR")
    if vendor and os.path.isfile(os.path.join(vendor, src.bundle)):
        return os.path.abspath(os.path.join(vendor, src.bundle)), ref or src.bundle_ref
    return src.official_url, ref or src.official_ref


def ensure(src: Source, env=os.environ, log=print, cache: str = CACHE) -> str:
    """The checkout of ``src`` to test against, cloned (and for ComfyUI set up) if need be."""
    url, ref = origin(src, env)
    dest = os.path.join(cache, src.name)
    if src.env == "COMFYUI":  # make demo's way: COMFYUI_PATH, the ComfyUI we sit in, or a clone
        return boot.ensure_comfyui({**env, "COMFYUI_GIT_URL": url, "COMFYUI_REF": ref}, dest=dest,
                                   log=log)
    path = env.get(f"{src.env}_PATH")
    if path:
        if not os.path.isfile(os.path.join(path, src.marker)):
            raise boot.BootstrapError(f"{src.env}_PATH={path} is not a {src.name} checkout "
                                      f"(no {src.marker})")
        return os.path.abspath(path)
    boot.clone(url, ref, dest, log=log, marker=src.marker, what=src.name)
    return dest


def main(env=os.environ, sources=SOURCES, cache: str = CACHE) -> int:
    """Prints the export lines; returns the exit status (1 in CI when a source is missing)."""
    def say(msg):
        print(msg, file=sys.stderr, flush=True)

    missing = []
    for src in sources:
        try:
            path = ensure(src, env, log=say, cache=cache)
        except boot.BootstrapError as e:
            reason = str(e).strip().splitlines()[-1][:300]
            say(f"{src.name}: {src.tiers} tier {'cannot run' if in_ci(env) else 'skipped'}: {reason}")
            missing.append(src.name)
            continue
        print(f"export {src.env}_PATH={shlex.quote(path)}")
        say(f"{src.name}: {path}")
    if missing and in_ci(env):
        say(f"CI runs every tier, and {', '.join(missing)} could not be had")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
