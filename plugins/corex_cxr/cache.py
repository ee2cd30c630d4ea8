"""Decode once: source images to a compact uint16 memory map at the working resolution.

One directory per (data source, preprocessing settings) holds

``index.json``          the settings and, per image id, its slot in the array, the key of the
                        source file it came from (path, size, mtime_ns) and its geometry
                        (``scale``, ``pad``) or the reason it could not be decoded;
``images-<ids>.npy``    ``(N, S, S)`` uint16, intensity * 65535. uint16 rather than uint8: the
                        VOI output of a 12-16 bit radiograph keeps its fine contrast steps.

:func:`build_cache` reuses every image whose file key matches the index and decodes only the rest,
in worker processes (which die with the process that started them, even by SIGKILL), with a
progress bar. It flushes the array and then rewrites the index
atomically (temporary file + ``os.replace``) every ``flush_every`` images and whenever it stops,
so the index never names pixels that are not on disk and an interrupted build resumes where it
stopped. An edited file (new size or mtime) is decoded again and the others are reused; a
different set of images gets a new array, with the reusable pixels copied over.

:class:`CachedImages` serves a split from the array: a memory-mapped read, a uint16 to float
conversion and a mask drawn from the stored boxes; thousands of images per second. The metadata
and multi-label targets travel with the items (read from CSVs and headers when the source was
built), so serving them reads no file.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from corex.progress import progress as progress_bar
from corex.rundir import atomic_write_text
from corex_cxr.dicom import Box, boxes_to_mask, resize_pad
from corex_cxr.errors import DataError, printable
from corex_cxr.images import read_image
from corex_cxr.metadata import Meta

CACHE_VERSION = 1  # bump when decoding or resizing changes what lands in the array
RESIZE = "longer side to size (antialiased bilinear), centred zero padding"
FULL_SCALE = 65535.0

Decoder = Callable[[Path], tuple[np.ndarray, dict[str, Any]]]


def cache_settings(size: int) -> dict[str, Any]:
    """Everything that changes the cached pixels; part of the cache directory's key."""
    return {"version": CACHE_VERSION, "size": size, "resize": RESIZE, "dtype": "uint16"}


@dataclass
class CacheBuild:
    """What :func:`build_cache` produced: where each image is, and what it did to get there."""

    array: Path
    slots: dict[str, int]
    geometry: dict[str, tuple[float, int, int]]  # image id -> (scale, pad_x, pad_y)
    errors: dict[str, str]  # image id -> why it could not be decoded
    decoded: int  # images decoded by this build (errors included)
    reused: int  # images taken from an earlier build (errors it recorded included)
    failed: int = 0  # of the ``decoded``, how many could not be


