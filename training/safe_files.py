"""File names every system can hold, and the hidden temporary files of atomic saves.

* :func:`portable_name_problem` says why a relative file name (``/``-separated parts) could not
  be stored on one of the systems a LoRA travels to (Windows, macOS, Linux, network shares): the
  characters ``< > : " | ? *`` and control characters, a part ending in a dot or a space, Windows'
  reserved device names (``CON``, ``PRN``, ``AUX``, ``NUL``, ``COM1``-``COM9``, ``LPT1``-``LPT9``,
  with or without an extension), parts longer than 255 bytes. Such names are refused, never
  silently rewritten.
* :func:`temp_path_for` names the hidden temporary file an atomic save writes first:
  ``.<file name>.draft-<pid>-<random>.tmp`` beside the target. A save killed mid-write (power
  loss, ``kill -9``) leaves it behind; :func:`remove_leftovers`, called at every save into a folder,
  removes those whose writing process is gone (or, where that cannot be asked, that are older than
  :data:`STALE_SECONDS`), and never a temporary file that a live save is still writing.
* :func:`atomic_save` writes a safetensors file through such a temporary file (flushed, then
  renamed into place), so an interrupted save never leaves a truncated file;
  :func:`read_safetensors` reads one back, raising :class:`LoRAFileError` for a truncated or
  corrupt file. Every LoRA file, diffusers folder file and resume side file goes through these.
"""
from __future__ import annotations

import os
import re
import secrets
import threading
import time
from typing import Mapping, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

_FORBIDDEN_CHARS = '<>:"|?*'
_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)),
             *(f"LPT{i}" for i in range(1, 10)), "COM\u00b9", "COM\u00b2", "COM\u00b3",
             "LPT\u00b9", "LPT\u00b2", "LPT\u00b3"}
MAX_PART_BYTES = 255

# Temporary files of atomic saves: ".<name>.draft-<pid>-<random>.tmp"; older releases wrote
# ".<name>.<8 random chars>.tmp" (tempfile.mkstemp) for .safetensors and .draft_state files.
_TEMP_RE = re.compile(r"^\..+\.draft-(\d+)-[0-9a-f]+\.tmp$")
_LEGACY_TEMP_RE = re.compile(r"^\..+\.(safetensors|draft_state)\.[A-Za-z0-9_]{8}\.tmp$")
STALE_SECONDS = 600.0  # age after which a temporary file of unknown liveness counts as left over

_in_flight: set = set()  # absolute temp paths being written by this process
_lock = threading.Lock()


def portable_name_problem(name: str) -> Optional[str]:
    """Why ``name`` (a relative, ``/``-separated file name, without the extension that will be
    appended) cannot be stored everywhere, or None when it can."""
    for part in name.replace("\\", "/").split("/"):
        if not part:
            continue  # empty parts are the path rules' business (safe_lora_path)
        bad = sorted({c for c in part if c in _FORBIDDEN_CHARS or ord(c) < 32 or ord(c) == 127})
        if bad:
            shown = " ".join(repr(c) for c in bad)
            return (f"{part!r} contains {shown}, which Windows (and so A1111, Forge, kohya "
                    "there) cannot hold in a file name")
        if part[-1] in ". " and part not in (".", ".."):
            return f"{part!r} ends in a {'dot' if part[-1] == '.' else 'space'}, which Windows drops"
        if part.split(".")[0].rstrip(" ").upper() in _RESERVED:
            return (f"{part!r} is a reserved device name on Windows "
                    f"({part.split('.')[0].upper()} cannot be a file or folder name)")
        if len(part.encode("utf-8")) > MAX_PART_BYTES:
            return f"a part of the name is {len(part.encode('utf-8'))} bytes long (at most {MAX_PART_BYTES})"
    return None


def temp_path_for(path: str) -> str:
    """A new hidden temporary name beside ``path``, registered as being written by this process
    (release it with :func:`release_temp`)."""
    folder, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{base}.draft-{os.getpid()}-{secrets.token_hex(4)}.tmp")
    with _lock:
        _in_flight.add(tmp)
    return tmp


def release_temp(tmp: str) -> None:
    with _lock:
        _in_flight.discard(tmp)


def _process_alive(pid: int) -> Optional[bool]:
    """True/False when this system can tell, None when it cannot (Windows: os.kill would signal)."""
    if os.name != "posix":
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OSError:
        return None
    return True


def is_leftover(path: str, now: Optional[float] = None) -> bool:
    """Whether ``path`` is a temporary file of an atomic save that nobody is writing any more."""
    name = os.path.basename(path)
    m = _TEMP_RE.match(name)
    if m is None and not _LEGACY_TEMP_RE.match(name):
        return False
    if m is not None:
        pid = int(m.group(1))
        if pid == os.getpid():
            with _lock:
                return os.path.abspath(path) not in _in_flight
        alive = _process_alive(pid)
        if alive is not None:
            return not alive
    try:
        age = (time.time() if now is None else now) - os.stat(path).st_mtime
    except OSError:
        return False
    return age > STALE_SECONDS


def remove_leftovers(folder: str) -> list:
    """Delete the left-over temporary files of interrupted saves in ``folder`` (not below it);
    returns the names removed. Errors (a file vanishing meanwhile, no permission) are ignored."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(".") or not name.endswith(".tmp"):
            continue
        path = os.path.join(folder, name)
        if os.path.isfile(path) and is_leftover(path):
            try:
                os.remove(path)
                removed.append(name)
            except OSError:
                pass
    return removed


# -- atomic safetensors saves and checked reads ---------------------------------------------------
class LoRAFileError(ValueError):
    """A LoRA (or resume state) file is unreadable, truncated, foreign or does not fit the model."""


def atomic_save(tensors: Mapping[str, torch.Tensor], path: str, metadata: Mapping[str, str] | None,
                overwrite: bool = False) -> str:
    """``safetensors`` ``save_file`` through a hidden temporary file in the same folder
    (:func:`temp_path_for`; left-overs of saves killed mid-write in that folder are removed
    first).

    The temporary file is flushed to disk, then moved into place: with ``os.replace`` when
    ``overwrite``, else with ``os.link`` (atomic: fails if ``path`` appeared meanwhile). An
    interruption leaves either the old file or the complete new one, never a truncated file.
    Raises FileExistsError when ``path`` exists and ``overwrite`` is False. Returns ``path``.
    """
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    if not overwrite and os.path.exists(path):
        raise FileExistsError(f"{path} exists; refusing to overwrite it")
    remove_leftovers(folder)  # temporary files of saves killed mid-write
    tmp = temp_path_for(path)
    try:
        save_file(dict(tensors), tmp, metadata=dict(metadata or {}))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # a models folder is shared: plain umask permissions
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # no-clobber
            except FileExistsError:
                raise FileExistsError(f"{path} exists; refusing to overwrite it") from None
            except OSError:  # a filesystem without hard links
                if os.path.exists(path):
                    raise FileExistsError(f"{path} exists; refusing to overwrite it") from None
                os.replace(tmp, path)
        _fsync_dir(folder)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
        release_temp(tmp)
    return path


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_safetensors(path: str) -> tuple[dict, dict]:
    """``(tensors, metadata)`` of a safetensors file on the CPU; LoRAFileError if it is truncated,
    corrupt or not safetensors; FileNotFoundError if it does not exist."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    name = os.path.basename(path)
    try:
        with safe_open(path, "pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise LoRAFileError(f"{name} is not a readable .safetensors file (truncated or corrupt?): {e}") from e
    return tensors, metadata
