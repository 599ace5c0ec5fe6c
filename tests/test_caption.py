"""The caption stage on a tiny random BLIP (and CLIP) built from configs: img2dataset inputs
(webdataset tars, image-bytes parquet) written here with generated images, broken ones
included; the real CLI in subprocesses; kill -9 / crash points and resume exactly-once;
shard → caption → fuse (echo) end to end; `submit caption` on the local SLURM cluster."""

from __future__ import annotations

import io
import json
import random
import signal
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from runhelp import assert_exactly_once, capsfus, input_ids, popen, stage_rows

from capsfus.ingest.images import ImageReader, decode, load_image, resize_uint8
from capsfus.rundir.manifest import Run
from capsfus.rundir.stage import StageDir

WORDS = ("a an the picture of photo dog cat red blue car man woman on in with street table "
         "house tree sky white black two small big green field water boat").split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
FAST = ["--num-beams", 1, "--max-new-tokens", 6, "--min-side", 8, "--max-pixels", 4_000_000]


# ------------------------------------------------------------------------- tiny models
def _vocab(folder: Path) -> Path:
    vocab = SPECIALS + WORDS + ["[DEC]"]
    path = folder / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n")
    return path


def build_tiny_blip(folder: Path, image_size: int = 32, patch_size: int = 8) -> None:
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration
    tok = BertTokenizer(str(_vocab(folder)), do_lower_case=True, model_max_length=64)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.save_pretrained(folder)
    n = len(tok)
    cfg = BlipConfig(
        text_config=dict(vocab_size=n, hidden_size=32, encoder_hidden_size=32,
                         intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=64, bos_token_id=n - 1, pad_token_id=0,
                         sep_token_id=3, eos_token_id=3, initializer_range=0.3),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=image_size,
                           patch_size=patch_size, initializer_range=0.3),
        projection_dim=32, image_text_hidden_size=32)
    torch.manual_seed(0)
    BlipForConditionalGeneration(cfg).save_pretrained(folder)
    # BLIP's own preprocessing settings, read by capsfus (no transformers image processor)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "BlipImageProcessor",
        "size": {"height": image_size, "width": image_size},
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711]}))


def build_tiny_clip(folder: Path) -> None:
    import torch
    from transformers import BertTokenizer, CLIPConfig, CLIPModel
    tok = BertTokenizer(str(_vocab(folder)), do_lower_case=True, model_max_length=32)
    tok.save_pretrained(folder)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=32,
                         bos_token_id=2, eos_token_id=3, pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=24, patch_size=8),
        projection_dim=16)
    torch.manual_seed(1)
    CLIPModel(cfg).save_pretrained(folder)


@pytest.fixture(scope="session")
def blip_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-blip")
    build_tiny_blip(folder)
    return folder


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-clip")
    build_tiny_clip(folder)
    return folder


# ------------------------------------------------------------------------- images
def image_bytes(seed: int, fmt: str = "JPEG", size=(48, 40), mode: str = "RGB") -> bytes:
    from PIL import Image
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    im = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def huge_png(side: int = 3000) -> bytes:
    """A small file whose header says side x side pixels (9 M > the tests' --max-pixels)."""
    from PIL import Image
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, format="PNG")
    return buf.getvalue()