def build_cache(
    directory: Path,
    images: Mapping[str, Path],
    size: int,
    *,
    workers: int = 0,
    decode: Decoder = read_image,
    progress: bool = True,
    description: str = "decoding images",
    flush_every: int = 64,
) -> CacheBuild:
    """Bring the cache in ``directory`` up to date with ``images`` (image id -> source file).

    ``workers``: decoding processes, 0 = ``os.cpu_count()``, 1 = in this process. ``decode``
    maps a path to a float32 ``[0, 1]`` image; it must be a module-level function when
    ``workers > 1`` and raise :class:`DataError` for a bad file.
    """
    directory.mkdir(parents=True, exist_ok=True)
    ids = sorted(images)
    slots = {image_id: slot for slot, image_id in enumerate(ids)}
    keys = {image_id: _file_key(images[image_id]) for image_id in ids}
    previous = _load_index(directory, size)
    array_path = directory / f"images-{_digest(ids)}.npy"

    def reusable(image_id: str) -> bool:
        entry = previous["entries"].get(image_id)
        return entry is not None and keys[image_id] is not None and entry["file"] == keys[image_id]

    entries: dict[str, dict[str, Any]] = {}
    if previous.get("array") == array_path.name and array_path.exists():
        array = np.load(array_path, mmap_mode="r+")  # same images: same slots
        entries = {image_id: previous["entries"][image_id] for image_id in ids if reusable(image_id)}
    else:
        _check_space(directory, (len(ids), size, size))
        array = _create_array(array_path, (len(ids), size, size))
        old_path = directory / previous["array"] if previous.get("array") else None
        old = np.load(old_path, mmap_mode="r") if old_path and old_path.exists() else None
        for image_id in filter(reusable, ids):
            entry = dict(previous["entries"][image_id], slot=slots[image_id])
            if "error" not in entry:
                if old is None:
                    continue  # the pixels are gone: decode again
                array[slots[image_id]] = old[previous["entries"][image_id]["slot"]]
            entries[image_id] = entry
        _save(directory, size, array, array_path, entries)
        del old
        if old_path and old_path != array_path:
            old_path.unlink(missing_ok=True)
    reused = len(entries)

    todo = [image_id for image_id in ids if image_id not in entries]
    decoded = failed = 0
    try:
        jobs = [(image_id, images[image_id], size, decode) for image_id in todo]
        with contextlib.ExitStack() as stack:
            bar = stack.enter_context(progress_bar(len(todo), description, unit="img")) if progress and todo else None
            for image_id, pixels, geometry, error in _decode_all(jobs, workers):
                entry: dict[str, Any] = {"slot": slots[image_id], "file": keys[image_id]}
                if error is None:
                    array[slots[image_id]] = pixels
                    entry.update(geometry)
                else:
                    entry["error"] = error
                    failed += 1
                entries[image_id] = entry
                decoded += 1
                if bar is not None:
                    bar.update(1, unusable=failed)
                if decoded % flush_every == 0:
                    _save(directory, size, array, array_path, entries)
    finally:  # also on KeyboardInterrupt: keep what is done
        _save(directory, size, array, array_path, entries)

    return CacheBuild(
        array=array_path,
        slots=slots,
        geometry={i: (e["scale"], *e["pad"]) for i, e in entries.items() if "error" not in e},
        errors={i: e["error"] for i, e in entries.items() if "error" in e},
        decoded=decoded,
        reused=reused,
        failed=failed,
    )


def cached_errors(directory: Path, images: Mapping[str, Path], size: int) -> tuple[dict[str, str], int]:
    """What the cache already knows, without decoding: (image id -> why it cannot be decoded,
    how many images it has not decoded yet or whose file changed since)."""
    entries = _load_index(directory, size)["entries"]
    errors, unknown = {}, 0
    for image_id, path in images.items():
        entry = entries.get(image_id)
        if entry is None or entry["file"] != _file_key(path):
            unknown += 1
        elif "error" in entry:
            errors[image_id] = entry["error"]
    return errors, unknown


def decode_to_cache(path: Path, size: int, decode: Decoder = read_image) -> tuple[np.ndarray, dict[str, Any]]:
    """One image as it is cached: decoded, resized and padded, quantised to uint16."""
    image, info = decode(Path(path))
    square, scale, (pad_x, pad_y) = resize_pad(image, size)
    pixels = np.rint(square * FULL_SCALE).astype(np.uint16)
    return pixels, {"scale": scale, "pad": [pad_x, pad_y], "shape": [int(image.shape[0]), int(image.shape[1])]}


def _decode_job(job: tuple[str, Path, int, Decoder]) -> tuple[str, np.ndarray | None, dict[str, Any], str | None]:
    image_id, path, size, decode = job
    try:
        pixels, geometry = decode_to_cache(path, size, decode)
    except DataError as error:
        return image_id, None, {}, error.reason
    return image_id, pixels, geometry, None


def _decode_all(jobs: list[tuple[str, Path, int, Decoder]], workers: int) -> Iterator[tuple]:
    workers = min(workers or os.cpu_count() or 1, len(jobs))
    if workers <= 1:
        yield from map(_decode_job, jobs)
        return
    pool = ProcessPoolExecutor(max_workers=workers, initializer=die_with_parent, initargs=(os.getpid(),))
    try:
        yield from pool.map(_decode_job, jobs, chunksize=4)
    finally:  # an interrupted build must not wait for the queued jobs
        pool.shutdown(wait=True, cancel_futures=True)


PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with_parent(parent: int) -> None:
    """Worker initializer: end this process when ``parent`` dies, even by SIGKILL.

    A pool's workers wait on a pipe that they hold open themselves, so a parent killed without
    shutting the pool down would leave them waiting for ever, each holding its memory. On Linux
    the kernel sends them SIGKILL when their parent goes (``prctl(PR_SET_PDEATHSIG)``); elsewhere a
    thread watches for the worker being handed to another parent. Both first check that the
    parent did not die before the worker got here.
    """
    direct = os.getppid()  # ``parent`` itself, or a fork server that dies with it
    if direct != parent and not _alive(parent):
        os._exit(1)
    armed = False
    if sys.platform.startswith("linux"):
        try:
            armed = ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    if os.getppid() != direct:  # the parent died before the signal was armed
        os._exit(1)
    if not armed:
        threading.Thread(target=_exit_when_orphaned, args=(direct,), name="corex-parent-watch", daemon=True).start()


