"""Your own data for the loops: jsonl or parquet rows with an image, a question and an answer.

Columns: ``question`` (str), ``answer`` (str or finite number), ``image`` (a file path relative to the data file or
absolute, raw bytes, or ``{"bytes": ..., "path": ...}`` as datasets' Image feature stores it), optional ``hard``
(bool, 1 / 0 or "true" / "false", for per-difficulty evaluation), ``mode`` (``"think"`` / ``"no_think"`` or 1 / 0)
and ``thought`` (the written reasoning of a thinking target); annealing needs ``mode`` on every row and ``thought``
on the thinking ones. Every bad row is reported with its index and reason (in jsonl, a line that is not UTF-8 JSON
is one bad row); ``on_bad_row="raise"`` stops at the first, ``"skip"`` leaves it out — it is never trained on.

Loading never blocks: an image path is opened only when it is a regular file (a FIFO, a device, a socket or a
directory is a bad row saying so, never an ``open`` that waits forever), its reading and decoding run under a time
bound (``IMAGE_TIMEOUT_S``) and a size bound (``MAX_IMAGE_BYTES`` on the file, PIL's ``Image.MAX_IMAGE_PIXELS`` on
the decoded pixels: a decompression bomb is a bad row before any pixel is decoded).
"""

from __future__ import annotations

import io
import json
import math
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from r4b_fast.modes import Mode

_MODES = {"think": Mode.THINK, "no_think": Mode.NO_THINK, 1: Mode.THINK, 0: Mode.NO_THINK}


@dataclass(frozen=True)
class DataItem:
    """One row, with the interface of the embedded task's ``Item`` (question, answer, hard, image()).

    The image is kept as its encoded source (bytes or a path) and decoded on use, at its native size: a dataset of
    large images is not held decoded in memory. The loops resize or tile it as the model wants (``ImageEncoder``).
    """

    question: str
    answer: str
    source: bytes | str  # the encoded image, or the path of its file
    size: tuple[int, int]  # (H, W), measured when the row was validated
    hard: bool | None = None
    mode: Mode | None = None
    thought: str | None = None
    row: int = -1  # index in the file, for reports

    @property
    def steps(self) -> str:
        """The thinking target's reasoning (the embedded task's ``Item.steps``)."""
        if not self.thought:
            raise ValueError("thought: a thinking target needs the row's written reasoning")
        return self.thought

    def image(self) -> torch.Tensor:
        """``[3, H, W]`` float32 in [0, 1]."""
        return _to_tensor(_open_image(self.source))


class BadRowError(ValueError):
    """A data row that cannot be trained on; the message names the row and the reason."""


IMAGE_TIMEOUT_S = 60.0  # reading + decoding one image: longer is a bad row (a file on a hung mount, say)
MAX_IMAGE_BYTES = 512 * 2**20  # an image file larger than this is a bad row, never read into memory


class ImageError(ValueError):
    """An image that cannot be read safely (not a regular file, too large, too slow): its message is the reason."""