def broken_images() -> dict[str, tuple[bytes | None, str]]:
    """key -> (bytes or None for no image member, expected reason)."""
    jpg = image_bytes(999, size=(64, 64))
    return {
        "bad_garbage": (b"this is not an image at all" * 10, "image_undecodable"),
        "bad_truncated": (jpg[: len(jpg) // 2], "image_truncated"),
        "bad_tiny": (image_bytes(5, "PNG", size=(4, 4)), "image_too_small"),
        "bad_huge": (huge_png(), "image_too_large"),
        "bad_noimage": (None, "image_missing"),
    }


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tf.addfile(info, io.BytesIO(data))


def write_wds(folder: Path, n_shards: int = 2, per_shard: int = 12, broken: bool = True
              ) -> dict[str, str | None]:
    """img2dataset-like webdataset output: NNNNN.tar (+ the metadata .parquet and
    _stats.json img2dataset writes beside them). Returns key -> expected reject reason."""
    folder.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str | None] = {}
    fmts = ["JPEG", "PNG", "WEBP"]
    bad = list(broken_images().items()) if broken else []
    for s in range(n_shards):
        keys = []
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tf:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                fmt = fmts[i % 3]
                ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[fmt]
                data: bytes | None = image_bytes(s * 1000 + i, fmt,
                                                 mode="L" if i == 4 else "RGB")
                reason = None
                if s == 0 and i < len(bad):
                    data, reason = bad[i][1]
                    ext = "png" if bad[i][0] in ("bad_tiny", "bad_huge") else "jpg"
                if data is not None:
                    _add(tf, f"{key}.{ext}", data)
                caption = f"alt text {key} Acme photo"
                _add(tf, f"{key}.txt", caption.encode())
                _add(tf, f"{key}.json", json.dumps({
                    "key": key, "url": f"https://example.org/{key}.{ext}", "caption": caption,
                    "status": "success", "width": 48, "height": 40}).encode())
                expected[key] = reason
                keys.append(key)
        pq.write_table(pa.table({  # img2dataset's metadata: the same rows, no images
            "key": keys, "url": [f"https://example.org/{k}.jpg" for k in keys],
            "caption": [f"alt text {k} Acme photo" for k in keys],
            "status": ["success"] * len(keys)}), folder / f"{s:05d}.parquet")
        (folder / f"{s:05d}_stats.json").write_text(json.dumps({"count": len(keys)}))
    return expected


def write_image_parquet(path: Path, n: int = 10, with_blip: bool = True) -> list[bytes | None]:
    images: list[bytes | None] = [image_bytes(500 + i) for i in range(n)]
    images[3] = None                                  # a failed download: null cell
    cols = {"url": [f"https://example.org/p{i}.jpg" for i in range(n)],
            "caption": [f"parquet alt text {i}" for i in range(n)],
            "key": [f"p{i:04d}" for i in range(n)],
            "jpg": pa.array(images, pa.binary())}
    if with_blip:
        cols["blip"] = [f"an existing caption {i}" if i % 2 == 0 else None for i in range(n)]
    pq.write_table(pa.table(cols), path, row_group_size=4)
    return images


def captioned_run(tmp_path: Path, blip) -> tuple[Path, list]:
    """10 image rows in shards of 5, captioned by ``blip``: the run and its caption command."""
    write_image_parquet(tmp_path / "imgs.parquet")
    run = tmp_path / "run"
    capsfus("shard", tmp_path / "imgs.parquet", "--out", run, "--synthetic-col", "blip",
            "--rows-per-shard", 5)
    cap = ["caption", run, "--model", blip, "--chunk-size", 5, "--decode-threads", 0, *FAST]
    capsfus(*cap)
    return run, cap


def run_rows(run: Path, stage: str) -> dict[str, dict]:
    out, _ = stage_rows(run, stage)
    return {r["id"]: r for r in out}


# ------------------------------------------------------------------------- ingest
def test_shard_webdataset_keeps_references_not_bytes(tmp_path):
    expected = write_wds(tmp_path / "wds")
    run = tmp_path / "run"
    capsfus("shard", tmp_path / "wds", "--out", run, "--rows-per-shard", 10)
    m = Run(run).manifest()
    assert m["mapping"]["layout"] == "img2dataset"
    assert [Path(s["path"]).suffix for s in m["sources"]] == [".tar", ".tar"]  # metadata left
    assert m["counts"]["accepted"] == len(expected) == 24
    assert m["counts"]["flagged"]["no_synthetic"] == 24
    rows = [json.loads(x) for x in capsfus("cat", run, "--stage", "input").stdout.splitlines()]
    by_key = {r["key"]: r for r in rows}
    assert set(by_key) == set(expected)
    reader = ImageReader()
    for key, r in by_key.items():
        assert r["synthetic"] is None and r["raw"] == f"alt text {key} Acme photo"
        assert r["url"].startswith("https://example.org/")
        if expected[key] == "image_missing":
            assert r["image"] is None
            continue
        ref = r["image"]
        assert set(ref) == {"tar", "member", "offset", "size"} and ref["member"].startswith(key)
        with tarfile.open(ref["tar"]) as tf:  # the reference reads exactly the member
            assert reader.read(ref) == tf.extractfile(ref["member"]).read()
    # no image bytes in the JSONL shards
    assert max(len(json.dumps(r)) for r in rows) < 600


def test_img2dataset_metadata_files_are_left_out_of_globs_and_folders(tmp_path):
    """`dir/*` picks the metadata parquet and _stats.json beside each tar too: they are not
    rows (the parquet lists the same samples again, without images)."""
    expected = write_wds(tmp_path / "wds", broken=False)
    capsfus("shard", f"{tmp_path}/wds/*", "--out", tmp_path / "run")
    m = Run(tmp_path / "run").manifest()
    assert [Path(s["path"]).name for s in m["sources"]] == ["00000.tar", "00001.tar"]
    assert m["counts"]["accepted"] == len(expected)
    # img2dataset's parquet output: NNNNN.parquet (the images) + NNNNN_stats.json
    (tmp_path / "pq").mkdir()
    write_image_parquet(tmp_path / "pq" / "00000.parquet")
    (tmp_path / "pq" / "00000_stats.json").write_text(json.dumps({"count": 10}))
    for i, spec in enumerate((tmp_path / "pq", f"{tmp_path}/pq/*")):
        capsfus("shard", spec, "--out", tmp_path / f"pq{i}")
        m = Run(tmp_path / f"pq{i}").manifest()
        assert [Path(s["path"]).name for s in m["sources"]] == ["00000.parquet"]
        assert m["counts"]["accepted"] == 10


def test_shard_truncated_tar_keeps_what_is_whole_and_says_so(tmp_path):
    write_wds(tmp_path / "wds", n_shards=1, per_shard=6, broken=False)
    tar = tmp_path / "wds" / "00000.tar"
    tar.write_bytes(tar.read_bytes()[:20480])       # cut at a block boundary, mid-archive
    run = tmp_path / "run"
    p = capsfus("shard", tar, "--out", run)
    c = Run(run).manifest()["counts"]
    assert c["accepted"] == 3 and c["rejected"] == {"raw_missing": 1, "unparseable": 1}
    assert "rejected unparseable: 1" in p.stderr
    rej = [json.loads(x) for x in
           capsfus("cat", run, "--stage", "input", "--rejected").stdout.splitlines()]
    assert any("end-of-archive" in r["detail"] for r in rej)


def test_shard_image_parquet_references_rows(tmp_path):
    images = write_image_parquet(tmp_path / "imgs.parquet")
    run = tmp_path / "run"
    capsfus("shard", tmp_path / "imgs.parquet", "--out", run, "--synthetic-col", "blip")
    rows = [json.loads(x) for x in capsfus("cat", run, "--stage", "input").stdout.splitlines()]
    assert len(rows) == 10 and "jpg" not in rows[0]
    reader = ImageReader()
    for i, r in enumerate(rows):
        assert r["image"] == {"parquet": str((tmp_path / "imgs.parquet").resolve()),
                              "column": "jpg", "row": i}
        assert reader.read(r["image"]) == images[i]       # across row groups of 4
        assert r["synthetic"] == (f"an existing caption {i}" if i % 2 == 0 else None)
    assert Run(run).manifest()["counts"]["flagged"]["no_synthetic"] == 5


def test_a_tar_rewritten_after_ingest_is_not_read_as_other_images(tmp_path):
    """img2dataset run again into the same folder: the same offsets now hold other samples.
    Their bytes must not be captioned as the rows' images."""
    from capsfus.ingest.images import tar_records
    a, b = image_bytes(1, "BMP", size=(40, 40)), image_bytes(2, "BMP", size=(40, 40))
    assert len(a) == len(b)            # before: b decoded as k1 without a word
    tar = tmp_path / "00000.tar"
    for order in ((("k1.jpg", a), ("k2.jpg", b)), (("k2.jpg", b), ("k1.jpg", a))):
        if not tar.exists():
            with tarfile.open(tar, "w") as tf:
                for name, data in order:
                    _add(tf, name, data)
            refs = {r["image"]["member"]: r["image"] for r in tar_records(str(tar))}
            assert ImageReader().read(refs["k1.jpg"]) == a
        else:                                      # rewritten: k2 now sits where k1 was
            tar.unlink()
            with tarfile.open(tar, "w") as tf:
                for name, data in order:
                    _add(tf, name, data)
    got = load_image(ImageReader(), refs["k1.jpg"])
    assert got.reason == "image_unreadable" and "changed since ingest" in got.detail, got


def test_parquet_reader_keeps_few_row_groups(tmp_path):
    """A worker reads many image parquet files: only the last row groups stay in memory."""
    reader = ImageReader()
    files = {tmp_path / f"{i}.parquet": write_image_parquet(tmp_path / f"{i}.parquet")
             for i in range(3)}
    for _ in range(2):
        for path, images in files.items():
            for row in range(10):
                ref = {"parquet": str(path), "column": "jpg", "row": row}
                assert reader.read(ref) == images[row]
                assert len(reader._groups) <= 2


def test_centre_crop_never_makes_a_huge_intermediate(monkeypatch):
    """CLIP's resize-then-crop of a banner (8 x 6000) must not build a 24 x 18000 image."""
    from PIL import Image
    banner = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 6000, 3), np.uint8))
    sizes = []
    resize = Image.Image.resize

    def spy(self, size, *a, **kw):
        sizes.append(tuple(size))
        return resize(self, size, *a, **kw)

    monkeypatch.setattr(Image.Image, "resize", spy)
    out = resize_uint8(banner, (24, 24), crop=True)
    assert out.shape == (24, 24, 3) and sizes == [(24, 24)]
    # what resizing the whole banner and cropping its centre gives (bicubic phase aside)
    whole = resize(banner, (18000, 24), Image.BICUBIC).crop((8988, 0, 9012, 24))
    assert np.abs(out.astype(int) - np.asarray(whole, dtype=int)).mean() < 1


