"""Upload a folder to the Hugging Face Hub: token checks, repo creation, branch, upload.

Token: ``huggingface_hub.get_token()`` (``HF_TOKEN``, else the token saved by ``hf auth
login``). It is passed to the client and nowhere else: never printed, logged, written, or put
in an error message (errors from the client are turned into our own one-line messages).

Upload: ``HfApi.upload_folder``. In huggingface_hub 2.x this is the resumable large-folder
upload: with ``hf_xet`` installed (the normal case against the real Hub) it is the pipelined
multi-commit Xet upload (``upload_large_folder`` is gone from 2.x), where a rerun re-sends no
chunk the Hub already has. Without Xet (``HF_HUB_DISABLE_XET=1``, or a server that speaks only
git-LFS, like tests/hub_server.py) it is one commit over git-LFS; a rerun after an interruption
asks the LFS batch endpoint first and uploads only the objects the server does not hold yet, and
files already committed and unchanged are dropped from the commit. Either way: rerun the same
command to resume.

``--revision R``: a branch. It is created from ``main`` when missing, then the upload targets it
(``upload_folder(revision=R)``).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError

LOGIN_HINT = ("set HF_TOKEN to a token with write access (https://huggingface.co/settings/"
              "tokens) or run `hf auth login`")


def endpoint() -> str:
    """The Hub's URL as shown to the user: HF_ENDPOINT may carry credentials (a proxy's
    user:pass@ or key parameter), which are never printed or written."""
    from huggingface_hub import constants

    from ..errors import sanitize_url
    return sanitize_url(constants.ENDPOINT)


def get_token() -> str:
    from huggingface_hub import get_token as hf_get_token
    token = hf_get_token()
    if not token:
        raise UserError(f"no Hugging Face token found: {LOGIN_HINT}")
    return token


def _status(err) -> int | None:
    resp = getattr(err, "response", None)
    return getattr(resp, "status_code", None)


def _server_message(err) -> str:
    """The Hub's own reason (X-Error-Message), which never contains the token."""
    resp = getattr(err, "response", None)
    msg = resp.headers.get("X-Error-Message") if resp is not None else None
    return f" (the Hub says: {msg})" if msg else ""


