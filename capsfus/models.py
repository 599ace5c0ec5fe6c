"""Model resolution: turn ``--model`` (+ ``--revision``) into a folder to load and a revision
string to record, so that the settings hash changes whenever the model does.

- A local folder is recorded as ``local:<digest>``: a sha256 over the name, size and three
  sampled 64 KiB blocks (head, middle, tail) of every top-level file. Names and sizes alone miss
  a finetuned checkpoint (same shapes, same sizes); sampling keeps it cheap for a 26 GB model
  and, unlike mtimes, stable when the folder is copied to another node.
- A Hub id is resolved to its commit sha through the local HF cache or the Hub (whichever
  ``snapshot_download`` can reach), downloading only what ``from_pretrained`` needs. Compute
  nodes are often offline: resolve once on a login node, pass the sha on, and set
  ``HF_HUB_OFFLINE=1`` on the workers.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import re
from pathlib import Path

from .errors import UserError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
SAMPLE = 64 * 1024
# What from_pretrained reads besides the weights: configs, tokenizer files, chat templates,
# remote code.
SIDE_FILES = ["*.json", "*.model", "*.txt", "*.jinja", "*.py", "*.tiktoken"]


_CACHE_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("capsfus_cache_only",
                                                                   default=False)


@contextlib.contextmanager
def cache_only():
    """Within this block a Hub id is resolved from the local HF cache only, never downloaded;
    one that is not cached resolves to revision None (a dry run plans without fetching a
    model: the real submission resolves it)."""
    token = _CACHE_ONLY.set(True)
    try:
        yield
    finally:
        _CACHE_ONLY.reset(token)


def folder_digest(folder: Path) -> str:
    """Short sha256 over each top-level file's name, size and sampled content. Hidden files and
    byte code are left out (they change without the model changing)."""
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.name.startswith(".") or p.suffix == ".pyc":
            continue
        size = p.stat().st_size
        h.update(f"{p.name}\x00{size}\x00".encode())
        with open(p, "rb") as f:
            for offset in sorted({0, max(0, size // 2 - SAMPLE // 2), max(0, size - SAMPLE)}):
                f.seek(offset)
                h.update(f.read(SAMPLE))
    return h.hexdigest()[:16]


def normalize_model(model: str | None) -> str | None:
    """What the settings hash records for ``--model``: a local folder as its resolved absolute
    path (no trailing slash, no ``..``, symlinks followed), so the same folder typed relative,
    absolute or with a trailing slash compares equal; anything else (a Hub id) as given. What
    the user typed stays in the engine spec, for display."""
    if not model:
        return model
    path = Path(model).expanduser()
    return str(path.resolve()) if path.is_dir() else model


def resolve_model(model: str, revision: str | None = None,
                  gguf_file: str | None = None) -> tuple[str, str]:
    """Returns ``(load_path, revision_string)``; raises UserError with what to do otherwise."""
    path = Path(model).expanduser()
    if path.is_dir():
        if gguf_file and not (path / gguf_file).is_file():
            raise UserError(f"model folder {model} has no GGUF file {gguf_file!r}")
        return str(path), "local:" + folder_digest(path)
    if path.exists():
        raise UserError(f"--model {model} is a file; pass its folder as the model "
                        f"(and a GGUF file's name as the gguf file)")
    if not HUB_ID.match(model):
        raise UserError(f"model folder {model} does not exist")
    return _resolve_hub(model, revision, gguf_file)


def _resolve_hub(repo: str, revision: str | None, gguf_file: str | None) -> tuple[str, str]:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if _CACHE_ONLY.get():
        try:
            folder = snapshot_download(repo, revision=revision, local_files_only=True,
                                       allow_patterns=SIDE_FILES)
            return folder, Path(folder).name
        except Exception:   # not cached (or not reachable): the real submission resolves it
            return repo, None
    at = f" at revision {revision}" if revision else ""
    cli_rev = f" --revision {revision}" if revision else ""
    weights = [gguf_file] if gguf_file else ["*.safetensors"]
    try:
        folder = snapshot_download(repo, revision=revision, allow_patterns=SIDE_FILES + weights)
        if not gguf_file and not any(Path(folder).glob("*.safetensors")):
            # older repositories ship only PyTorch pickles
            folder = snapshot_download(repo, revision=revision,
                                       allow_patterns=SIDE_FILES + ["*.bin"])
    except GatedRepoError:
        raise UserError(f"model {repo} is gated: accept its licence on the Hub and log in "
                        f"with `hf auth login`") from None
    except RepositoryNotFoundError:
        raise UserError(f"model {repo} not found on the Hub (a typo, or a private repository: "
                        f"log in with `hf auth login`); a local folder must exist") from None
    except RevisionNotFoundError:
        raise UserError(f"model {repo} has no revision {revision!r}") from None
    except LocalEntryNotFoundError:
        raise UserError(f"model {repo}{at} not found locally and the Hub is unreachable (or "
                        f"HF_HUB_OFFLINE is set); download it first with `hf download {repo}"
                        f"{cli_rev}` where the Hub can be reached, into the same HF_HUB_CACHE"
                        ) from None
    except (HfHubHTTPError, OSError) as e:
        raise UserError(f"could not fetch model {repo}: {str(e).splitlines()[0]}") from None
    return folder, Path(folder).name