def test_blip_pixels_match_blip_image_processor(blip_dir):
    """Our PIL preprocessing (no torchvision) gives BlipImageProcessor's pixel values, with
    the model's own size, mean and std."""
    from transformers import BlipImageProcessor

    from capsfus.engines.blip import _preprocessing, normalize
    cfg = json.loads((blip_dir / "preprocessor_config.json").read_text())
    cfg.update(image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3])   # not the defaults
    folder = blip_dir.parent / "blip-preproc"
    folder.mkdir(exist_ok=True)
    (folder / "preprocessor_config.json").write_text(json.dumps(cfg))
    size, mean, std = _preprocessing(str(folder), 99)
    assert size == (32, 32) and mean == (0.5, 0.4, 0.3)
    # CLIP: the short side resized to 32, then the 24 x 24 centre crop the model takes
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_center_crop": True,
        "size": {"shortest_edge": 32}, "crop_size": {"height": 24, "width": 24}}))
    assert _preprocessing(str(folder), 24)[0] == (24, 24)
    (folder / "preprocessor_config.json").write_text(json.dumps(cfg))
    proc = BlipImageProcessor.from_pretrained(folder)
    for data in (image_bytes(7, "PNG", size=(48, 40)), image_bytes(8, "PNG", mode="L")):
        im = decode(data).image
        ours = normalize(np.stack([resize_uint8(im, size)]), mean, std).numpy()
        theirs = proc(im, return_tensors="np")["pixel_values"]
        assert ours.shape == theirs.shape and np.abs(ours - theirs).max() < 1e-5


def test_img2dataset_layout_needs_images_not_urls():
    from capsfus.errors import UserError
    from capsfus.rundir.rows import resolve_mapping
    m = resolve_mapping({"caption", "image", "key"}, None, None, None, None)
    assert (m.layout, m.raw, m.synthetic, m.url) == ("img2dataset", "caption", None, None)
    assert resolve_mapping({"caption", "image", "url"}, None, None, None, None).url == "url"
    with pytest.raises(UserError):          # a bare caption column is not an image dataset
        resolve_mapping({"caption", "other"}, None, None, None, None)


