"""``make demo``'s ComfyUI bootstrap against a local git repository built here (a tiny fake
ComfyUI tree with a tag): clone at the pinned ref, reuse, move to another ref, requirements
installed without torch/torchvision/torchaudio, COMFYUI_PATH wins."""
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))

import comfyui_bootstrap as boot  # noqa: E402

REQUIREMENTS = """torch
torchsde
torchvision>=0.15
TorchAudio ; sys_platform != "darwin"
numpy>=1.25.0
# a comment mentioning torch
einops
"""


def git(*args, cwd):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                   env=dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
                            GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t"))


@pytest.fixture
def upstream(tmp_path):
    """A git repository with a tagged commit (v0.3.64) and a later untagged one."""
    repo = tmp_path / "upstream"
    repo.mkdir()
    git("init", "-q", "-b", "master", cwd=repo)
    (repo / "main.py").write_text("VERSION = 'tagged'\n")
    (repo / "requirements.txt").write_text(REQUIREMENTS)
    git("add", ".", cwd=repo)
    git("commit", "-q", "-m", "release", cwd=repo)
    git("tag", "-a", "v0.3.64", "-m", "v0.3.64", cwd=repo)
    (repo / "main.py").write_text("VERSION = 'later'\n")
    git("commit", "-qam", "later", cwd=repo)
    later = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                           text=True, check=True).stdout.strip()
    return repo, later


class Recorder:
    """subprocess.run that records the commands and fakes pip (never installs anything)."""

    def __init__(self):
        self.calls = []

    def __call__(self, cmd, **kwargs):
        self.calls.append(list(cmd))
        if cmd[1:4] == ["-m", "pip", "install"]:
            return subprocess.CompletedProcess(cmd, 0, "", "")
        return subprocess.run(cmd, **kwargs)

    def count(self, word):
        return sum(1 for c in self.calls if word in c)


def test_requirements_filter_drops_only_torch_torchvision_torchaudio():
    kept, dropped = boot.filter_requirements(REQUIREMENTS)
    assert dropped == ["torch", "torchvision>=0.15", 'TorchAudio ; sys_platform != "darwin"']
    assert kept.split("\n")[:4] == ["torchsde", "numpy>=1.25.0", "# a comment mentioning torch", "einops"]


def test_bootstrap_clones_the_pinned_tag_installs_requirements_without_torch_and_reuses(tmp_path, upstream):
    repo, later = upstream
    dest = tmp_path / "cache" / "ComfyUI"
    run = Recorder()
    env = {"COMFYUI_GIT_URL": str(repo), "COMFYUI_REF": "v0.3.64"}
    path = boot.ensure_comfyui(env, dest=str(dest), run=run, python="/venv/bin/python",
                               stamp_dir=str(tmp_path), log=lambda *a: None)
    assert path == str(dest)
    assert (dest / "main.py").read_text() == "VERSION = 'tagged'\n"  # the tag, not the newer HEAD
    assert not os.path.exists(str(dest) + ".partial")
    pip = [c for c in run.calls if c[1:4] == ["-m", "pip", "install"]]
    assert pip == [["/venv/bin/python", "-m", "pip", "install", "-q", "-r",
                    str(tmp_path / "comfyui-requirements.txt")]]
    installed = (tmp_path / "comfyui-requirements.txt").read_text().splitlines()
    assert "torchsde" in installed and "einops" in installed
    assert not [line for line in installed if line.lower().startswith(("torch ", "torch\t", "torchvision", "torchaudio"))
                or line == "torch"]

    # second run: the clone is at the ref and the requirements are installed: nothing is done
    run2 = Recorder()
    boot.ensure_comfyui(env, dest=str(dest), run=run2, python="/venv/bin/python",
                        stamp_dir=str(tmp_path), log=lambda *a: None)
    assert run2.count("fetch") == 0 and run2.count("pip") == 0

    # another ref (a commit) moves the same clone there
    env["COMFYUI_REF"] = later
    boot.ensure_comfyui(env, dest=str(dest), run=Recorder(), python="/venv/bin/python",
                        stamp_dir=str(tmp_path), log=lambda *a: None)
    assert (dest / "main.py").read_text() == "VERSION = 'later'\n"


