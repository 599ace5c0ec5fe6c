"""``capsfus push dataset`` and ``capsfus push model``: publish to the Hugging Face Hub.

Registered in ``capsfus.cli`` with ``main.add_command(push)``. The token comes from
``HF_TOKEN`` or ``hf auth login`` and is never printed or written.
"""

from __future__ import annotations

from pathlib import Path

import click

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def make_console():
    from rich.console import Console
    return Console(stderr=True, soft_wrap=True)   # paths and URLs stay on one line


@click.group(context_settings=CONTEXT)
def push():
    """Publish a dataset export or a fine-tuned model to the Hugging Face Hub.

    \b
    Token: HF_TOKEN, or the one saved by `hf auth login` (write access needed).
    Another Hub (a mirror, a test server): set HF_ENDPOINT.
    Interrupted? Rerun the same command: files already uploaded are not sent again.
    """


def _common(f):
    f = click.option("--revision", metavar="BRANCH",
                     help="Branch to push to (created from main when missing). "
                          "Default: main.")(f)
    f = click.option("--private", is_flag=True,
                     help="Create the repo private (refused if it already exists public).")(f)
    f = click.option("--repo", "repo_id", required=True, metavar="NAMESPACE/NAME",
                     help="Hub repo id, e.g. my-org/CapsFus-120M.")(f)
    return f


@push.command("dataset", context_settings=CONTEXT)
@click.argument("run_or_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@_common
@click.option("--from", "from_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Dataset folder to push instead of RUN/export/.")
def push_dataset_cmd(run_or_dir, repo_id, private, revision, from_dir):
    """Upload a dataset export (README.md + data/*.parquet) to a Hub dataset repo.

    RUN_OR_DIR is a run (its export/ folder is pushed: make it with `capsfus export RUN
    --out RUN/export`) or an export folder itself. Afterwards
    `datasets.load_dataset("NAMESPACE/NAME")` loads it, streaming=True included.
    """
    from ..hub.push import push_dataset
    push_dataset(make_console(), run_or_dir, repo_id, private, revision, from_dir)


@push.command("model", context_settings=CONTEXT)
@click.argument("ckpt", type=click.Path(exists=True, file_okay=False, path_type=Path))
@_common
@click.option("--license", "license_id", metavar="ID",
              help="Licence id for the card (default: the base model's, when its card is "
                   "available locally; never guessed).")
@click.option("--base-model", metavar="HUB_ID",
              help="Base model for the card (default: from capsfus_training.json).")
def push_model_cmd(ckpt, repo_id, private, revision, license_id, base_model):
    """Upload a checkpoint (safetensors only) with a model card to a Hub model repo.

    CKPT is a transformers folder (or a `capsfus train` output, whose model/ is used). Pushed:
    *.safetensors, config.json, generation_config.json, the tokenizer files, prompt.txt and a
    README.md rendered from hub/model_card.md (prompt, transformers and vLLM snippets, training
    summary from capsfus_training.json). Pickle weights (.bin, .pt) are refused.
    """
    from ..hub.push import push_model
    push_model(make_console(), ckpt, repo_id, private, revision, license_id, base_model)