def test_decode_reasons_and_resize():
    for key, (data, reason) in broken_images().items():
        if data is None:
            continue
        got = decode(data, min_side=8, max_pixels=4_000_000)
        assert (got.image, got.reason) == (None, reason), (key, got)
    ok = decode(image_bytes(1, "PNG", mode="L"))
    assert ok.reason is None and ok.image.mode == "RGB"
    rgba = decode(image_bytes(2, "PNG", mode="RGBA"))
    assert rgba.image.mode == "RGB"
    arr = resize_uint8(ok.image, (32, 24))
    assert arr.shape == (32, 24, 3) and arr.dtype == np.uint8
    crop = resize_uint8(ok.image, (24, 24), crop=True)
    assert crop.shape == (24, 24, 3)
    big = image_bytes(3, "JPEG", size=(512, 384))
    drafted = decode(big, draft=32).image     # decoded at 1/8 scale in the DCT
    assert drafted.size == (64, 48) and decode(big).image.size == (512, 384)
    assert decode(image_bytes(3, "PNG", size=(512, 384)), draft=32).image.size == (512, 384)
    assert load_image(ImageReader(), None).reason == "image_missing"
    # a mode this Pillow cannot convert to RGB (older ones refuse some 16-bit and float modes)
    from PIL import Image

    def refuse(self, mode=None, *a, **kw):
        raise ValueError(f"conversion from {self.mode} to {mode} not supported")

    gray = image_bytes(4, "PNG", mode="L")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Image.Image, "convert", refuse)
        got = decode(gray)
    assert got.reason == "image_undecodable" and "conversion" in got.detail, got
    gone = {"tar": "/nonexistent.tar", "member": "x.jpg", "offset": 512, "size": 10}
    assert load_image(ImageReader(), gone).reason == "image_unreadable"


# ------------------------------------------------------------------------- caption stage
@pytest.fixture(scope="module")
def reference(tmp_path_factory, blip_dir) -> dict:
    """An uninterrupted caption run over the webdataset input: id -> synthetic."""
    tmp = tmp_path_factory.mktemp("ref")
    expected = write_wds(tmp / "wds")
    run = tmp / "run"
    capsfus("shard", tmp / "wds", "--out", run, "--rows-per-shard", 10)
    # chunks of 1 row: the kill test below makes the same batches (so the same captions)
    p = capsfus("caption", run, "--model", blip_dir, "--chunk-size", 1, *FAST)
    assert "images/s" in p.stdout + p.stderr
    out, rej = assert_exactly_once(run, "caption")
    return {"run": run, "expected": expected, "out": {r["id"]: r for r in out},
            "rej": {r["id"]: r for r in rej}}


def test_caption_fills_synthetic_and_rejects_bad_images_with_reasons(reference, blip_dir):
    out, rej, expected = reference["out"], reference["rej"], reference["expected"]
    by_key = {r["key"]: r for r in list(out.values()) + list(rej.values())}
    for key, reason in expected.items():
        r = by_key[key]
        if reason is None:
            assert r["id"] in out, (key, r.get("reason"), r.get("detail"))
            assert isinstance(r["synthetic"], str) and r["synthetic"].strip()
            assert set(r["synthetic"].split()) <= set(WORDS)      # decoded from the vocab
            assert r["synthetic_origin"] == "caption" and r["caption_format"] == "short"
            assert r["synthetic_model"] == str(blip_dir) and r["image"]["tar"]
        else:
            assert rej[r["id"]]["reason"] == reason, (key, rej[r["id"]])
    # the captions depend on the image (not one caption for every row)
    assert len({r["synthetic"] for r in out.values()}) > 3
    st = json.loads(capsfus("status", reference["run"], "--json").stdout)
    cap = next(s for s in st["stages"] if s["stage"] == "caption")
    assert cap["throughput_images_per_s"] > 0
    assert cap["reasons"] == {r: 1 for r in expected.values() if r}
    assert "images/s" in capsfus("status", reference["run"], "--stage", "caption").stdout


@pytest.mark.slow
def test_kill9_at_random_moments_and_crash_points_then_resume_exactly_once(tmp_path, reference,
                                                                       blip_dir):
    write_wds(tmp_path / "wds")
    run = tmp_path / "run"
    capsfus("shard", tmp_path / "wds", "--out", run, "--rows-per-shard", 10)
    args = ("caption", run, "--model", blip_dir, "--chunk-size", 1, *FAST)
    # a crash at an injected point first, then SIGKILLs at random moments
    p = capsfus(*args, check=False, CAPSFUS_CRASH_AT="after_state:2")
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    rnd = random.Random(3)
    stage = StageDir(Run(run), "caption")

    def rows_done() -> int:
        return sum(st.get("rows_done", 0) if st["status"] != "done" else st["rows_total"]
                   for st in stage.all_states().values())

    mid_run = 0
    for _ in range(3):
        before = rows_done()
        proc = popen(*args)
        # once the model is loaded and a new chunk is committed, kill at a random moment
        deadline = time.time() + 60
        while rows_done() == before and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(rnd.uniform(0.0, 0.1))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            mid_run += rows_done() < 24
        proc.wait()
    assert mid_run >= 1, mid_run
    capsfus(*args)
    out, rej = assert_exactly_once(run, "caption")
    # identical to the uninterrupted run, row for row (ids are file:row, same files' names)
    assert {r["id"]: r["synthetic"] for r in out} == \
        {k: r["synthetic"] for k, r in reference["out"].items()}
    assert {r["id"]: r["reason"] for r in rej} == \
        {k: r["reason"] for k, r in reference["rej"].items()}
    for shard, st in stage.all_states().items():   # nothing left that no state lists
        assert {p.name for p in stage.out_dir(shard).iterdir()} == {st["final"]["out"]["file"]}


