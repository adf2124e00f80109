"""Optional: download HDTF's source videos from YouTube with yt-dlp (``pip install -e ".[download]"``).

Nothing else in the project needs the network. Videos already present are skipped; each download goes to a
temporary name and is renamed when complete, so a broken-off download never looks like a video.
"""

from __future__ import annotations

from pathlib import Path

from preprocess.datasets.hdtf import read_hdtf_annotations


def download_hdtf_videos(annotations_dir: Path, out_dir: Path, names: list[str] | None = None) -> dict[str, str]:
    """Download ``Name.mp4`` for every (or each named) video in the url files; returns name -> status."""
    try:
        import yt_dlp
    except ImportError as error:
        raise SystemExit('yt-dlp is not installed: pip install -e ".[download]"') from error
    annotations, _ = read_hdtf_annotations(Path(annotations_dir))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    statuses = {}
    for name, url in sorted(annotations.urls.items()):
        if names and name not in names:
            continue
        target = out_dir / f"{name}.mp4"
        if target.exists():
            statuses[name] = "present"
            continue
        partial = out_dir / f".{name}.download.mp4"
        options = {"outtmpl": str(partial), "format": "bestvideo[ext=mp4]+bestaudio[ext=m4a]/best[ext=mp4]/best",
                   "merge_output_format": "mp4", "quiet": True, "noprogress": True}
        try:
            with yt_dlp.YoutubeDL(options) as downloader:
                downloader.download([url])
            partial.replace(target)
            statuses[name] = "downloaded"
        except Exception as error:  # unavailable videos are common; record and go on
            statuses[name] = f"failed: {error}"
    return statuses