def test_comfyui_path_is_used_as_it_is_and_a_wrong_one_is_refused(tmp_path, upstream):
    run = Recorder()
    fake = tmp_path / "MyComfy"
    fake.mkdir()
    (fake / "main.py").write_text("")
    assert boot.ensure_comfyui({"COMFYUI_PATH": str(fake)}, dest=str(tmp_path / "c"), run=run) == str(fake)
    assert run.calls == [] and not (tmp_path / "c").exists()
    with pytest.raises(boot.BootstrapError, match="not a ComfyUI checkout"):
        boot.ensure_comfyui({"COMFYUI_PATH": str(tmp_path / "nothing")}, dest=str(tmp_path / "c"), run=run)


def test_a_failed_clone_leaves_nothing_behind(tmp_path, upstream):
    repo, _ = upstream
    dest = tmp_path / "cache" / "ComfyUI"
    with pytest.raises(boot.BootstrapError, match="fetch"):
        boot.ensure_comfyui({"COMFYUI_GIT_URL": str(repo), "COMFYUI_REF": "v9.9.9"}, dest=str(dest),
                            run=Recorder(), stamp_dir=str(tmp_path), log=lambda *a: None)
    assert not dest.exists() and not os.path.exists(str(dest) + ".partial")


# -- make test's sources (tools/test_sources.py) ----------------------------------------------------
import test_sources  # noqa: E402


def _source(upstream_repo, name="kohya-like"):
    """A source whose official repository is ``upstream_repo`` and whose vendored bundle tags the
    commit with a short-hash-like name, as ../shared/vendor's bundles do."""
    return test_sources.Source(name, "KOHYA_LIKE", "kohya", str(upstream_repo), "v0.3.64",
                               f"{name}.bundle", "48d368f", "main.py")


def test_sources_come_from_the_vendored_bundle_at_its_tag_even_when_it_looks_like_a_hash(tmp_path, upstream):
    repo, later = upstream
    vendor = tmp_path / "vendor"
    vendor.mkdir()
    git("tag", "48d368f", later, cwd=repo)  # the bundle's tag: looks like a hash, is a tag
    git("bundle", "create", "-q", str(vendor / "kohya-like.bundle"), "--all", cwd=repo)
    src = _source(tmp_path / "nowhere")
    env = {"DRAFT_VENDOR_DIR": str(vendor)}
    assert test_sources.origin(src, env) == (str(vendor / "kohya-like.bundle"), "48d368f")
    assert test_sources.origin(src, {}) == (str(tmp_path / "nowhere"), "v0.3.64")  # no vendor: official
    path = test_sources.ensure(src, env, log=lambda *a: None, cache=str(tmp_path / "cache"))
    assert open(os.path.join(path, "main.py")).read() == "VERSION = 'later'\n"
    # reused as it is the second time (the official URL is never asked)
    assert test_sources.ensure(src, env, log=lambda *a: None, cache=str(tmp_path / "cache")) == path


def test_sources_a_path_variable_wins_and_ci_fails_on_a_missing_source(tmp_path, upstream, capsys):
    repo, _ = upstream
    src = _source(repo)
    env = {"KOHYA_LIKE_PATH": str(repo)}
    assert test_sources.main(env, sources=(src,), cache=str(tmp_path / "c")) == 0
    assert capsys.readouterr().out == f"export KOHYA_LIKE_PATH={repo}\n"
    assert not (tmp_path / "c").exists()
    with pytest.raises(boot.BootstrapError, match="not a kohya-like checkout"):
        test_sources.ensure(src, {"KOHYA_LIKE_PATH": str(tmp_path)}, cache=str(tmp_path / "c"))

    gone = _source(tmp_path / "no-such-repository")
    assert test_sources.main({}, sources=(gone,), cache=str(tmp_path / "c")) == 0  # a user: skipped
    out = capsys.readouterr()
    assert out.out == "" and "kohya-like: kohya tier skipped: " in out.err
    assert test_sources.main({"CI": "true"}, sources=(gone,), cache=str(tmp_path / "c")) == 1
    err = capsys.readouterr().err
    assert "kohya-like: kohya tier cannot run: " in err and "CI runs every tier, and kohya-like could not be had" in err
    assert not (tmp_path / "c" / "kohya-like").exists()