def test_parquet_keeps_existing_captions_unless_overwrite_then_fuse(tmp_path, blip_dir):
    write_image_parquet(tmp_path / "imgs.parquet")
    run = tmp_path / "run"
    capsfus("shard", tmp_path / "imgs.parquet", "--out", run, "--synthetic-col", "blip",
            "--rows-per-shard", 6)
    capsfus("caption", run, "--model", blip_dir, "--chunk-size", 3, "--decode-threads", 0,
            *FAST)
    out, rej = assert_exactly_once(run, "caption")
    by_key = {r["key"]: r for r in out}
    assert [r["key"] for r in rej] == ["p0003"] and rej[0]["reason"] == "image_missing"
    for i in range(10):
        if i == 3:
            continue
        r = by_key[f"p{i:04d}"]
        if i % 2 == 0:
            assert r["synthetic"] == f"an existing caption {i}"
            assert r["synthetic_origin"] == "source"
        else:
            assert r["synthetic_origin"] == "caption" and r["synthetic"]
    # the settings rule: a changed output-shaping flag needs --force
    p = capsfus("caption", run, "--model", blip_dir, "--chunk-size", 3, "--overwrite", *FAST,
                check=False)
    assert p.returncode == 2 and "--force" in p.stderr and "Traceback" not in p.stderr
    capsfus("caption", run, "--model", blip_dir, "--chunk-size", 3, "--overwrite", "--force",
            *FAST)
    out2, _ = assert_exactly_once(run, "caption")
    again = {r["key"]: r for r in out2}
    for i in (0, 2, 4):
        r = again[f"p{i:04d}"]
        assert r["synthetic_origin"] == "caption"
        assert r["synthetic_before"] == f"an existing caption {i}"
    for i in (1, 5, 7):   # threaded and in-line decoding caption the same
        assert again[f"p{i:04d}"]["synthetic"] == by_key[f"p{i:04d}"]["synthetic"]
    # fuse reads the caption stage: every input row ends in caption/rejected or in fuse
    capsfus("fuse", run, "--engine", "echo", "--chunk-size", 4)
    fused, fuse_rej = stage_rows(run, "fuse")
    assert not fuse_rej
    assert sorted([r["id"] for r in fused] + [r["id"] for r in rej]) == sorted(input_ids(run))
    for r in fused:
        assert r["synthetic"] == again[r["key"]]["synthetic"] and r["synthetic"] in r["fused"]
        assert r["raw"] in r["fused"]
    assert json.loads((run / "fuse" / "config.json").read_text())["input_stage"] == "caption"


def test_an_image_parquet_rewritten_after_shard_is_refused_row_by_row(tmp_path, blip_dir):
    """img2dataset run again into the same folder: row N of the new file is another image."""
    path = tmp_path / "imgs.parquet"
    write_image_parquet(path, with_blip=False)
    run = tmp_path / "run"
    capsfus("shard", path, "--out", run)
    pq.write_table(pa.table({"url": ["u"] * 10, "caption": ["c"] * 10,
                             "key": [f"p{i:04d}" for i in range(10)],
                             "jpg": [image_bytes(900 + i, size=(60, 50)) for i in range(10)]}),
                   path, row_group_size=4)
    capsfus("caption", run, "--model", blip_dir, *FAST)
    out, rej = assert_exactly_once(run, "caption")
    assert out == [] and len(rej) == 10
    for r in rej:
        if r["key"] != "p0003":                         # its cell was null at ingest
            assert r["reason"] == "image_unreadable" and "changed since ingest" in r["detail"]


def test_candidates_reranked_with_clip_are_seeded(tmp_path, blip_dir, clip_dir):
    write_wds(tmp_path / "wds", n_shards=1, per_shard=6, broken=False)
    results = []
    for name in ("a", "b"):
        run = tmp_path / name
        capsfus("shard", tmp_path / "wds", "--out", run)
        capsfus("caption", run, "--model", blip_dir, "--candidates", 4, "--clip-model", clip_dir,
                "--batch-size", 4, *FAST)
        out, rej = assert_exactly_once(run, "caption")
        assert not rej
        results.append({r["id"]: (r["synthetic"], r["synthetic_clip_score"]) for r in out})
    assert results[0] == results[1]                 # seeded per batch: reproducible
    for text, score in results[0].values():
        assert text and -1.0 <= score <= 1.0
    cfg = json.loads((tmp_path / "a" / "caption" / "config.json").read_text())["settings"]
    assert cfg["decoding"]["candidates"] == 4 and cfg["clip_revision"].startswith("local:")
    # the draws depend on how rows are batched: resuming with other sizes needs --force
    p = capsfus("caption", tmp_path / "a", "--model", blip_dir, "--candidates", 4,
                "--clip-model", clip_dir, "--batch-size", 2, *FAST, check=False)
    assert p.returncode == 2 and "--force" in p.stderr, p.stderr[-1000:]


def test_candidates_pick_the_best_clip_score(blip_dir, clip_dir):
    """In process: the kept caption is the best-scoring of the sampled candidates."""
    from capsfus.engines.blip import BlipCaptioner
    cap = BlipCaptioner(str(blip_dir), batch_size=4, num_beams=1, max_new_tokens=6,
                        candidates=5, clip_folder=str(clip_dir))
    seen = []
    generate = cap.model.generate

    def spy(**kw):                      # keep what BLIP sampled
        seqs = generate(**kw)
        seen.append(seqs)
        return seqs

    cap.model.generate = spy
    ims = [decode(image_bytes(i)).image for i in range(3)]
    px = np.stack([resize_uint8(im, cap.input_size) for im in ims])
    cx = np.stack([resize_uint8(im, cap.clip_input_size, crop=True) for im in ims])
    got = cap.caption(px, ["x:0", "x:1", "x:2"], cx)
    assert len(seen) == 1 and seen[0].shape[0] == 15
    texts = [t.strip() for t in cap.tokenizer.batch_decode(seen[0][:, cap._prompt_len:],
                                                           skip_special_tokens=True)]
    for j, c in enumerate(got):
        cands = sorted({t for t in texts[j * 5:(j + 1) * 5] if t})
        scores = cap.clip.scores(cx[j:j + 1], [cands])[0]
        assert c.text == cands[int(np.argmax(scores))] and c.candidates == 5
        assert abs(c.score - max(scores)) < 1e-4