def check_token(api, token: str) -> str:
    """Returns the user name; UserError when the token is invalid or read-only."""
    from huggingface_hub.errors import HfHubHTTPError
    try:
        info = api.whoami(token=token)
    except HfHubHTTPError as e:
        if _status(e) == 401:
            raise UserError(f"the Hugging Face token was rejected by {endpoint()} (invalid or "
                            f"expired): {LOGIN_HINT}") from None
        raise UserError(f"cannot check the token with {endpoint()}: HTTP {_status(e)}"
                        f"{_server_message(e)}") from None
    except Exception as e:
        if (cause := _in_chain(e, _is_transport_error)) is not None:
            raise UserError(f"cannot reach {endpoint()} ({type(cause).__name__}): check the "
                            f"network or HF_ENDPOINT") from None
        raise
    role = ((info.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise UserError(f"the Hugging Face token of {info.get('name')} is read-only: pushing "
                        f"needs a token with write access ({LOGIN_HINT})")
    return info.get("name", "?")


def _write_error(e, what: str, repo_id: str) -> UserError:
    status = _status(e)
    if status == 401:
        return UserError(f"{what} {repo_id}: the Hub refused the token (401){_server_message(e)}: "
                         f"{LOGIN_HINT}")
    if status == 403:
        return UserError(f"{what} {repo_id}: the token has no write access to this namespace "
                         f"(403){_server_message(e)}; use a write token of a member of "
                         f"{repo_id.split('/')[0]}")
    return UserError(f"{what} {repo_id}: HTTP {status}{_server_message(e)}")


def ensure_repo(api, repo_id: str, repo_type: str, private: bool, revision: str | None) -> str:
    """Creates the repo (and the branch) when missing; returns the repo's URL."""
    from huggingface_hub.errors import HfHubHTTPError
    try:
        url = api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
        info = api.repo_info(repo_id, repo_type=repo_type)
    except HfHubHTTPError as e:
        raise _write_error(e, "cannot create", repo_id) from None
    if private and not info.private:
        raise UserError(f"{repo_id} already exists and is public: make it private on the Hub "
                        f"first, or push without --private")
    if revision and revision != "main":
        try:
            refs = api.list_repo_refs(repo_id, repo_type=repo_type)
            if revision not in {b.name for b in refs.branches}:
                api.create_branch(repo_id, branch=revision, repo_type=repo_type, exist_ok=True)
        except HfHubHTTPError as e:
            raise _write_error(e, f"cannot create branch {revision} in", repo_id) from None
    return str(url)


def upload(api, folder: Path, repo_id: str, repo_type: str, revision: str | None,
           message: str, allow_patterns: list[str] | None = None) -> str:
    """Uploads ``folder`` (hidden files and folders left out); returns the commit id."""
    from huggingface_hub.errors import HfHubHTTPError
    try:
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type=repo_type,
                                 revision=revision, commit_message=message,
                                 allow_patterns=allow_patterns,
                                 ignore_patterns=[".*", ".*/**", "**/.*", "**/.*/**"])
    except HfHubHTTPError as e:
        raise _write_error(e, "upload to", repo_id) from None
    except ValueError as e:
        if "Invalid metadata in README.md" in str(e):
            from huggingface_hub import constants

            from ..errors import redact_url
            raise UserError(f"the Hub refused README.md's YAML header: "
                            f"{redact_url(str(e), constants.ENDPOINT)}") from None
        raise
    except Exception as e:             # errors from upload threads come wrapped
        http = _in_chain(e, lambda x: isinstance(x, HfHubHTTPError))
        if http is not None:
            raise _write_error(http, "upload to", repo_id) from None
        cause = _in_chain(e, _is_transport_error)
        if cause is None:
            raise
        # no str(e): the client's text may hold upload URLs; the class name says enough
        raise UserError(f"upload to {repo_id} interrupted ({type(cause).__name__}): rerun the "
                        f"same command to resume; files already uploaded are not sent "
                        f"again") from None
    return info.oid


def _is_transport_error(e: BaseException) -> bool:
    """A dropped connection or a timeout (httpx/httpcore transport errors, socket errors)."""
    if type(e).__name__ == "HTTPStatusError":
        return False
    return (type(e).__module__.startswith(("httpx", "httpcore"))
            or isinstance(e, (ConnectionError, TimeoutError)))


def _in_chain(e: BaseException | None, pred) -> BaseException | None:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if pred(e):
            return e
        e = e.__cause__ or e.__context__
    return None


def folder_files(folder: Path, allow=None) -> list[Path]:
    """The files upload_folder will consider (hidden ones excluded)."""
    from fnmatch import fnmatch
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and not any(part.startswith(".") for part in rel.split("/")):
            if allow is None or any(fnmatch(rel, a) for a in allow):
                out.append(p)
    return out


def push_folder(console, folder: Path, repo_id: str, repo_type: str, private: bool,
                revision: str | None, message: str, allow_patterns=None) -> dict:
    """Token check, repo (and branch), upload; prints what it does. Returns a summary."""
    from huggingface_hub import HfApi
    if "/" not in repo_id or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise UserError(f"--repo {repo_id!r}: use NAMESPACE/NAME (e.g. my-org/CapsFus-120M)")
    token = get_token()
    api = HfApi(token=token)
    user = check_token(api, token)
    files = folder_files(folder, allow_patterns)
    size = sum(p.stat().st_size for p in files)
    url = ensure_repo(api, repo_id, repo_type, private, revision)
    where = f"{url} ({revision or 'main'}{', private' if private else ''})"
    console.print(f"pushing {len(files)} files, {size / 1e6:,.1f} MB, as {user} to {where}")
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") is None:
        console.print("[dim]progress bars below come from huggingface_hub; interrupted? rerun "
                      "the same command: finished files are not sent again[/]")
    oid = upload(api, folder, repo_id, repo_type, revision, message, allow_patterns)
    console.print(f"[green]done[/]: commit {oid[:12]} on {where}")
    return {"repo_id": repo_id, "url": url, "revision": revision or "main", "commit": oid,
            "files": len(files), "bytes": size}


# ----------------------------------------------------------------------------- datasets
def dataset_folder(run_or_dir: Path, from_dir: Path | None) -> Path:
    """The export folder to push: --from DIR, RUN_OR_DIR itself when it is an export folder,
    or RUN/export/ for a run."""
    def is_export(d: Path) -> bool:
        return (d / "README.md").is_file() and any((d / "data").glob("*.parquet"))

    if from_dir is not None:
        if not is_export(from_dir):
            raise UserError(f"--from {from_dir}: not a dataset folder (needs README.md and "
                            f"data/*.parquet, as `capsfus export` writes)")
        return from_dir
    if is_export(run_or_dir):
        return run_or_dir
    if (run_or_dir / "manifest.json").is_file():
        if is_export(run_or_dir / "export"):
            return run_or_dir / "export"
        raise UserError(f"{run_or_dir} has no export yet: run `capsfus export {run_or_dir} "
                        f"--out {run_or_dir / 'export'}` first (or pass --from DIR)")
    raise UserError(f"{run_or_dir}: neither a run (manifest.json) nor a dataset folder "
                    f"(README.md and data/*.parquet)")


def push_dataset(console, run_or_dir: Path, repo_id: str, private: bool, revision: str | None,
                 from_dir: Path | None = None) -> dict:
    folder = dataset_folder(Path(run_or_dir), Path(from_dir) if from_dir else None)
    n = len(list((folder / "data").glob("*.parquet")))
    console.print(f"dataset folder {folder}: {n} parquet file(s)")
    return push_folder(console, folder, repo_id, "dataset", private, revision,
                       f"Upload dataset ({n} parquet files) with capsfus")


# ----------------------------------------------------------------------------- models
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json")
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json",
               "prompt.txt") + TOKENIZER_FILES


