"""``synchrorama download-hdtf`` builds every output path inside ``--out`` (issue 21, fault 8).

Names come from the url files' text. Before this, ``../evil`` wrote ``evil.mp4`` next to the output folder, ``a/b``
left a folder ``.a`` behind, a name with ``%(title)s`` (or an output folder with one) reached yt-dlp's output
template as a field, a name of 300 characters stopped the whole command with a traceback, and a name was printed
as rich markup (``[bold]Anchor`` lost its brackets). Now a name that is not a plain file name is refused with its
reason and nothing is written for it; yt-dlp gets a fixed template in the output folder (``%`` escaped, no
character of the name), and the finished download is renamed to ``Name.mp4`` by Python.

yt-dlp is an optional extra and there is no network here: a stand-in ``yt_dlp`` module records the options and
URLs it is given and writes where yt-dlp would (its template evaluated: ``%%`` -> ``%``, ``%(field)s`` -> the
video's field, folders created).
"""

from __future__ import annotations

import hashlib
import re
import sys
import types
from pathlib import Path

import pytest
from typer.testing import CliRunner

from synchrorama.cli import app

runner = CliRunner()
URL = "https://www.youtube.com/watch?v=CPCoMyuBRM0"
_FIELD = re.compile(r"%(%|\((\w+)\)s)")


class _FakeYoutubeDL:
    """What the command uses of ``yt_dlp.YoutubeDL``: a context manager with ``download([url])``."""

    calls: list[tuple[dict, list[str]]] = []
    video = {"id": "CPCoMyuBRM0", "title": "A Video Title", "ext": "mp4"}

    def __init__(self, params: dict):
        self.params = params

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def download(self, urls: list[str]) -> int:
        self.calls.append((dict(self.params), list(urls)))
        path = Path(_FIELD.sub(lambda m: "%" if m.group(1) == "%" else self.video.get(m.group(2), "NA"),
                               self.params["outtmpl"]))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"a video from " + urls[0].encode())
        return 0


@pytest.fixture
def downloader(monkeypatch):
    _FakeYoutubeDL.calls = []
    monkeypatch.setitem(sys.modules, "yt_dlp", types.SimpleNamespace(YoutubeDL=_FakeYoutubeDL))
    return _FakeYoutubeDL


def _download(tmp_path: Path, lines: list[str], *extra: str, folder: str = "videos") -> tuple[Path, str]:
    """Run the command on one url file of ``lines`` into ``tmp_path/folder``; returns that folder and the output."""
    annotations = tmp_path / "annotations"
    annotations.mkdir()
    (annotations / "XX_video_url.txt").write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    out = tmp_path / folder
    result = runner.invoke(app, ["download-hdtf", "--out", str(out), "--annotations-dir", str(annotations), *extra])
    assert result.exit_code == 0, result.output
    return out, result.output


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def _template(out: Path, name: str) -> str:
    """The exact template: a fixed name (a hash of the video name) in the output folder, ``%`` escaped."""
    partial = out.resolve() / f".download-{hashlib.sha256(name.encode()).hexdigest()[:16]}.mp4"
    return str(partial).replace("%", "%%")


@pytest.mark.parametrize("name", ["Radio1", "%(title)s", "100%_real", "100%%done", "ünïcødé_名字", "$HOME"])
def test_a_safe_name_is_downloaded_by_a_fixed_template_and_renamed_to_name_mp4(tmp_path, downloader, name):
    # the output folder's own name has a space and a template field too
    out, output = _download(tmp_path, [f"{name} {URL}"], folder="videos 100%(id)s")
    assert _files(tmp_path) == {"annotations", "annotations/XX_video_url.txt", out.name, f"{out.name}/{name}.mp4"}
    assert (out / f"{name}.mp4").read_bytes() == f"a video from {URL}".encode()  # the name the HDTF reader looks for
    assert [(params["outtmpl"], urls) for params, urls in downloader.calls] == [(_template(out, name), [URL])]
    assert f"{name}: downloaded" in output
    # a second run finds it and downloads nothing
    _FakeYoutubeDL.calls = []
    rerun = runner.invoke(app, ["download-hdtf", "--out", str(out), "--annotations-dir", str(tmp_path / "annotations")])
    assert f"{name}: present" in rerun.output and downloader.calls == []


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", "a\\b", "../../tmp/x", "bad\x01name"])
def test_a_name_that_is_not_a_plain_file_name_is_refused_and_nothing_is_written(tmp_path, downloader, name):
    out, output = _download(tmp_path, [f"{name} {URL}", f"Radio1 {URL}"])
    assert _files(tmp_path) == {"annotations", "annotations/XX_video_url.txt", out.name, f"{out.name}/Radio1.mp4"}
    assert [urls for _, urls in downloader.calls] == [[URL]]  # only Radio1's
    reason, shown = ("unsafe_path", name) if name.isprintable() else ("bad_name", repr(name))  # escaped when odd
    assert f"{shown}: refused ({reason}): video name {name!r} " in output
    assert "Radio1: downloaded" in output


def test_a_name_too_long_for_a_file_is_recorded_and_the_others_go_on(tmp_path, downloader):
    name = "N" * 300
    out, output = _download(tmp_path, [f"{name} {URL}", f"Radio1 {URL}"])
    assert f"{name}: failed:" in output and "Radio1: downloaded" in output
    assert _files(out) == {"Radio1.mp4"}


def test_names_with_spaces_or_markup_are_reported_never_garbled(tmp_path, downloader):
    out, output = _download(tmp_path, [f"my video {URL}", f"[bold]Anchor {URL}", f"Radio1 {URL}"])
    assert "[bold]Anchor: downloaded" in output and (out / "[bold]Anchor.mp4").is_file()  # not read as rich markup
    # a line of three fields is not a name and a URL: said, with its line, and nothing downloaded for it
    assert re.search(r"XX_video_url\.txt line 1: skipped: expected 2 fields \(Name URL\), got 3", output)
    assert _files(out) == {"[bold]Anchor.mp4", "Radio1.mp4"}
    only = runner.invoke(app, ["download-hdtf", "--out", str(out), "--annotations-dir", str(tmp_path / "annotations"),
                               "--name", "my video"])
    assert only.exit_code == 0 and "my video: not in the url files" in only.output