def test_user_errors_are_one_line(tmp_path, blip_dir):
    write_wds(tmp_path / "wds", n_shards=1, per_shard=3, broken=False)
    run = tmp_path / "run"
    capsfus("shard", tmp_path / "wds", "--out", run)
    for args, needle in [
        (("--format", "dense"), "needs an instruction-following VLM"),
        (("--clip-model", blip_dir), "give --candidates K"),
        (("--engine", "vllm", "--model", blip_dir), "needs vLLM"),   # not installed here
        (("--model", tmp_path / "nope"), "does not exist"),
    ]:
        model = () if "--model" in args else ("--model", blip_dir)
        p = capsfus("caption", run, *model, *args, check=False)
        assert p.returncode == 2, (args, p.stderr[-1500:])
        assert needle in p.stderr and "Traceback" not in p.stderr, p.stderr[-1500:]


def test_preset_and_submit_dry_run(tmp_path):
    write_wds(tmp_path / "wds", n_shards=1, per_shard=3, broken=False)
    run = tmp_path / "run"
    capsfus("shard", tmp_path / "wds", "--out", run)
    p = capsfus("submit", "caption", run, "--preset", "jobs/caption-blip-large.yaml",
                "--nodes", 2, "--gpus-per-node", 8, "--dry-run", "--max-array-size", 100)
    assert "#SBATCH" in p.stdout and "1 shard(s) to do, 1 worker(s)" in p.stdout + p.stderr
    assert not (run / "caption" / "config.json").exists()      # a dry run writes nothing
    bad = tmp_path / "bad.yaml"                                 # preset values are used
    bad.write_text("model: Salesforce/blip-image-captioning-large\ncandidates: 0\n")
    p = capsfus("caption", run, "--preset", bad, check=False)
    assert p.returncode == 2 and "--candidates" in p.stderr, p.stderr[-1000:]


def test_no_torchvision_and_job_round_trip(tmp_path, blip_dir):
    from capsfus.stages import job_from_dict
    from capsfus.stages.caption import CaptionJob
    job = CaptionJob(run_dir=str(tmp_path), model=str(blip_dir), candidates=3,
                     clip_model="org/clip", prompt="a picture of", chunk_size=7)
    again = job_from_dict(json.loads(json.dumps(job.to_dict())))
    assert again == job
    code = ("import sys, numpy as np; from capsfus.engines.blip import BlipCaptioner;"
            f"c = BlipCaptioner({str(blip_dir)!r}, num_beams=1, max_new_tokens=4, "
            "prompt='a picture of');"
            "print(c.caption(np.zeros((2, 32, 32, 3), np.uint8), ['a', 'b']));"
            "assert 'torchvision' not in sys.modules")
    import subprocess
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "Caption(text=" in p.stdout


# ------------------------------------------------------------------------- SLURM
@pytest.mark.slurm
def test_submit_caption_on_slurm_then_resume_rebuilds_it(slurm_cluster, tmp_path, blip_dir):
    from test_slurm_fuse import wait_jobs
    expected = write_wds(tmp_path / "wds")
    run = tmp_path / "run"
    capsfus("shard", tmp_path / "wds", "--out", run, "--rows-per-shard", 8)   # 3 shards
    capsfus("submit", "caption", run, "--model", blip_dir, "--chunk-size", 4, *FAST,
            "--shards", "0-1", "--workers-per-node", 2, "--time", "00:10:00",
            SLURM_CONF=slurm_cluster.conf)
    wait_jobs(slurm_cluster, run, stage="caption", timeout=240)
    stage = StageDir(Run(run), "caption")
    assert sorted(stage.all_states()) == [0, 1]
    # resume relaunches only shards some submission asked for (issue 13): ask for shard 2 in
    # a submission that is cancelled before it starts
    capsfus("submit", "caption", run, "--model", blip_dir, "--chunk-size", 4, *FAST,
            "--shards", "2", "--time", "00:10:00", "--slurm-arg", "begin=now+3600",
            SLURM_CONF=slurm_cluster.conf)
    capsfus("cancel", run, "--stage", "caption", SLURM_CONF=slurm_cluster.conf)
    wait_jobs(slurm_cluster, run, stage="caption", timeout=60)
    # resume rebuilds the recorded job (job_from_dict) and runs what is left: shard 2
    p = capsfus("resume", run, "--stage", "caption", "--slurm-arg", "begin=now",
                SLURM_CONF=slurm_cluster.conf)
    assert "1 shard(s) to do" in p.stdout + p.stderr
    wait_jobs(slurm_cluster, run, stage="caption", timeout=240)
    out, rej = assert_exactly_once(run, "caption")
    assert len(out) + len(rej) == len(expected)
    assert sorted(r["reason"] for r in rej) == sorted(r for r in expected.values() if r)
    assert all(r["synthetic_origin"] == "caption" and r["synthetic"] for r in out)
    p = capsfus("resume", run, "--stage", "caption", SLURM_CONF=slurm_cluster.conf)
    assert "nothing to resume" in p.stdout + p.stderr


