"""``capsfus teacher``: fused captions for a sample of a run from an OpenAI-compatible endpoint."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..errors import UserError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
EXIT_BUDGET = 4


def _preset(ctx, param, value):
    from .common import load_preset  # at call time: cli imports this module
    return load_preset(ctx, param, value)


@click.command("teacher", context_settings=CONTEXT)
@click.argument("run_dir", type=click.Path())
@click.option("--preset", type=click.Path(exists=True, dir_okay=False), is_eager=True,
              expose_value=False, callback=_preset,
              help="YAML file of option defaults, e.g. jobs/teacher-gpt35-paper.yaml.")
@click.option("--endpoint", required=True,  # may come from --preset
              help="Base URL of an OpenAI-compatible API: https://api.openai.com/v1, a `vllm "
                   "serve` (http://host:8000/v1), Azure "
                   "(https://RES.openai.azure.com/openai/deployments/NAME?api-version=V, or "
                   "…/openai/v1).")
@click.option("--model", "-m", required=True, help="Model name as the endpoint knows it.")
@click.option("--api", type=click.Choice(["chat", "completions"]), default="chat",
              show_default=True, help="chat: the prompt as one user message; completions: the "
                                      "plain prompt ending in `New Sentence:`.")
@click.option("--sample", type=int, help="Fuse this many rows, a seeded sample (default: all).")
@click.option("--seed", default=0, show_default=True,
              help="Sample seed: same seed, same rows (whatever the shard layout); a larger "
                   "--sample keeps the rows of a smaller one.")
@click.option("--concurrency", default=8, show_default=True, help="Requests in flight at most.")
@click.option("--rpm", type=float, help="Client-side limit, requests per minute.")
@click.option("--tpm", type=float, help="Client-side limit, tokens per minute (prompt estimate "
                                        "+ max tokens).")
@click.option("--max-cost", type=float,
              help="Budget in USD for this stage, all runs together: stops before passing it "
                   f"(exit {EXIT_BUDGET}); rerun with a larger budget to continue.")
@click.option("--prices", type=click.Path(exists=True, dir_okay=False),
              help="Price table (JSON/YAML: {model: {input: USD per 1M tokens, output: …}}).")
@click.option("--price-in", type=float, help="USD per 1M input tokens for --model.")
@click.option("--price-out", type=float, help="USD per 1M output tokens for --model.")
@click.option("--api-key-env", default="OPENAI_API_KEY", show_default=True,
              help="Environment variable holding the API key (the key is never a flag).")
@click.option("--timeout", default=60.0, show_default=True, help="Seconds per attempt.")
@click.option("--max-retries", default=6, show_default=True,
              help="Retries per request (429, 5xx, timeouts, resets, malformed bodies) before "
                   "the row is rejected with the reason.")
@click.option("--backoff-base", default=1.0, show_default=True,
              help="First retry waits up to this many seconds (full jitter), doubling each "
                   "retry up to 60 s; a Retry-After header wins.")
@click.option("--max-tokens", default=128, show_default=True, help="Answer length limit.")
@click.option("--temperature", type=float, help="Sampling temperature (default: the endpoint's).")
@click.option("--top-p", type=float, help="Nucleus sampling (default: the endpoint's).")
@click.option("--max-prompt-tokens", default=512, show_default=True,
              help="Prompt budget (estimated at 4 bytes a token); only the raw caption is cut.")
@click.option("--prompt-file", type=click.Path(exists=True, dir_okay=False),
              help="Replace the paper's prompt; must contain {raw} and {synthetic}.")
@click.option("--max-consecutive-failures", default=50, show_default=True,
              help="Stop when this many rows in a row fail for transient reasons (the endpoint "
                   "is down) instead of rejecting the whole sample.")
@click.option("--retry-rejected", is_flag=True,
              help="Resend rows rejected for transient reasons (rate limits, 5xx, timeouts …).")
@click.option("--tag", help="Name a separate teacher run of the same rows (stage teacher@TAG), "
                           "e.g. to compare teacher models.")
@click.option("--force", is_flag=True,
              help="Accept changed settings (answers to identical requests are reused from the "
                   "journal, not paid twice).")
@click.option("--lease-ttl", default=300.0, show_default=True,
              help="Seconds without a heartbeat after which a teacher process counts as gone "
                   "(frozen, hung mount) and the next `capsfus teacher` takes its run over; "
                   "the old one is fenced off and can write nothing when it wakes.")
def teacher_cmd(run_dir, endpoint, model, api, sample, seed, concurrency, rpm, tpm, max_cost,
                prices, price_in, price_out, api_key_env, timeout, max_retries, backoff_base,
                max_tokens, temperature, top_p, max_prompt_tokens, prompt_file,
                max_consecutive_failures, retry_rejected, tag, force, lease_ttl):
    """Fuse a seeded sample of RUN_DIR with a teacher LLM behind an OpenAI-compatible API (the
    paper used ChatGPT), writing the `teacher` stage: RUN_DIR/teacher/out has the sampled rows
    with `fused`, RUN_DIR/teacher/rejected the others with a reason.

    The key comes from the environment only (OPENAI_API_KEY, or --api-key-env NAME). Every
    request and answer is journaled: stop it any time (Ctrl-C, kill -9) and rerun the same
    command; answers already received are never paid for twice. Tokens and cost are shown
    live and kept in RUN_DIR/teacher/usage.json.

    \b
    Example:
      export OPENAI_API_KEY=…
      capsfus teacher RUN --endpoint https://api.openai.com/v1 --model gpt-3.5-turbo \\
          --sample 100000 --concurrency 32 --rpm 3000 --max-cost 50
    """
    from ..engines.openai_client import api_key_from_env
    from ..engines.prices import price_for
    from ..prompt import PromptTemplate
    from ..rundir.manifest import stage_name
    from ..stages.teacher import Teacher, TeacherOptions
    from .common import make_console, setup_console_logging

    for name, v, lo in (("--concurrency", concurrency, 1), ("--max-tokens", max_tokens, 1),
                        ("--max-retries", max_retries, 0), ("--sample", sample, 1),
                        ("--max-prompt-tokens", max_prompt_tokens, 16),
                        ("--max-consecutive-failures", max_consecutive_failures, 1)):
        if v is not None and v < lo:
            raise UserError(f"{name} must be at least {lo}")
    for name, v in (("--rpm", rpm), ("--tpm", tpm), ("--timeout", timeout),
                    ("--backoff-base", backoff_base), ("--lease-ttl", lease_ttl),
                    ("--max-cost", max_cost)):
        if v is not None and not v > 0:
            raise UserError(f"{name} must be positive")
    if not endpoint.startswith(("http://", "https://")):
        raise UserError(f"--endpoint {endpoint!r}: give a base URL such as "
                        f"https://api.openai.com/v1")
    key = api_key_from_env(api_key_env)
    price = price_for(model, prices, price_in, price_out)
    template = PromptTemplate.from_file(prompt_file) if prompt_file else PromptTemplate()
    opts = TeacherOptions(
        run_dir=str(Path(run_dir).resolve()), endpoint=endpoint, model=model, api=api,
        sample=sample, seed=seed, concurrency=concurrency, rpm=rpm, tpm=tpm, timeout=timeout,
        max_retries=max_retries, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
        max_prompt_tokens=max_prompt_tokens, max_cost=max_cost,
        max_consecutive_failures=max_consecutive_failures, retry_rejected=retry_rejected,
        force=force, template=template, backoff_base=backoff_base, lease_ttl=lease_ttl,
        stage=stage_name("teacher", tag))
    console = make_console()
    setup_console_logging(console)
    if not price.known:
        console.print(f"[yellow]no price known for {model}: cost is reported as unknown "
                      f"(pass --prices FILE or --price-in/--price-out)[/]")
    with _Live(console) as live:
        t = Teacher(opts, key, price, progress=live.update)
        usage = t.execute()
    _summary(console, opts, usage, t.fatal)


def _cost(u: dict) -> str:
    c = u["cost_usd"]
    if c["known"] is None:
        return "cost unknown"
    s = f"${c['known']:.4f}"
    if c["upper_bound"] > c["known"] + 1e-9:
        s += f" (at most ${c['upper_bound']:.4f} with possibly-billed failed attempts)"
    return s


def _line(u: dict) -> str:
    r, q, tk = u["rows"], u["requests"], u["tokens"]
    return (f"teacher: {r['done']:,}/{r['sampled']:,} rows, {q['in_flight']} in flight, "
            f"{q['retries']} retries; this stage so far: {tk['prompt']:,}+{tk['completion']:,} "
            f"tokens, {_cost(u)}")


class _Live:
    """One live status line (terminals), refreshed by the teacher about once a second."""

    def __init__(self, console):
        from rich.live import Live
        self.console = console
        self.live = Live("", console=console, transient=True, refresh_per_second=4,
                         auto_refresh=console.is_terminal)

    def update(self, usage: dict) -> None:
        if self.console.is_terminal:
            self.live.update(_line(usage))

    def __enter__(self):
        if self.console.is_terminal:
            self.live.start()
        return self

    def __exit__(self, *exc):
        if self.console.is_terminal:
            self.live.stop()


def _summary(console, opts, u: dict, fatal: str | None) -> None:
    r, q = u["rows"], u["requests"]
    console.print(_line(u))
    console.print(f"  {q['sent']:,} requests sent in all runs, {q['reused_from_journal']:,} "
                  f"answers reused from the journal, {q['orphaned_at_crash']:,} lost in flight "
                  f"at a crash; usage in {opts.run_dir}/{opts.stage}/usage.json")
    for reason, n in sorted(r["reasons"].items(), key=lambda kv: -kv[1]):
        console.print(f"    rejected {reason}: {n:,}")
    if u["stopped"] == "budget":
        c = u["cost_usd"]
        console.print(f"[yellow]stopped before the --max-cost budget of ${c['max_cost']:g}[/]: "
                      f"${c['upper_bound']:.4f} spent at most, {r['to_do']:,} rows to do. "
                      f"Rerun the same command with a larger --max-cost to continue (answers "
                      f"already received are not paid for again).")
        sys.exit(EXIT_BUDGET)
    if u["stopped"] == "fenced":
        raise UserError(f"{fatal}; see `capsfus status {opts.run_dir}`")
    if fatal:
        raise UserError(f"{fatal}. Nothing more was sent; {r['done']:,}/{r['sampled']:,} rows "
                        f"are done and kept: rerun the same command to continue"
                        + (" (add --retry-rejected to resend the rows that failed)"
                           if u["stopped"] == "failures" else ""))
