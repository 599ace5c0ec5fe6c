"""Done means current: a finished shard counts as done only with today's settings and today's
input.

Every shard state records the settings hash it was made with (``settings_hash``) and the
sha256 of the upstream output it read (``input_sha256``: the manifest's checksum of the input
shard, or the final out file of the upstream stage's shard). A done shard is **stale** when

- ``settings``: its settings hash is not the stage's current one (``config.json``), e.g. after
  ``fuse --force --shards 0`` with new settings, the other shards are stale;
- ``input``: the upstream shard's output is not the one it read (the upstream shard was redone,
  or is being redone);
- ``unrecorded``: the state records no input checksum (made by an older capsfus): it cannot be
  shown current, so it is redone;
- ``upstream``: the upstream shard is itself stale (a filter over a stale fusion is stale).

Status shows stale shards; a stage redoes its stale shards when rerun (and refuses to read a
stale upstream shard); export refuses a run with stale shards. Reads only small state and
config files, never outputs.
"""

from __future__ import annotations

from .manifest import Run
from .stage import StageDir

STALE_WHY = {
    "settings": "made with other settings than the stage's current ones",
    "input": "made from upstream output that has changed since",
    "upstream": "read from an upstream shard that is itself stale",
    "unrecorded": "made before capsfus recorded the checksum of the input a shard reads",
}


def upstream_sha(run: Run, manifest: dict, input_stage: str, shard: int) -> str | None:
    """The checksum of what a stage reading ``input_stage`` reads for ``shard`` today (None
    when that upstream shard is not done)."""
    if input_stage == "input":
        shards = manifest["shards"]
        return shards[shard]["sha256"] if shard < len(shards) else None
    st = StageDir(run, input_stage).read_state(shard)
    if not st or st.get("status") != "done" or not st.get("final"):
        return None
    return (st["final"].get("out") or {}).get("sha256")


def state_is_current(state: dict | None, settings_hash: str | None,
                     input_sha: str | None) -> bool:
    """True when ``state`` was made with ``settings_hash`` from input ``input_sha``."""
    return bool(state) and input_sha is not None and \
        state.get("settings_hash") == settings_hash and state.get("input_sha256") == input_sha


def stale_map(run: Run, stage_name: str, manifest: dict | None = None,
              _memo: dict | None = None, states: dict[int, dict] | None = None
              ) -> dict[int, str]:
    """shard -> why (a key of STALE_WHY) for every *done* shard of ``stage_name`` that is not
    current. Follows the chain of input stages (each config's ``input_stage``). ``states``:
    the stage's states when the caller has read them already."""
    memo = _memo if _memo is not None else {}
    if stage_name == "input":
        return {}
    if stage_name in memo:
        return memo[stage_name]
    memo[stage_name] = {}                  # a cycle (a broken config) cannot recurse forever
    m = manifest or run.manifest()
    sd = StageDir(run, stage_name)
    cfg = sd.config()
    if cfg is None:
        return {}
    up = cfg.get("input_stage") or "input"
    up_stale = stale_map(run, up, m, memo)
    up_states = StageDir(run, up).all_states() if up != "input" else {}
    out: dict[int, str] = {}
    for shard, st in (states if states is not None else sd.all_states()).items():
        if st.get("status") != "done" or shard >= len(m["shards"]):
            continue
        if st.get("settings_hash") != cfg.get("settings_hash"):
            out[shard] = "settings"
            continue
        if shard in up_stale:
            out[shard] = "upstream"
            continue
        if up == "input":
            want = m["shards"][shard]["sha256"]
        else:
            ust = up_states.get(shard) or {}
            want = (ust.get("final") or {}).get("out", {}).get("sha256") \
                if ust.get("status") == "done" else None
        if st.get("input_sha256") is None:
            out[shard] = "unrecorded"
        elif want is None or st["input_sha256"] != want:
            out[shard] = "input"
    memo[stage_name] = out
    return out


def shard_list(shards) -> str:
    """0-3,7 style, the form --shards takes."""
    s = sorted(shards)
    parts, i = [], 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[j] + 1:
            j += 1
        parts.append(str(s[i]) if i == j else f"{s[i]}-{s[j]}")
        i = j + 1
    return ",".join(parts)


def redo_hint(run: Run, stage_name: str) -> str:
    """The command that redoes a stage's stale shards."""
    base = stage_name.split("@")[0]
    tag = f" --tag {stage_name.split('@', 1)[1]}" if "@" in stage_name else ""
    cmd = {"fuse": "fuse", "caption": "caption", "filter": "filter", "teacher": "teacher"}.get(
        base, base)
    return (f"`capsfus {cmd} {run.root}{tag}` with the settings in "
            f"{run.root / stage_name / 'config.json'} (or `capsfus resume {run.root}` for a "
            f"submitted stage)")


def stale_chain(run: Run, stage_name: str, manifest: dict | None = None) -> list[tuple[str, dict]]:
    """(stage, stale_map) for ``stage_name`` and each stage it reads from, where any is stale,
    upstream first: what must be redone, in order."""
    m = manifest or run.manifest()
    memo: dict = {}
    chain, name = [], stage_name
    seen = set()
    while name != "input" and name not in seen:
        seen.add(name)
        cfg = StageDir(run, name).config()
        if cfg is None:
            break
        chain.append(name)
        name = cfg.get("input_stage") or "input"
    out = []
    for name in reversed(chain):
        st = stale_map(run, name, m, memo)
        if st:
            out.append((name, st))
    return out


def stale_message(run: Run, stage_name: str, manifest: dict | None = None,
                  reading: str = "") -> str | None:
    """One line naming the stale shards of ``stage_name``'s chain and the command to run
    first (None when nothing is stale)."""
    chain = stale_chain(run, stage_name, manifest)
    if not chain:
        return None
    name, st = chain[0]
    whys = sorted(set(st.values()))
    return (f"{reading}stage {name} has {len(st)} stale shard(s) ({shard_list(st)}: "
            f"{'; '.join(STALE_WHY[w] for w in whys)}): redo them first with "
            f"{redo_hint(run, name)}")