def _file_kind(mode: int) -> str:
    kinds = [(stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")]  # fmt: skip
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def _read_regular_file(path: str, what: str = "image", max_bytes: int | None | str = "image") -> bytes:
    """The bytes of ``path``, which must be a regular file: ``stat`` before ``open`` (a FIFO's ``open`` blocks until
    a writer comes), opened non-blocking and checked again on the open descriptor (no swap in between).
    ``max_bytes``: ``"image"`` is ``MAX_IMAGE_BYTES`` (read when called), None no bound."""
    if max_bytes == "image":
        max_bytes = MAX_IMAGE_BYTES
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(f"{what}: {path} is {_file_kind(st.st_mode)}, not a regular file")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ImageError(f"{what}: {path} is {_file_kind(st.st_mode)}, not a regular file")
        too_large = f"{what}: {path} is larger than MAX_IMAGE_BYTES = {max_bytes} bytes: not read"
        if max_bytes is not None and st.st_size > max_bytes:
            raise ImageError(too_large)
        data = f.read() if max_bytes is None else f.read(max_bytes + 1)
    if max_bytes is not None and len(data) > max_bytes:
        raise ImageError(too_large)
    return data


def _decode(source):
    from PIL import Image

    data = source if isinstance(source, (bytes, bytearray)) else _read_regular_file(source)
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as err:  # more than twice Image.MAX_IMAGE_PIXELS: PIL refuses at open
        raise ImageError(f"image: decompression bomb refused before decoding ({err})") from err
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and img.width * img.height > limit:
        raise ImageError(f"image: {img.width}x{img.height} = {img.width * img.height} pixels exceed the bound of "
                         f"{limit} (PIL's Image.MAX_IMAGE_PIXELS; a decompression bomb?): not decoded")  # fmt: skip
    return img.convert("RGB")  # decodes fully: a truncated file fails here, not in the middle of training


def _open_image(source):
    """``source`` (bytes, or the path of a regular file) decoded to an RGB PIL image within ``IMAGE_TIMEOUT_S``.

    The work runs in a daemon thread: a read that blocks (a hung network mount) leaves that thread waiting, never the
    loader, which reports the image as a bad one.
    """
    result: dict = {}

    def work():
        try:
            result["image"] = _decode(source)
        except BaseException as err:  # handed to the caller's thread
            result["error"] = err

    worker = threading.Thread(target=work, name="r4b-image-decode", daemon=True)
    worker.start()
    worker.join(IMAGE_TIMEOUT_S)
    if worker.is_alive():
        where = "" if isinstance(source, (bytes, bytearray)) else f" {source}"
        raise ImageError(f"image{where}: not read and decoded within IMAGE_TIMEOUT_S = {IMAGE_TIMEOUT_S:g} s "
                         "(a file that blocks on read?)")  # fmt: skip
    if "error" in result:
        raise result["error"]
    return result["image"]


def _to_tensor(img) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1).contiguous() / 255


def _image_source(value, base: Path) -> bytes | str:
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        return str(Path(value) if Path(value).is_absolute() else base / value)
    raise ValueError(f"image: expected a path, bytes or {{'bytes', 'path'}}, got {type(value).__name__}")


_HARD = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


def _is_nan(value) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _parse_hard(value) -> bool | None:
    """``hard``: a bool, 0 / 1, or the strings true/false/1/0/yes/no; None (or a parquet null / NaN) is unknown.
    ``bool("false")`` is True: strings are read by their meaning, anything else is an error."""
    if value is None or _is_nan(value):
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _HARD:
        return _HARD[value.strip().lower()]
    raise ValueError(f"hard: expected true/false (or 1/0), got {value!r}")


def _parse_row(row: dict, base: Path, index: int) -> DataItem:
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ValueError("question: missing or empty")
    answer = row.get("answer")
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        raise ValueError("answer: missing or empty")
    if _is_nan(answer) or not isinstance(answer, (str, int, float)) or isinstance(answer, bool):
        # a parquet null in a float column reads as NaN: str() would make it the answer "nan"
        raise ValueError(f"answer: expected a string or a finite number, got {answer!r}")
    if isinstance(answer, float) and not math.isfinite(answer):
        raise ValueError(f"answer: expected a finite number, got {answer!r}")
    if row.get("image") is None:
        raise ValueError("image: missing")
    source = _image_source(row["image"], base)
    try:
        img = _open_image(source)  # decoded fully now: a truncated file fails here, not in the middle of training
    except ImageError:
        raise  # not a regular file, too large, too slow: its own reason
    except Exception as err:  # PIL raises many types for a corrupt or missing file
        raise ValueError(f"image: cannot be decoded ({type(err).__name__}: {err})") from err
    mode = row.get("mode")
    if mode is not None:
        if not isinstance(mode, (str, int)) or mode not in _MODES:
            raise ValueError(f"mode: expected 'think', 'no_think', 1 or 0, got {mode!r}")
        mode = _MODES[mode]
    hard = _parse_hard(row.get("hard"))
    thought = row.get("thought")
    if thought is not None and not isinstance(thought, str):
        raise ValueError(f"thought: expected a string, got {type(thought).__name__}")
    thought = thought.strip() if thought else None
    return DataItem(question.strip(), str(answer).strip(), source, (img.height, img.width),
                    hard, mode, thought, index)  # fmt: skip


def _read_records(path: Path) -> list:
    """The file's rows, each a dict or a ``BadRowError`` for a line that is not UTF-8 JSON (jsonl: one bad line is
    one bad row, not a bad file). ``.json``: a JSON array of objects, else read as jsonl. ``.parquet``: ``datasets``.
    """
    if path.suffix == ".parquet":
        import datasets  # training-data code only

        try:
            table = datasets.load_dataset("parquet", data_files=str(path), split="train")
        except Exception as err:  # pyarrow / datasets raise many types for an empty or corrupt file
            raise ValueError(f"dataset: cannot read {path} as parquet ({type(err).__name__}: {err})") from err
        return list(table)
    raw = _read_regular_file(str(path), "dataset", max_bytes=None)  # a FIFO is refused, never waited on
    if path.suffix == ".json" and raw.lstrip()[:1] == b"[":
        try:
            rows = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"dataset: {path} is not a valid JSON array ({err})") from err
        return rows
    records = []
    for line in raw.splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line.decode("utf-8")))
        except UnicodeDecodeError as err:
            records.append(BadRowError(f"not UTF-8 (byte {err.start}: {line[err.start:err.start + 1]!r})"))
        except json.JSONDecodeError as err:
            records.append(BadRowError(f"not JSON ({err.msg} at column {err.colno})"))
    return records