def model_files(ckpt: Path) -> tuple[list[Path], list[str]]:
    """(files to upload, notes on what is left out); UserError when there are no safetensors
    weights or no config.json."""
    adapter = (ckpt / "adapter_config.json").is_file()     # a LoRA adapter (PEFT)
    if not adapter and not (ckpt / "config.json").is_file():
        raise UserError(f"{ckpt}: no config.json, not a transformers model folder (nor an "
                        f"adapter_config.json: not a LoRA adapter either)")
    weights = sorted(ckpt.glob("*.safetensors"))
    pickles = sorted(p.name for p in ckpt.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not weights:
        what = f" (found {', '.join(pickles)}: pickle files run code when loaded)" if pickles \
            else ""
        raise UserError(f"{ckpt}: no .safetensors weights{what}. Only safetensors are pushed: "
                        f"convert with AutoModelForCausalLM.from_pretrained(CKPT)"
                        f".save_pretrained(OUT) (safetensors by default), then push OUT")
    names = MODEL_FILES + (("adapter_config.json",) if adapter else ())
    files = weights + [ckpt / n for n in names if (ckpt / n).is_file()]
    notes = [f"left out (pickle, not pushed): {', '.join(pickles)}"] if pickles else []
    others = sorted(p.name for p in ckpt.iterdir()
                    if p.is_file() and p not in files and p.suffix not in PICKLE_SUFFIXES
                    and not p.name.startswith(".") and p.name != "README.md")
    if others:
        notes.append(f"not pushed: {', '.join(others)}")
    return files, notes


def push_model(console, ckpt: Path, repo_id: str, private: bool, revision: str | None,
               license: str | None = None, base_model: str | None = None) -> dict:
    """Stages the safetensors weights, config, generation config, tokenizer, prompt and a
    rendered README.md as links in a temp folder (the checkpoint is never modified), then
    pushes that folder."""
    import shutil
    import tempfile

    from .model_card import read_prompt, render_model_card
    ckpt = Path(ckpt)
    if not (ckpt / "config.json").is_file() and not (ckpt / "adapter_config.json").is_file() \
            and ((ckpt / "model" / "config.json").is_file()
                 or (ckpt / "model" / "adapter_config.json").is_file()):
        ckpt = ckpt / "model"          # a `capsfus train` output folder
    if not ckpt.is_dir():
        raise UserError(f"{ckpt}: no such folder")
    files, notes = model_files(ckpt)
    card, facts = render_model_card(ckpt, repo_id, base_model=base_model, license=license)
    for n in notes:
        console.print(f"[yellow]{n}[/]")
    if facts["license"] is None:
        console.print(f"[yellow]licence {facts['license_note']}; the card's header has no "
                      f"license field (pass --license ID if you know it)[/]")
    else:
        console.print(f"licence: {facts['license']} ({facts['license_note']})")
    stage = Path(tempfile.mkdtemp(prefix="capsfus-push-model-"))
    try:
        for f in files:
            try:
                os.link(f.resolve(), stage / f.name)
            except OSError:            # another filesystem: a symlink reads the same
                os.symlink(f.resolve(), stage / f.name)
        (stage / "README.md").write_text(card, encoding="utf-8")
        if not (stage / "prompt.txt").exists():   # the card promises prompt.txt
            (stage / "prompt.txt").write_text(read_prompt(ckpt)[0] + "\n", encoding="utf-8")
        return push_folder(console, stage, repo_id, "model", private, revision,
                           f"Upload {repo_id.split('/')[-1]} with capsfus")
    finally:
        shutil.rmtree(stage, ignore_errors=True)
