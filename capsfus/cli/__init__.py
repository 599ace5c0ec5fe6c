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
        except (KeyboardInterrupt, click.exceptions.Abort):
            # instead of click's bare "Aborted!": say what is kept and how to go on
            click.echo(interrupted_message(sys.argv[1:]), err=True)
            sys.exit(130)


def interrupted_message(args: list[str]) -> str:
    """What Ctrl-C prints. The command is repeated only when no argument could hold a secret
    (a URL may carry a key)."""
    import shlex
    if args and args[0] == "demo":
        return "interrupted: run `capsfus demo` again (it starts over in a fresh run directory)."
    same = ("`capsfus " + shlex.join(args) + "`" if args and not any("://" in a for a in args)
            else "the same command")
    return (f"interrupted: what was committed is kept (rows done so far, files written or "
            f"uploaded). To continue, run {same} again: it goes on from there and nothing is "
            f"done twice.")


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