def test_a_second_caption_column_chains_into_fuse_and_the_export_mix(tmp_path, blip_dir):
    """Issue 8: a second caption pass (caption@TAG into another column) chains after the
    first, fusion reads the chain's end, and `export --mix` draws from both columns."""
    write_image_parquet(tmp_path / "imgs.parquet", with_blip=False)
    run = tmp_path / "run"
    capsfus("shard", tmp_path / "imgs.parquet", "--out", run, "--rows-per-shard", 6)
    capsfus("caption", run, "--model", blip_dir, "--chunk-size", 3, *FAST)
    capsfus("caption", run, "--model", blip_dir, "--chunk-size", 3, "--tag", "long",
            "--column", "synthetic_long", "--max-new-tokens", 12, "--prompt", "a picture of",
            *FAST)
    cfg = json.loads((run / "caption@long" / "config.json").read_text())
    assert cfg["input_stage"] == "caption" and cfg["settings"]["column"] == "synthetic_long"
    first = {r["id"]: r for r in stage_rows(run, "caption")[0]}
    out, rej = stage_rows(run, "caption@long")
    # exactly the rows the first pass kept (its rejects never reach the second), once each
    assert sorted(r["id"] for r in out) == sorted(first) and rej == []
    for r in out:
        assert r["synthetic"] == first[r["id"]]["synthetic"]       # the first column stays
        assert r["synthetic_long"] and r["synthetic_long_format"] == "short"
    # rerunning a stage keeps its place in the chain; a new reader takes the chain's end
    capsfus("caption", run, "--model", blip_dir, "--chunk-size", 3, "--tag", "long",
            "--column", "synthetic_long", "--max-new-tokens", 12, "--prompt", "a picture of",
            *FAST)
    capsfus("fuse", run, "--engine", "echo")
    assert json.loads((run / "fuse" / "config.json").read_text())["input_stage"] == \
        "caption@long"
    exp = tmp_path / "exp"
    capsfus("export", run, "--out", exp, "--mix", "synthetic=0.5,synthetic_long=0.5",
            "--seed", 3)
    import pyarrow.parquet as pq
    rows = pq.read_table(exp / "data" / "train-00000-of-00001.parquet").to_pylist()
    long_by_id = {r["id"]: r["synthetic_long"] for r in out}
    assert {r["caption_source"] for r in rows} == {"synthetic", "synthetic_long"}
    for r in rows:
        want = long_by_id[r["id"]] if r["caption_source"] == "synthetic_long" else \
            r["synthetic"]
        assert r["caption"] == want and r["synthetic_long"] == long_by_id[r["id"]]
    summary = json.loads((exp / "capsfus-export.json").read_text())
    assert summary["rows"]["exported"] == len(rows) == len(out)
    # the row whose image is missing is out whatever the mix (its raw caption has no picture)
    assert summary["rows"]["excluded"] == {"caption:image_missing": 1}
    assert [s["stage"] for s in summary["stages"]] == ["fuse", "caption@long", "caption"]


# ------------------------------------------------------------------------- --engine vlm
LLAVA_WORDS = WORDS + ("describe this image dense detail one paragraph every visible object "
                       "its attributes colour material count position any text background "
                       "and setting lighting style no preamble").split()


