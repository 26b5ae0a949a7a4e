"""Data loading never blocks (issue #22 item 7): an image path that is a FIFO, a device, a socket or a directory is a
bad row with that reason (raised or skipped like any other), never an ``open`` that waits forever; a decompression
bomb is refused before decoding; a read that hangs is cut by a time bound.

Every load runs under ``_bounded``: a regression fails the test after a timeout instead of hanging the suite, and
a reader blocked on a FIFO is released by opening its write end.
"""

import io
import json
import os
import socket
import struct
import threading
import zlib

import pytest

from r4b_fast.training import data
from r4b_fast.training.data import BadRowError, load_rows, load_training_rows

GUARD_S = 60.0


def _png(size=(16, 16)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (255, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def _bomb_png(width=100_000, height=100_000) -> bytes:
    """A valid PNG header announcing ``width x height`` pixels (30 GB as RGB) with a few bytes of data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _dataset(tmp_path, images: list[str]):
    """Rows 0 and 2 are good; row 1's image is ``images`` (one row per entry, from row 1 on)."""
    (tmp_path / "good.png").write_bytes(_png())
    rows = [{"image": "good.png", "question": "q?", "answer": "1"}]
    rows += [{"image": image, "question": "q?", "answer": "2"} for image in images]
    rows.append({"image": "good.png", "question": "q?", "answer": "3"})
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _unblock(fifo) -> None:
    """Release a reader blocked opening ``fifo`` (the old behaviour): open its write end without blocking."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:  # no reader waiting: nothing to release
        pass


def _bounded(fn, *args, release=(), **kwargs):
    """``fn(*args, **kwargs)`` in a daemon thread; fails (instead of hanging) when it takes more than GUARD_S."""
    out: dict = {}

    def work():
        try:
            out["value"] = fn(*args, **kwargs)
        except BaseException as err:
            out["error"] = err

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    worker.join(GUARD_S)
    if worker.is_alive():
        for fifo in release:
            _unblock(fifo)
        worker.join(5)
        pytest.fail(f"{getattr(fn, '__name__', fn)} blocked for more than {GUARD_S} s")
    if "error" in out:
        raise out["error"]
    return out["value"]


@pytest.fixture()
def fifo(tmp_path):
    path = tmp_path / "pipe.png"
    os.mkfifo(path)
    yield path
    _unblock(path)


def test_fifo_image_is_a_bad_row_raise(tmp_path, fifo):
    path = _dataset(tmp_path, [fifo.name])
    with pytest.raises(BadRowError, match=r"rows.jsonl, row 1: image: .*pipe.png is a FIFO \(named pipe\), not a "):
        _bounded(load_rows, path, release=[fifo])


def test_fifo_image_is_a_bad_row_skip(tmp_path, fifo):
    path = _dataset(tmp_path, [fifo.name])
    good, bad = _bounded(load_rows, path, on_bad_row="skip", release=[fifo])
    assert [r.answer for r in good] == ["1", "3"]
    assert [b[0] for b in bad] == [1] and "is a FIFO (named pipe), not a regular file" in bad[0][1]


def test_fifo_in_the_loops_loader_is_reported_and_skipped(tmp_path, fifo, capsys):
    path = _dataset(tmp_path, [fifo.name])
    kept = _bounded(load_training_rows, path, prompt_tokens=lambda row: 1, max_prompt_tokens=10, on_bad_row="skip",
                    release=[fifo])  # fmt: skip
    assert [r.answer for r in kept] == ["1", "3"]
    assert "skipped rows.jsonl row 1: image: " in capsys.readouterr().err
    with pytest.raises(BadRowError, match="row 1: image: .*FIFO"):
        _bounded(load_training_rows, path, prompt_tokens=lambda row: 1, max_prompt_tokens=10, release=[fifo])


def test_directory_and_devices_and_sockets_are_bad_rows(tmp_path):
    (tmp_path / "folder.png").mkdir()
    images = ["folder.png", "/dev/zero", "/dev/null"]  # /dev/zero would never end, /dev/null is empty
    sock_path = tmp_path / "s.png"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(sock_path))
        images.append("s.png")
    except OSError:  # a tmp path too long for AF_UNIX: the other kinds still run
        pass
    try:
        path = _dataset(tmp_path, images)
        good, bad = _bounded(load_rows, path, on_bad_row="skip")
    finally:
        sock.close()
    assert [r.answer for r in good] == ["1", "3"] and [b[0] for b in bad] == list(range(1, len(images) + 1))
    kinds = ["a directory", "a character device", "a character device", "a socket"][: len(images)]
    for (_, reason), image, kind in zip(bad, images, kinds):
        assert reason.startswith("image: ") and f"{image} is {kind}, not a regular file" in reason, reason
    with pytest.raises(BadRowError, match="row 1: image: .*folder.png is a directory"):
        _bounded(load_rows, path)


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    (tmp_path / "bomb.png").write_bytes(_bomb_png())
    path = _dataset(tmp_path, ["bomb.png"])
    with pytest.raises(BadRowError, match="row 1: image: decompression bomb refused before decoding"):
        _bounded(load_rows, path)
    good, bad = _bounded(load_rows, path, on_bad_row="skip")
    assert len(good) == 2 and "10000000000 pixels" in bad[0][1]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pixel_bound_is_pils_max_image_pixels(tmp_path, monkeypatch):
    """Between PIL's bound and twice it PIL only warns: our check refuses it, naming the size and the bound."""
    from PIL import Image

    (tmp_path / "big.png").write_bytes(_png((40, 40)))
    path = _dataset(tmp_path, ["big.png"])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # the 16x16 images stay under it
    with pytest.raises(BadRowError, match=r"row 1: image: 40x40 = 1600 pixels exceed the bound of 1000 \(PIL's"):
        _bounded(load_rows, path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # PIL's own switch turns the bound off
    good, bad = _bounded(load_rows, path)
    assert len(good) == 3 and not bad


def test_inline_bomb_bytes_are_refused_too(tmp_path):
    import datasets

    png = _png()
    datasets.Dataset.from_dict({"image": [png, _bomb_png(), png], "question": ["q?"] * 3,
                                "answer": ["1", "2", "3"]}).to_parquet(str(tmp_path / "d.parquet"))  # fmt: skip
    good, bad = _bounded(load_rows, tmp_path / "d.parquet", on_bad_row="skip")
    assert [r.answer for r in good] == ["1", "3"] and "decompression bomb" in bad[0][1]


def test_file_size_bound(tmp_path, monkeypatch):
    from PIL import Image

    noise = Image.frombytes("RGB", (64, 64), os.urandom(64 * 64 * 3))  # incompressible: about 12 KB as PNG
    noise.save(tmp_path / "large.png")
    path = _dataset(tmp_path, ["large.png"])
    monkeypatch.setattr(data, "MAX_IMAGE_BYTES", 4000)  # the 16x16 images stay under it
    with pytest.raises(BadRowError, match="row 1: image: .*large.png is larger than MAX_IMAGE_BYTES = 4000 bytes"):
        _bounded(load_rows, path)


def test_a_read_that_hangs_is_cut_by_the_time_bound(tmp_path, monkeypatch):
    """A regular file whose read never returns (a hung network mount) is a bad row after IMAGE_TIMEOUT_S."""
    path = _dataset(tmp_path, ["stuck.png"])
    (tmp_path / "stuck.png").write_bytes(_png())
    release = threading.Event()
    read = data._read_regular_file

    def hanging_read(source, *args, **kwargs):
        if str(source).endswith("stuck.png"):
            release.wait(GUARD_S * 2)
        return read(source, *args, **kwargs)

    monkeypatch.setattr(data, "_read_regular_file", hanging_read)
    monkeypatch.setattr(data, "IMAGE_TIMEOUT_S", 0.5)
    try:
        good, bad = _bounded(load_rows, path, on_bad_row="skip")
        assert [r.answer for r in good] == ["1", "3"]
        assert bad[0][0] == 1 and "stuck.png: not read and decoded within IMAGE_TIMEOUT_S = 0.5 s" in bad[0][1]
    finally:
        release.set()


def test_an_image_swapped_for_a_fifo_after_loading_fails_fast(tmp_path):
    """``DataItem.image()`` (during training) goes through the same checks."""
    path = _dataset(tmp_path, ["late.png"])
    (tmp_path / "late.png").write_bytes(_png())
    good, _ = _bounded(load_rows, path)
    (tmp_path / "late.png").unlink()
    os.mkfifo(tmp_path / "late.png")
    try:
        with pytest.raises(data.ImageError, match="late.png is a FIFO"):
            _bounded(good[1].image, release=[tmp_path / "late.png"])
    finally:
        _unblock(tmp_path / "late.png")


def test_a_dataset_file_that_is_a_fifo_is_refused(tmp_path):
    os.mkfifo(tmp_path / "rows.jsonl")
    try:
        with pytest.raises(ValueError, match="rows.jsonl is a FIFO \\(named pipe\\), not a regular file"):
            _bounded(load_rows, tmp_path / "rows.jsonl", release=[tmp_path / "rows.jsonl"])
    finally:
        _unblock(tmp_path / "rows.jsonl")