def _exit_when_orphaned(direct: int, interval: float = 1.0) -> None:
    while os.getppid() == direct:
        time.sleep(interval)
    os._exit(1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _file_key(path: Path) -> list[Any] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None  # decoding will report the missing file
    return [printable(Path(path).resolve()), stat.st_size, stat.st_mtime_ns]  # printable: index.json stays UTF-8


def _digest(ids: Sequence[str]) -> str:
    return hashlib.sha1("\n".join(ids).encode("utf-8", "surrogateescape")).hexdigest()[:12]


def _load_index(directory: Path, size: int) -> dict[str, Any]:
    try:
        index = json.loads((directory / "index.json").read_text())
    except (OSError, ValueError):
        return {"entries": {}}
    if index.get("settings") != cache_settings(size):
        return {"entries": {}}
    return index


def _check_space(directory: Path, shape: tuple[int, int, int]) -> None:
    """Refuse a cache the disk cannot hold now, rather than fail (or fill the disk) halfway."""
    needed = int(np.prod(shape, dtype=np.int64)) * np.dtype(np.uint16).itemsize
    free = shutil.disk_usage(directory).free
    if needed > free:
        raise DataError(
            directory,
            f"the decoded cache of {shape[0]} images at {shape[1]} px needs {_in_bytes(needed)}, but only "
            f"{_in_bytes(free)} are free there; choose a smaller image_size or another data.cache_dir",
        )


def _in_bytes(count: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB"):
        if count < 1000:
            return f"{count:.3g} {unit}"
        count /= 1000
    return f"{count:.3g} TB"


def _create_array(path: Path, shape: tuple[int, int, int]) -> np.ndarray:
    temporary = path.with_suffix(".tmp.npy")
    np.lib.format.open_memmap(temporary, mode="w+", dtype=np.uint16, shape=shape).flush()
    os.replace(temporary, path)
    return np.load(path, mmap_mode="r+")


def _save(directory: Path, size: int, array: np.ndarray, array_path: Path, entries: dict[str, Any]) -> None:
    array.flush()  # pixels first: the index must never name pixels that are not on disk
    index = {"settings": cache_settings(size), "array": array_path.name, "entries": entries}
    atomic_write_text(directory / "index.json", json.dumps(index))


@dataclass(frozen=True)
class CachedItem:
    """One image of a split: where its pixels are and what goes with them."""

    slot: int
    label: int
    has_mask: bool
    boxes: tuple[Box, ...]  # in working pixels
    study_id: str
    image_id: str
    patient_id: str
    meta: Meta = Meta()
    labels: tuple[float, ...] | None = None  # multi-label sources only: 1 positive, 0 negative, -1 unknown


class CachedImages(Dataset):
    """A split served from the cache: item dicts in the batch format of ``corex.interfaces``."""

    def __init__(self, array: Path, size: int, items: Sequence[CachedItem]):
        self.array, self.size, self.items = Path(array), size, list(items)
        self._pixels: np.ndarray | None = None  # opened lazily, once per DataLoader worker

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self._pixels is None:
            self._pixels = np.load(self.array, mmap_mode="r")
        item = self.items[index]
        # numpy, not torch: a torch op on one small image pays for waking its thread pool
        image = np.multiply(self._pixels[item.slot], np.float32(1.0 / FULL_SCALE), dtype=np.float32)
        result = {
            "image": torch.from_numpy(image).unsqueeze(0),
            "label": torch.tensor(item.label, dtype=torch.int64),
            "mask": torch.from_numpy(boxes_to_mask(item.boxes, self.size)).unsqueeze(0),
            "has_mask": torch.tensor(item.has_mask),
            "study_id": item.study_id,
            "image_id": item.image_id,
            "patient_id": item.patient_id,
            "meta": item.meta.as_dict(),  # the default collate makes it a dict of lists of str
        }
        if item.labels is not None:
            result["labels"] = torch.tensor(item.labels, dtype=torch.float32)
        return result

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_pixels": None}  # a memory map does not travel to workers