def build_tiny_llava(folder: Path, image_size: int = 32, patch_size: int = 8) -> None:
    """A random LLaVA (tiny CLIP vision tower + tiny Llama) with a word-level tokenizer that
    has an ``<image>`` token and a LLaVA-1.5-like chat template, and a CLIP preprocessor
    config (mean/std not the defaults)."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        PreTrainedTokenizerFast,
    )
    specials = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(set(LLAVA_WORDS)) +
                                        ["user", "assistant", ":", ".", ",", "(", ")"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                pre_tokenizers.Punctuation()])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", unk_token="<unk>",
                                  additional_special_tokens=["<image>"])
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}{{ m['role'] | upper }}: "
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
        "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
        "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %} "
        "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    tok.save_pretrained(folder)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=2,
                                       image_size=image_size, patch_size=patch_size,
                                       initializer_range=0.3),
        text_config=LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=2, max_position_embeddings=256,
                                bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                initializer_range=0.3),
        image_token_index=vocab["<image>"], vision_feature_layer=-1,
        vision_feature_select_strategy="default", projector_hidden_act="gelu")
    torch.manual_seed(0)
    LlavaForConditionalGeneration(cfg).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_center_crop": True,
        "size": {"shortest_edge": image_size},
        "crop_size": {"height": image_size, "width": image_size},
        "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3]}))


# Loaded first in the captioning subprocess (PYTHONPATH): records every prompt the LLaVA
# model is asked to continue, and at exit whether torchvision was imported. (A stand-in
# torchvision package cannot be used: transformers imports any torchvision it can find.)
_SPY = '''
import atexit, json, os, sys
from transformers.models.llava import modeling_llava as m
_generate = m.LlavaForConditionalGeneration.generate
def generate(self, *a, **kw):
    with open(os.environ["SPY_LOG"], "a") as f:
        for ids, mask in zip(kw["input_ids"].tolist(), kw["attention_mask"].tolist()):
            f.write(json.dumps({"ids": ids, "mask": mask, "n": len(kw["input_ids"]),
                                "pixels": list(kw["pixel_values"].shape)}) + "\\n")
    return _generate(self, *a, **kw)
m.LlavaForConditionalGeneration.generate = generate
def _modules():
    with open(os.environ["SPY_LOG"] + ".exit", "w") as f:
        json.dump({"torchvision": "torchvision" in sys.modules,
                   "llava": "transformers.models.llava" in sys.modules}, f)
atexit.register(_modules)
'''


def _contains(seq: list[int], sub: list[int]) -> bool:
    return any(seq[i:i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


def test_vlm_engine_writes_dense_captions_through_the_chat_template(tmp_path, blip_dir):
    """Issue 8: `--engine vlm --format dense` on a tiny random LLaVA, as a second caption
    column after BLIP: every row once, the dense instruction in every prompt the model got
    (through the chat template, one <image> placeholder per image feature), batched, no
    torchvision."""
    from transformers import AutoTokenizer

    from capsfus.stages.caption import FORMATS, CaptionJob
    llava = tmp_path / "tiny-llava"
    llava.mkdir()
    build_tiny_llava(llava)
    write_image_parquet(tmp_path / "imgs.parquet", with_blip=False)
    run = tmp_path / "run"
    capsfus("shard", tmp_path / "imgs.parquet", "--out", run, "--rows-per-shard", 6)
    capsfus("caption", run, "--model", blip_dir, "--chunk-size", 3, *FAST)
    spy = tmp_path / "spy"
    spy.mkdir()
    (spy / "sitecustomize.py").write_text(_SPY)
    log = tmp_path / "prompts.jsonl"
    args = ("caption", run, "--engine", "vlm", "--model", llava, "--format", "dense",
            "--column", "synthetic_dense", "--tag", "dense", "--chunk-size", 4,
            "--batch-size", 3, "--num-beams", 1, "--max-new-tokens", 8, "--min-side", 8)
    capsfus(*args, PYTHONPATH=spy, SPY_LOG=log)
    exit_modules = json.loads(Path(f"{log}.exit").read_text())
    assert exit_modules == {"torchvision": False, "llava": True}
    cfg = json.loads((run / "caption@dense" / "config.json").read_text())
    assert cfg["input_stage"] == "caption" and cfg["settings"]["engine"] == "vlm"
    assert cfg["settings"]["prompt"] == FORMATS["dense"]
    first = {r["id"]: r for r in stage_rows(run, "caption")[0]}
    out, rej = stage_rows(run, "caption@dense")
    assert sorted(r["id"] for r in out) == sorted(first) and rej == []   # each row once
    for s in StageDir(Run(run), "caption@dense").all_states().values():
        assert s["status"] == "done", s
    for r in out:
        assert r["synthetic_dense"].strip() and r["synthetic_dense_format"] == "dense"
        assert r["synthetic_dense_model"] == str(llava)
        assert r["synthetic"] == first[r["id"]]["synthetic"]        # BLIP's column stays
        words = set(LLAVA_WORDS) | set("user assistant : . , ( )".split())
        assert set(r["synthetic_dense"].split()) <= words
    assert len({r["synthetic_dense"] for r in out}) > 1              # depends on the image
    # what the model was given: one prompt per captioned row, in batches of at most 3
    prompts = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(prompts) == len(out) and max(p["n"] for p in prompts) == 3
    tok = AutoTokenizer.from_pretrained(llava)
    instruction = tok(FORMATS["dense"], add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in instruction and len(instruction) > 20
    image_id = tok.convert_tokens_to_ids("<image>")
    for p in prompts:
        assert _contains(p["ids"], instruction), tok.decode(p["ids"])
        assert p["ids"].count(image_id) == (32 // 8) ** 2       # CLS left out ("default")
        assert p["ids"].count(tok.bos_token_id) == 1 and p["pixels"][1:] == [3, 32, 32]
        assert all(p["mask"])
    # exactly-once on a rerun: nothing captioned again
    capsfus(*args, PYTHONPATH=spy, SPY_LOG=log)
    assert len(log.read_text().splitlines()) == len(prompts)
    assert sorted(r["id"] for r in stage_rows(run, "caption@dense")[0]) == sorted(first)
    # the job sends FORMATS' dense instruction with its token budget; a VLM needs --model
    job = CaptionJob(run_dir=str(run), model=str(llava), engine="vlm", format="dense")
    assert job.instruction() == FORMATS["dense"] and job.new_tokens() == 300
    p = capsfus("caption", run, "--engine", "vlm", "--tag", "x", "--column", "synthetic_x",
                check=False)
    assert p.returncode == 2 and "pass --model" in p.stderr and "Traceback" not in p.stderr


def test_vlm_batches_give_the_captions_of_single_images(tmp_path):
    """A batch captions each image as it would alone (greedy; the tokenizer pads on the left,
    where a decoder-only model expects padding)."""
    from capsfus.engines.vlm_transformers import VlmCaptioner
    llava = tmp_path / "tiny-llava"
    llava.mkdir()
    build_tiny_llava(llava)
    cap = VlmCaptioner(str(llava), instruction="describe this image", max_new_tokens=6,
                       batch_size=4)
    assert cap.tokenizer.padding_side == "left" and cap.n_image_tokens == 16
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    alone = [cap.caption(images[i:i + 1], ["x"])[0].text for i in range(4)]
    assert [c.text for c in cap.caption(images, list("abcd"))] == alone
    assert len(set(alone)) > 1
    # our preprocessing (CLIP-style short side + centre crop, the model's mean/std) matches
    # transformers' CLIP image processor (its PIL backend) to a uint8 rounding step
    from transformers import CLIPImageProcessor

    from capsfus.engines.blip import normalize
    proc = CLIPImageProcessor.from_pretrained(llava)
    for data in (image_bytes(7, "PNG", size=(48, 40)), image_bytes(8, "PNG", (40, 64), "L")):
        im = decode(data).image
        ours = normalize(np.stack([resize_uint8(im, cap.input_size, crop=cap.crop)]),
                         cap.mean, cap.std).numpy()
        theirs = proc(im, return_tensors="np")["pixel_values"]
        assert ours.shape == theirs.shape == (1, 3, 32, 32)
        assert np.abs(ours - theirs).max() < 1.01 / 255 / 0.2, np.abs(ours - theirs).max()
