"""The dataset card (README.md) of an export, rendered from ``hub/dataset_card.md``.

The YAML header is built as data and dumped with PyYAML, so it always parses. The licence is
never invented: it comes from ``--license``, or from the licences found on the sources and the
fusion model (their README front matter, locally or in the Hub cache); when none is found, or
they disagree, the header has no ``license`` and the card says what is known and how to set it.
"""

from __future__ import annotations

import os
import string
from pathlib import Path

from ..errors import UserError
from ..prompt import PromptTemplate

SIZE_CATEGORIES = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                   (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M"),
                   (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B"),
                   (10_000_000_000, "1B<n<10B"), (100_000_000_000, "10B<n<100B"),
                   (1_000_000_000_000, "100B<n<1T")]

COLUMN_DOCS = {
    "id": "stable row id (the source's id, or `<source file>:<row>`)",
    "url": "image URL", "image_url": "image URL",
    "raw": "original web alt-text", "laion_2b": "original web alt-text (LAION-2B)",
    "synthetic": "synthetic caption (e.g. BLIP)", "laion_coco": "synthetic caption (LAION-COCO BLIP)",
    "fused": "fused caption (null when the filter dropped it, in a mix)",
    "capsfusion": "fused caption (null when the filter dropped it, in a mix)",
    "caption": "the caption to train on, drawn from the sources in `caption_source`",
    "caption_source": "which column `caption` came from",
    "filter_reasons": "why the fused caption was dropped (filter rule codes, or the fusion "
                      "stage's reason)",
}


def templates_dir() -> Path:
    d = Path(os.environ.get("CAPSFUS_HUB_TEMPLATES") or
             Path(__file__).resolve().parents[2] / "hub")
    if not (d / "dataset_card.md").exists():
        raise UserError(f"card templates not found in {d}: set CAPSFUS_HUB_TEMPLATES to the "
                        f"capsfus checkout's hub/ folder")
    return d


def size_category(n: int) -> str:
    for limit, name in SIZE_CATEGORIES:
        if n < limit:
            return name
    return "n>1T"


def front_matter(text: str) -> dict:
    """The YAML header of a README.md (empty when there is none or it does not parse)."""
    import yaml
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    if end < 0:
        return {}
    try:
        data = yaml.safe_load(text[3:end])
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _license_of_readme(path: Path) -> str | None:
    try:
        lic = front_matter(path.read_text(encoding="utf-8")).get("license")
    except (OSError, UnicodeDecodeError):
        return None
    if isinstance(lic, list):
        lic = ", ".join(map(str, lic))
    return str(lic) if lic else None


def _hub_cached_readme(repo: str, revision: str | None, repo_type: str) -> Path | None:
    """README.md of a Hub repo if it is in the local cache (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
        p = try_to_load_from_cache(repo, "README.md", revision=revision, repo_type=repo_type)
    except Exception:  # noqa: BLE001  (an odd repo id or cache layout: just unknown)
        return None
    return Path(p) if isinstance(p, str) else None


def find_licenses(manifest: dict, stages: list[dict]) -> list[dict]:
    """[{what, name, license or None, where}] for every source and model of the export."""
    found = []
    for src in manifest.get("sources", []):
        path, kind = src.get("path", ""), src.get("kind")
        readme = None
        if kind == "hf-hub":
            readme = _hub_cached_readme(path, None, "dataset")
        else:
            p = Path(path)
            for cand in ([p / "README.md"] if p.is_dir() else []) + [p.parent / "README.md"]:
                if cand.exists():
                    readme = cand
                    break
        lic = _license_of_readme(readme) if readme else None
        found.append({"what": "source", "name": path, "license": lic,
                      "where": str(readme) if readme else None})
    for st in stages:
        s = st.get("settings") or {}
        model = s.get("model")
        if not model or model == "echo" or s.get("engine") == "echo":
            continue
        readme = None
        if Path(model).is_dir():
            cand = Path(model) / "README.md"
            readme = cand if cand.exists() else None
        else:
            readme = _hub_cached_readme(model, s.get("revision"), "model")
        lic = _license_of_readme(readme) if readme else None
        found.append({"what": f"model of stage {st['stage']}", "name": model, "license": lic,
                      "where": str(readme) if readme else None})
    return found


def choose_license(given: str | None, found: list[dict]) -> tuple[str | None, str]:
    """(the header's licence or None, the card's licence section)."""
    lines = [f"- {f['what']} `{f['name']}`: "
             + (f"`{f['license']}` (from {f['where']})" if f["license"] else "not found")
             for f in found]
    listing = "\n".join(lines) if lines else "- no source or model licence information"
    if given:
        return given, (f"Released under `{given}` (chosen by the publisher). The licences "
                       f"found on its inputs:\n\n{listing}")
    known = {f["license"] for f in found if f["license"]}
    unknown = [f for f in found if not f["license"]]
    if len(known) == 1 and not unknown:
        lic = known.pop()
        return lic, f"`{lic}`, the licence of every source and model it was made from:\n\n{listing}"
    return None, ("No licence is declared: capsfus does not guess one. What was found on the "
                  f"inputs:\n\n{listing}\n\nThe publisher should choose one that respects "
                  f"these (`capsfus export … --license ID`).")


def _yaml_header(summary: dict, opts, license_id: str | None, pretty: str) -> str:
    import yaml
    header: dict = {}
    if license_id:
        header["license"] = license_id
    header["pretty_name"] = pretty
    header["language"] = list(opts.language)
    header["task_categories"] = ["image-to-text", "text-to-image"]
    header["tags"] = ["capsfusion", "image-captioning", "synthetic-captions"]
    header["size_categories"] = [size_category(summary["rows"]["exported"])]
    header["configs"] = [{"config_name": "default",
                          "data_files": [{"split": "train", "path": "data/train-*.parquet"}]}]
    # What this export holds, in the Hub's own `dataset_info` keys. The datasets library keys
    # its cache of a local folder by the folder's name plus a hash of the card's `configs:`
    # (data file *patterns*, the same for every export) and `dataset_info`: without these
    # figures every folder named `export` shares one cache entry, and load_dataset(DIR)
    # returns another export's rows (or the old rows after `export --overwrite`). The row
    # count and byte size make the entry this export's; the row count is also verified by
    # `load_dataset` when it builds the cache.
    size = int(summary.get("bytes") or 0)
    header["dataset_info"] = {
        "config_name": "default",
        "splits": [{"name": "train", "num_bytes": size,
                    "num_examples": int(summary["rows"]["exported"])}],
        "download_size": size, "dataset_size": size}
    return yaml.safe_dump(header, sort_keys=False, allow_unicode=True).strip()


def _prompt_text(settings: dict) -> str:
    src = settings.get("prompt_source")
    t = PromptTemplate()
    if src in (None, "paper"):
        return t.render_text("<raw caption>", "<synthetic caption>") + t.cue
    try:
        tf = PromptTemplate.from_file(src)
        if tf.sha256 == settings.get("prompt_sha256"):
            return tf.display()
    except UserError:
        pass
    return f"(a custom prompt file, {src}, sha256 {settings.get('prompt_sha256')})"


def _how_made(summary: dict, run) -> str:
    parts = []
    m = run.manifest()
    src = ", ".join(f"`{s['path']}`" for s in m.get("sources", [])[:5])
    more = len(m.get("sources", [])) - 5
    parts.append(f"- **Sources**: {src}{f' and {more} more' if more > 0 else ''} (column "
                 f"layout `{(m.get('mapping') or {}).get('layout')}`), "
                 f"{m.get('counts', {}).get('accepted', 0):,} rows accepted at ingest.")
    for st in reversed(summary["stages"]):
        s = st.get("settings") or {}
        base = st["stage"].split("@")[0]
        if base == "fuse":
            dec = s.get("decoding") or {}
            dec_txt = ", ".join(f"{k}={v}" for k, v in dec.items() if v is not None)
            parts.append(f"- **Fusion** (stage `{st['stage']}`): engine `{s.get('engine')}`, "
                         f"model `{s.get('model')}` at revision `{s.get('revision')}`; "
                         f"decoding {dec_txt or 'default'}; prompt budget "
                         f"{s.get('max_prompt_tokens') or 'from the model context'}. Prompt:\n\n"
                         f"```\n{_prompt_text(s)}\n```")
        elif base == "filter":
            rep_path = run.root / st["stage"] / "report.json"
            rules = ""
            if rep_path.exists():
                import json
                rep = json.loads(rep_path.read_text())
                rows = [f"| `{r['code']}` | {r['action']} | {r['rows']:,} | {r['share']:.2%} | "
                        f"{r.get('doc', r.get('description', ''))} |" for r in rep["rules"]]
                rules = ("\n\n| rule | action | rows | share | what it catches |\n"
                         "|---|---|---:|---:|---|\n" + "\n".join(rows) +
                         f"\n\nThe filter kept {rep['kept']:,} of {rep['rows']:,} fused "
                         f"captions ({rep['share_kept']:.2%}); a dropped row may fail several "
                         f"rules.")
            parts.append(f"- **Filter** (stage `{st['stage']}`, rules sha256 "
                         f"`{str(s.get('rules_sha256'))[:12]}`): heuristic rules on the fused "
                         f"caption; `strip` rules clean the text, `drop` rules remove it.{rules}")
        elif base == "caption":
            parts.append(f"- **Synthetic captions** (stage `{st['stage']}`): model "
                         f"`{s.get('model')}` at revision `{s.get('revision')}`.")
    return "\n".join(parts)


def _counts_table(summary: dict) -> str:
    r = summary["rows"]
    lines = ["| rows | count |", "|---|---:|",
             f"| accepted at ingest | {r['accepted']:,} |"]
    for code, n in sorted((r.get("rejected_at_ingest") or {}).items()):
        lines.append(f"| refused at ingest: `{code}` | {n:,} |")
    for code, n in r["excluded"].items():
        lines.append(f"| not exported: `{code}` | {n:,} |")
    lines.append(f"| **exported** | **{r['exported']:,}** |")
    saf = summary["safety"]
    notes = []
    if saf["max_punsafe"] is not None:
        notes.append(f"rows with `punsafe` > {saf['max_punsafe']} removed")
    if saf["max_pwatermark"] is not None:
        notes.append(f"rows with `pwatermark` > {saf['max_pwatermark']} removed")
    if saf["exclusion_list"]:
        notes.append(f"an exclusion list of {saf['exclusion_list']['ids']:,} ids and "
                     f"{saf['exclusion_list']['urls']:,} URLs (takedown requests) applied")
    if summary.get("coerced_values"):
        notes.append("values that did not fit their column's type were written as null: "
                     + ", ".join(f"`{k}` {v:,}" for k, v in summary["coerced_values"].items()))
    return "\n".join(lines) + ("\n\n" + "; ".join(notes).capitalize() + "." if notes else "")


def _mix_section(summary: dict) -> str:
    c = summary["caption"]
    mix = c["mix"]
    if list(mix) == ["fused"] and not c.get("mix_name") and not c["fallbacks"] and \
            set(c["used"]) <= {"fused"}:
        return ("`caption` is the fused caption of every row (rows without one, e.g. "
                "dropped by the filter, are not exported).")
    req = ", ".join(f"{k} {v:.0%}" for k, v in mix.items())
    real = ", ".join(f"{k} {v:.2%}" for k, v in c["realised_shares"].items())
    fb = ", ".join(f"{k}: {v:,}" for k, v in c["fallbacks"].items()) or "none"
    name = f" (preset `{c['mix_name']}`)" if c.get("mix_name") else ""
    missing = (f"the next in the order {' > '.join(c['fallback_order'])} is used; fallbacks: "
               f"{fb}" if len(c["fallback_order"]) > 1 else "the row is not exported")
    return (f"Mix{name}: requested {req}; realised {real}. Each row's source is drawn from a "
            f"hash of (seed {c['seed']}, id), so the same seed gives the same dataset. When the "
            f"drawn source is missing for a row {missing}. All source columns are kept, so the "
            f"data can be re-mixed.")


def _stats_table(summary: dict) -> str:
    st = summary.get("stats")
    if not st:
        return "Not computed."
    from ..quality.stats import table3_rows
    lines = table3_rows(st["fields"])
    return ("\n".join(lines) + "\n\nWords are `str.split()` tokens (case and punctuation kept); a "
            "trigram is 3 consecutive words of one caption; unique trigrams are exact (64-bit "
            "hashes). ![caption lengths](stats/lengths.png)")


def _columns_table(summary: dict) -> str:
    lines = ["| column | what |", "|---|---|"]
    for c in summary["columns"]:
        doc = COLUMN_DOCS.get(c) or ("passed through from the source" if c in
                                     summary["passthrough_columns"] else "")
        lines.append(f"| `{c}` | {doc} |")
    return "\n".join(lines)


MOSTLY = 0.5     # the card calls the captions fused only when at least this share is


def fused_share(summary: dict) -> float:
    """The share of exported rows whose `caption` is a fused caption."""
    return summary["caption"]["realised_shares"].get("fused", 0.0) \
        if summary["rows"]["exported"] else 0.0


def default_title(summary: dict) -> str:
    """A title that says what the `caption` column holds."""
    if fused_share(summary) >= MOSTLY:
        return "Fused image captions"
    top = max(summary["caption"]["realised_shares"].items(), key=lambda kv: kv[1],
              default=(None, 0))[0]
    return {"raw": "Image captions (mostly web alt-text)",
            "synthetic": "Image captions (mostly synthetic captions)"}.get(
        top, "Image captions")


def _intro(summary: dict, pretty: str) -> str:
    n = f"**{summary['rows']['exported']:,}**"
    share = fused_share(summary)
    recipe = ("[CapsFusion](https://arxiv.org/abs/2310.20550): a language model reads each "
              "image's web alt-text (knowledge-rich but noisy) and a synthetic caption (clean "
              "but knowledge-poor) and writes one caption that keeps the knowledge of the first "
              "in the structure of the second")
    if share >= MOSTLY:
        text = f"{pretty} holds {n} image-caption pairs whose captions were made with {recipe}."
    else:
        real = ", ".join(f"{k} {v:.0%}" for k, v in summary["caption"]["realised_shares"].items())
        text = (f"{pretty} holds {n} image-caption pairs from a run of {recipe}. **Only "
                f"{share:.0%} of the `caption` column is a fused caption** (sources: "
                f"{real or 'none'}): most fused captions were dropped (see \"Rows: what was "
                f"kept and why\"), and the caption mix fell back to the other sources.")
    p = summary.get("partial")
    if p and p["unfinished_shards"]:
        text += (f" **Partial export:** {len(p['unfinished_shards'])} of {p['shards']} shards "
                 f"of the run were not finished ({', '.join(p['stages'])}); their "
                 f"{p['rows_left_out']:,} rows are not in it.")
    return text


def render_dataset_card(run, summary: dict, opts, folder: Path) -> str:
    """README.md for the export folder ``folder`` (plots go to ``folder/stats/``)."""
    found = find_licenses(run.manifest(), summary["stages"])
    license_id, license_section = choose_license(opts.license, found)
    summary["license"] = {"id": license_id, "found": found}
    repo = opts.repo_id or "ORG/NAME"
    pretty = opts.pretty_name or (opts.repo_id.split("/")[-1] if opts.repo_id else
                                  default_title(summary))
    if summary.get("stats"):
        from ..quality.stats import plot_lengths
        (folder / "stats").mkdir(exist_ok=True)
        try:
            plot_lengths({**summary["stats"], "stage": "export"}, folder / "stats" /
                         "lengths.png")
        except ImportError:
            pass
    tmpl = string.Template((templates_dir() / "dataset_card.md").read_text(encoding="utf-8"))
    return tmpl.substitute(
        yaml=_yaml_header(summary, opts, license_id, pretty), pretty_name=pretty,
        intro=_intro(summary, pretty),
        rows_exported=f"{summary['rows']['exported']:,}",
        capsfus_version=summary["capsfus_version"], run_id=summary["run_id"][:8],
        created=summary["created"][:10], repo_id=repo, caption_column="caption",
        columns_table=_columns_table(summary), mix_section=_mix_section(summary),
        how_made=_how_made(summary, run), counts_table=_counts_table(summary),
        stats_table=_stats_table(summary), license_section=license_section)
