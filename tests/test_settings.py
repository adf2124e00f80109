"""Settings layers: profile, then the dataset's own settings, then the run's overrides."""

from __future__ import annotations

import pytest

from preprocess.run.settings import load_settings


@pytest.mark.parametrize("dataset, language", [("hdtf", "en"), ("mead", "en"), ("folder", None), ("vfhq", None)])
def test_whisper_language_comes_from_the_dataset(dataset, language):
    assert load_settings("default", dataset=dataset).audio.transcription.language == language


def test_run_overrides_win_over_the_dataset_settings():
    overrides = {"audio": {"transcription": {"language": "de"}}}
    assert load_settings("default", overrides, dataset="hdtf").audio.transcription.language == "de"


def test_unknown_keys_are_refused():
    with pytest.raises(ValueError, match="limits"):
        load_settings("default", {"limits": {"task_timeout": 5}})