def load_rows(path: Path | str, *, on_bad_row: str = "raise") -> tuple[list[DataItem], list[tuple[int, str]]]:
    """Read a jsonl/json or parquet file; return the good rows and ``(row, reason)`` of the bad ones (row: the
    0-based index among the file's rows, blank jsonl lines not counted). A line that is not UTF-8 JSON is a bad
    row like any other. An empty file, or one without a usable row, raises ``ValueError``.

    Example: ``rows, bad = load_rows("train.jsonl", on_bad_row="skip")``
    """
    if on_bad_row not in ("raise", "skip"):
        raise ValueError(f"on_bad_row: expected 'raise' or 'skip', got {on_bad_row!r}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset: {path} does not exist")
    kinds = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
    if path.suffix not in kinds:
        raise ValueError(f"dataset: expected a .jsonl, .json or .parquet file, got {path.name}")
    mode = path.stat().st_mode
    if not stat.S_ISREG(mode):
        raise ValueError(f"dataset: {path} is {_file_kind(mode)}, not a regular file")
    records = _read_records(path)
    if not records:
        raise ValueError(f"dataset: {path} has no rows (empty file)")
    items, bad = [], []
    for index, row in enumerate(records):
        try:
            if isinstance(row, BadRowError):
                raise row
            items.append(_parse_row(row, path.parent, index))
        except ValueError as err:
            if on_bad_row == "raise":
                raise BadRowError(f"dataset {path.name}, row {index}: {err}") from err
            bad.append((index, str(err)))
    if not items:
        raise ValueError(f"dataset: no usable rows in {path} ({len(bad)} bad)")
    return items, bad


def load_training_rows(path: Path | str, *, prompt_tokens, max_prompt_tokens: int, on_bad_row: str = "raise",
                       check=None) -> list[DataItem]:  # fmt: skip
    """:func:`load_rows` plus the loop's own checks, each bad row reported on stderr with its index and reason
    (``on_bad_row="raise"``: a :class:`BadRowError` at the first): a prompt of more than ``max_prompt_tokens``
    tokens (``prompt_tokens(row) -> int``), and ``check(row) -> reason or None`` when given."""
    import sys

    path = Path(path)
    rows, bad = load_rows(path, on_bad_row=on_bad_row)
    kept = []
    for row in rows:
        n = prompt_tokens(row)
        reason = None
        if n > max_prompt_tokens:
            reason = f"prompt of {n} tokens exceeds --max-prompt-tokens {max_prompt_tokens}"
        elif check is not None:
            reason = check(row)
        if reason is None:
            kept.append(row)
            continue
        if on_bad_row == "raise":
            raise BadRowError(f"dataset {path.name}, row {row.row}: {reason}")
        bad.append((row.row, reason))
    for index, reason in sorted(bad):
        print(f"skipped {path.name} row {index}: {reason}", file=sys.stderr)
    if not kept:
        raise ValueError(f"--dataset: no usable rows left in {path}")
    return kept


def annealing_row_problem(row: DataItem) -> str | None:
    """Why a row cannot be an annealing target (None when it can): it needs a mode label, and a thinking label
    needs the written reasoning."""
    if row.mode is None:
        return "mode: missing (annealing trains each row in its labelled mode: 'think' or 'no_think')"
    if row.mode == Mode.THINK and not row.thought:
        return "thought: missing for a 'think' row (the thinking target is <think>\\nthought\\n</think>\\n\\nanswer)"
    return None
