"""Issue 16: strange files, formats and signals, through real ``corex`` processes.

Every case runs ``python -m corex ...`` as a user would and asserts what a demanding user expects:
the documented exit code, never a Python traceback, one message naming the culprit (a file, a flag,
a version), and nothing left behind that blocks the next command.

The data are a tiny ``folder`` data set of 24 PNGs (4 classes), written here; the model is a
ResNet-18 of width 4 at 32 px, trained once per module for the commands that need one.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

pytestmark = [pytest.mark.boundaries, pytest.mark.slow]

CLASSES = ("negative", "typical", "indeterminate", "atypical")
NON_UTF8 = b"scan\xff.png"  # a Latin-1 'ÿ' written by an old scanner: not valid UTF-8
# An observer that pauses after epoch 1 when asked, so that a signal arrives mid-run at a known point.
PAUSE_PLUGIN = '''\
import os
import time
from pathlib import Path

from corex import hookimpl


@hookimpl
def corex_epoch_end(epoch):
    flag = os.environ.get("COREX_TEST_PAUSE")
    if flag and epoch == 1:
        Path(flag).write_text("paused")
        time.sleep(120)
'''


# -- helpers --------------------------------------------------------------------------------------------


def corex(*args: Any, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "corex", *map(str, args)], env=env or base_env(), cwd=cwd, capture_output=True,
                          text=True, errors="backslashreplace", timeout=timeout)


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COREX_")}
    return {**env, "COREX_PROGRESS": "off", **extra}


def no_traceback(done: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in done.stderr, done.stderr[-4000:]


def picture(label: int, seed: int, size: int = 48) -> np.ndarray:
    """Dim noise with a bright square in the class's quadrant, as uint8."""
    rng = np.random.default_rng(seed)
    image = rng.uniform(0.05, 0.25, (size, size))
    half, side = size // 2, size // 4
    top, left = (label // 2) * half + 4, (label % 2) * half + 4
    image[top:top + side, left:left + side] = 0.9
    return np.rint(image * 255).astype(np.uint8)


def write_folder(root: Path, count: int = 24, extra_rows: list[list[str]] = ()) -> Path:
    """``count`` labelled PNGs (one patient each) and labels.csv; ``extra_rows`` are appended to the CSV."""
    root.mkdir(parents=True, exist_ok=True)
    rows = [["path", "label", "patient"]]
    for i in range(count):
        name = f"img{i:03d}.png"
        Image.fromarray(picture(i % 4, i)).save(root / name)
        rows.append([name, CLASSES[i % 4], f"p{i}"])
    rows += list(extra_rows)
    with open(root / "labels.csv", "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return root


def write_bomb(path: Path, width: int = 20000, height: int = 10000) -> None:
    """A valid 1-bit PNG of width x height (2e8) pixels, over twice Pillow's MAX_IMAGE_PIXELS, in ~25 kB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" + bytes((width + 7) // 8)
    squeeze = zlib.compressobj(9)
    pixels = b"".join(squeeze.compress(row) for _ in range(height)) + squeeze.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))


def recipe(tmp: Path, root: Path | None, *, epochs: int = 1, cache: bool = True, **data: Any) -> dict[str, Any]:
    block: dict[str, Any] = {"name": "folder", "csv": "labels.csv", "image_size": 32, "batch_size": 4, "workers": 1, **data}
    if root is not None:
        block["root"] = str(root)
    if cache:
        block["cache_dir"] = str(tmp / "cache")
    return {
        "name": "files",
        "seed": 0,
        "data": block,
        "model": {"encoder": {"name": "resnet18", "width": 4}},
        "optimizer": {"name": "adamw", "lr": 0.003},
        "stages": {
            "train": {"kind": "train", "epochs": epochs, "max_steps_per_epoch": 2, "heads": {"classification": {}},
                      "evaluators": [{"name": "classification", "bootstrap": 0}]},
            "test": {"kind": "evaluate", "split": "test", "evaluators": [{"name": "classification", "bootstrap": 10}]},
        },
    }


def write_recipe(path: Path, content: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


def safe_text(value: str) -> bool:
    """Text any UTF-8 reader takes: no lone surrogates (what a non-UTF-8 byte becomes in a str)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# -- a trained model, shared by the predict / evaluate / export cases -------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("trained")
    root = write_folder(tmp / "images")
    path = write_recipe(tmp / "recipe.yaml", recipe(tmp, root))
    done = corex("run", path, "--out", tmp / "run")
    assert done.returncode == 0, done.stderr[-4000:]
    exported = corex("export", tmp / "run", tmp / "model.pt")
    assert exported.returncode == 0, exported.stderr[-4000:]
    return {"tmp": tmp, "root": root, "run": tmp / "run", "model": tmp / "model.pt", "recipe": path}


# -- decompression bombs --------------------------------------------------------------------------------


def test_a_decompression_bomb_is_skipped_and_listed_under_on_bad_sample_skip(tmp_path):
    root = write_folder(tmp_path / "images", extra_rows=[["bomb.png", "typical", "p-bomb"]])
    write_bomb(root / "bomb.png")
    path = write_recipe(tmp_path / "r.yaml", recipe(tmp_path, root, on_bad_sample="skip"))
    done = corex("run", path, "--out", tmp_path / "run")
    no_traceback(done)
    assert done.returncode == 0, done.stderr[-3000:]
    skipped = json.loads((tmp_path / "run" / "skipped.json").read_text())
    listed = [entry for entry in skipped if "bomb.png" in entry["path"]]
    assert listed and re.search(r"decompression|pixels", listed[0]["reason"], re.I), skipped


def test_a_decompression_bomb_under_on_bad_sample_error_is_exit_2_naming_the_file(tmp_path):
    root = write_folder(tmp_path / "images", extra_rows=[["bomb.png", "typical", "p-bomb"]])
    write_bomb(root / "bomb.png")
    path = write_recipe(tmp_path / "r.yaml", recipe(tmp_path, root))
    done = corex("data", "prepare", path)
    no_traceback(done)
    assert done.returncode == 2 and "bomb.png" in done.stderr, done.stderr[-3000:]
    assert re.search(r"on_bad_sample", done.stderr), done.stderr[-3000:]


# -- file names that are not valid UTF-8 -------------------------------------------------------------------


def test_a_file_name_that_is_not_utf8_is_cached_and_listed_safely(tmp_path):
    """Unlabelled folder (no CSV): every image found is used, the odd name among them; a broken
    odd-named file is listed in skipped.json in a printable form."""
    root = tmp_path / "images"
    root.mkdir()
    for i in range(6):
        Image.fromarray(picture(i % 4, i)).save(root / f"img{i}.png")
    Image.fromarray(picture(1, 99)).save(os.fsdecode(os.path.join(os.fsencode(root), NON_UTF8)))
    (Path(os.fsdecode(os.path.join(os.fsencode(root), b"broken\xfe.png")))).write_bytes(b"not a png")
    content = recipe(tmp_path, root, on_bad_sample="skip", val_fraction=0.0, test_fraction=0.0)
    del content["data"]["csv"]
    path = write_recipe(tmp_path / "r.yaml", content)
    done = corex("data", "prepare", path)
    no_traceback(done)
    assert done.returncode == 0, done.stderr[-3000:]
    [index] = (tmp_path / "cache").rglob("index.json")
    entries = json.loads(index.read_bytes().decode("utf-8"))["entries"]
    assert len(entries) == 8 and all(safe_text(key) for key in entries), list(entries)
    assert any("scan" in key and "error" not in entry for key, entry in entries.items()), entries
    [skipped] = (tmp_path / "cache").rglob("skipped.json")
    listed = json.loads(skipped.read_bytes().decode("utf-8"))["skipped"]
    assert len(listed) == 1 and "broken" in listed[0]["path"] and safe_text(listed[0]["path"]), listed
    assert "\\xfe" in listed[0]["path"], "the odd byte is shown, escaped"
    info = corex("data", "info", path, "--json")
    no_traceback(info)
    assert info.returncode == 0 and json.loads(info.stdout)["unusable"]["undecodable"] == 1, info.stderr[-3000:]


def test_predict_takes_a_file_name_that_is_not_utf8_and_writes_it_safely(trained, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    odd = os.path.join(os.fsencode(inputs), NON_UTF8)
    Image.fromarray(picture(2, 7)).save(os.fsdecode(odd))
    Image.fromarray(picture(0, 8)).save(inputs / "plain.png")
    done = corex("predict", trained["model"], inputs, "--out", tmp_path / "out")
    no_traceback(done)
    assert done.returncode == 0, done.stderr[-3000:]
    records = json.loads((tmp_path / "out" / "predictions.json").read_bytes().decode("utf-8"))
    records = records.get("records", records) if isinstance(records, dict) else records
    files = [r["file"] for r in records if r.get("level") == "image"]
    assert len(files) == 2 and all(safe_text(f) for f in files), files
    assert any("scan" in f and "\\xff" in f for f in files), files
    table = (tmp_path / "out" / "predictions.csv").read_bytes().decode("utf-8")
    assert "scan\\xff.png" in table


# -- predict: --out ---------------------------------------------------------------------------------------


def test_predict_with_out_naming_an_existing_file_is_refused_before_any_work(trained, tmp_path):
    target = tmp_path / "predictions.txt"
    target.write_text("keep me")
    started = time.perf_counter()
    done = corex("predict", trained["model"], trained["root"] / "img000.png", "--out", target)
    no_traceback(done)
    assert done.returncode == 2 and "--out" in done.stderr and str(target) in done.stderr, done.stderr[-3000:]
    assert target.read_text() == "keep me"
    assert "predicted" not in done.stderr and "img000" not in done.stdout, "refused before loading the model and decoding"
    assert time.perf_counter() - started < 60


# -- model file formats -------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["corex-model/2", "not-corex/9"])
def test_an_export_of_another_format_is_refused_by_predict_evaluate_and_export(trained, tmp_path, version):
    payload = torch.load(trained["model"], weights_only=True)
    payload["meta"]["format"] = version
    if "format" in payload:
        payload["format"] = version
    model = tmp_path / "future.pt"
    torch.save(payload, model)
    meta = json.loads(trained["model"].with_suffix(".json").read_text())
    model.with_suffix(".json").write_text(json.dumps({**meta, "format": version}))
    commands = {
        "predict": ("predict", model, trained["root"] / "img000.png", "--out", tmp_path / "p"),
        "evaluate": ("evaluate", model, "--out", tmp_path / "e"),
        "export": ("export", model, tmp_path / "again.pt"),
    }
    failures = []
    for name, args in commands.items():
        done = corex(*args)
        if done.returncode != 2 or "Traceback" in done.stderr or version not in done.stderr or "corex-model/1" not in done.stderr:
            failures.append(f"{name}: exit {done.returncode}: {done.stderr.strip().splitlines()[-1:] }")
    assert not failures, "\n".join(failures)


# -- signals ----------------------------------------------------------------------------------------------


def _start_paused_run(tmp_path: Path, env: dict[str, str], out: Path, recipe_path: Path) -> tuple[subprocess.Popen, Path]:
    (tmp_path / "corex_pause_plugin.py").write_text(PAUSE_PLUGIN)
    flag = tmp_path / "paused.flag"
    env = {**env, "COREX_PLUGINS": "corex_pause_plugin", "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")])),
           "COREX_TEST_PAUSE": str(flag)}
    process = subprocess.Popen([sys.executable, "-m", "corex", "run", str(recipe_path), "--out", str(out)], env=env, cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not flag.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the run never reached the end of epoch 1:\n{process.communicate()[1][-3000:]}")
        time.sleep(0.2)
    return process, flag


def test_sigterm_exits_143_with_one_line_saying_how_to_continue_and_resume_works(tmp_path):
    root = write_folder(tmp_path / "images")
    path = write_recipe(tmp_path / "r.yaml", recipe(tmp_path, root, epochs=3))
    out = tmp_path / "run"
    process, _ = _start_paused_run(tmp_path, base_env(), out, path)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert "Traceback" not in err, err[-3000:]
    assert process.returncode == 143, f"exit {process.returncode}\n{err[-3000:]}"
    hints = [line for line in err.splitlines() if "--resume" in line]
    assert len(hints) == 1, err[-3000:]
    resumed = corex("run", path, "--out", out, "--resume", cwd=tmp_path)
    no_traceback(resumed)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert re.search(r"resum\w+ .*after epoch 1", resumed.stderr), resumed.stderr[-3000:]


def test_the_resume_hint_after_ctrl_c_works_as_typed_when_the_run_used_corex_cache(tmp_path):
    root = write_folder(tmp_path / "images")
    path = write_recipe(tmp_path / "r.yaml", recipe(tmp_path, root, epochs=3, cache=False))
    out = tmp_path / "run"
    process, _ = _start_paused_run(tmp_path, base_env(COREX_CACHE=str(tmp_path / "cache")), out, path)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in err, f"exit {process.returncode}\n{err[-3000:]}"
    hints = [found.group(1).strip() for line in err.splitlines() if (found := re.search(r"continue with:(.+)$", line, re.I))]
    assert len(hints) == 1, f"expected one line saying how to continue:\n{err[-3000:]}"
    hint = hints[0]
    # Typed in a new shell: COREX_CACHE is not set there (the hint must carry it, or the run must remember it);
    # the shell's profile puts the pause plugin's folder on PYTHONPATH, as a user's would for a plugin of theirs.
    shell_env = base_env(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONPATH=str(tmp_path))
    typed = subprocess.run(["bash", "-c", hint], env=shell_env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert "Traceback" not in typed.stderr, typed.stderr[-3000:]
    assert typed.returncode == 0, f"`{hint}` gave exit {typed.returncode}:\n{typed.stderr[-3000:]}"


# -- runs that fail early, and messages about the command line -------------------------------------------------


def test_a_run_that_fails_before_its_first_stage_leaves_nothing_that_blocks_the_corrected_command(tmp_path):
    root = write_folder(tmp_path / "images")
    path = write_recipe(tmp_path / "r.yaml", recipe(tmp_path, root))
    out = tmp_path / "run"
    wrong = corex("run", path, "--out", out, "--set", f"data.root={tmp_path / 'no-such-folder'}")
    no_traceback(wrong)
    assert wrong.returncode == 2 and "no-such-folder" in wrong.stderr, wrong.stderr[-3000:]
    corrected = corex("run", path, "--out", out)
    no_traceback(corrected)
    assert corrected.returncode == 0, corrected.stderr[-3000:]


@pytest.mark.parametrize("override, shown", [
    ("stages.train.epochs=three", "--set stages.train.epochs"),
    ("stages.train.epoch=3", "--set stages.train.epoch"),
])
def test_a_set_typo_is_labelled_set_not_as_if_in_the_recipe_file(tmp_path, override, shown):
    path = write_recipe(tmp_path / "r.yaml", recipe(tmp_path, tmp_path))
    done = corex("validate", path, "--no-build", "--set", override)
    no_traceback(done)
    assert done.returncode == 2 and shown in done.stderr, done.stderr[-3000:]
    if "epoch=" in override:
        assert "epochs" in done.stderr  # did you mean


def test_a_missing_data_root_shows_the_set_to_use_and_names_docs_data_md(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", recipe(tmp_path, None))
    done = corex("run", path, "--out", tmp_path / "run")
    no_traceback(done)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "--set data.root=" in done.stderr and "docs/data.md" in done.stderr, done.stderr[-3000:]


# -- several processes ------------------------------------------------------------------------------------------


def test_with_nproc_2_only_rank_0_prints_data_lines_tables_and_the_summary(tmp_path):
    root = write_folder(tmp_path / "images")
    path = write_recipe(tmp_path / "r.yaml", recipe(tmp_path, root))
    done = corex("run", path, "--out", tmp_path / "run", "--nproc", "2", timeout=400)
    no_traceback(done)
    assert done.returncode == 0, done.stderr[-3000:]
    err, out = done.stderr.splitlines(), done.stdout.splitlines()
    problems = []
    for what, pattern, lines in (("data line", r"\bdata\b.*\btrain\b.*\bstudies\b", err), ("cache summary", r"folder: .*decoded", err),
                                 ("summary table header", r"^\s*metric\s+value", out), ("results line", r"^results:", out),
                                 ("stage list", r"device .*seed", err)):
        found = [line for line in lines if re.search(pattern, line)]
        if len(found) != 1:
            problems.append(f"{what}: {len(found)} times: {found[:3]}")
    others = [line for line in err if re.search(r"rank 1|\[1\]", line)]
    if others:
        problems.append(f"rank 1 spoke without an error: {others[:3]}")
    assert not problems, "\n".join(problems) + f"\n--- stderr ---\n{done.stderr[-3000:]}\n--- stdout ---\n{done.stdout[-2000:]}"
