"""The ``capsfus`` command line: click commands only, one module per command group.

Each command is a thin layer over the package that does the work; the shared console, option
groups and progress live in ``common``. Nothing outside ``capsfus.cli`` imports it.
"""

from __future__ import annotations

import sys

import click

from ..errors import UserError
from .caption import caption_cmd, submit_caption_cmd
from .common import CONTEXT, executor_kwargs, executor_options
from .demo import demo
from .evaluate import bench, eval_cmd, plan_cmd
from .export import export_cmd
from .push import push
from .quality import filter_cmd, stats_cmd
from .run import cancel, cat, fuse, logs, resume, shard, status, submit
from .teacher import teacher_cmd
from .train import add_train_commands


class _Group(click.Group):
    """Turns UserError (and a few known failures) into one clear line and a non-zero exit."""

    def invoke(self, ctx):
        from ..rundir.io import CorruptFile
        try:
            return super().invoke(ctx)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except CorruptFile as e:
            click.echo(f"error: corrupted file: {e}. Rerun the stage to redo it.", err=True)
            sys.exit(3)


@click.group(cls=_Group, context_settings=CONTEXT)
@click.version_option(package_name="capsfus")
def main():
    """capsfus: shard caption datasets, fuse raw and synthetic captions with an LLM
    (CapsFusion), resume anything, and publish the result.

    \b
    Typical run:
      capsfus shard laion-coco/*.parquet --out RUN
      capsfus fuse RUN --engine transformers --model BAAI/CapsFus-LLaMA
      capsfus status RUN
      capsfus cat RUN --stage fuse | head
    Try it offline in a few minutes: capsfus demo
    """


for _cmd in (shard, fuse, status, cat, logs, cancel, submit, resume, demo, filter_cmd, stats_cmd,
             export_cmd, eval_cmd, bench, plan_cmd, caption_cmd, push, teacher_cmd):
    main.add_command(_cmd)
add_train_commands(main, submit, executor_options, executor_kwargs)
submit.add_command(submit_caption_cmd(executor_options))
