"""VideoLLaMA2 in its own environment: the call contract between the pipeline and flows/videollama2_service.py.

A stand-in ``videollama2`` package (written below into a temporary folder) has VideoLLaMA2's public API:
``model_init(path)`` -> (model with ``config.num_frames`` read from the checkpoint's config.json, processor dict,
tokenizer), ``processor["video"](path or frames, num_frames=N)`` that samples like VideoLLaMA2's
``process_video`` (uniform over the clip, decoded with PyAV here) and, like it, pads a short *frame list* with
black frames; ``mm_infer`` answers with what it saw. It logs every video it processed, so the tests see the
frames the model got. The service runs in a separate process whose PYTHONPATH holds only the stand-in and a copy
of the service file, with the pipeline's packages made unimportable, as in a VideoLLaMA2 environment.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from preprocess.run.failures import is_environment_error
from preprocess.visual.describe_videollama2 import (
    DEFAULT_DEPLOYMENT,
    ClipCaptionError,
    VideoLLaMA2DeploymentCaptioner,
    VideoLLaMA2ServiceError,
)
from synchrorama.prefect_server import die_with_this_process, is_healthy, stop_process_group
from synchrorama.sample_data import make_talking_video

REPO = Path(__file__).resolve().parent.parent
SERVICE_FILE = REPO / "flows" / "videollama2_service.py"
CONFIG_NUM_FRAMES = 12  # neither the package's NUM_FRAMES (8) nor the pipeline's visual.description.n_frames (8)
STANDIN_SIZE = 48  # the stand-in processor's output side (VideoLLaMA2's CLIP processor gives 336)
WAIT_S = 120  # generous: the test machine is a busy 2-core box

STANDIN_INIT = '''"""Stand-in for VideoLLaMA2's API (videollama2/__init__.py, mm_utils.process_video) in tests."""
import json
import os
import re
import time
from functools import partial
from pathlib import Path

import numpy as np

from .constants import NUM_FRAMES

SIZE = %(size)d


class Config:
    def __init__(self, values):
        self.__dict__.update(values)


class Model:
    def __init__(self, config):
        self.config = config


def _uniform(total, num_frames):
    # VideoLLaMA2's frame_sample(mode="uniform"): centres of num_frames equal spans, repeats if total < num_frames
    span = (total - 1) / num_frames
    return np.round(np.array([span * (i + 0.5) for i in range(num_frames)]) + 1e-6).astype(int)


def process_video(video, processor=None, aspect_ratio=None, num_frames=NUM_FRAMES):
    decoded_total = None
    if isinstance(video, str):
        import av

        with av.open(video) as container:
            decoded = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
        if not decoded:
            raise ValueError(f"no frames decoded from {video}")
        decoded_total = len(decoded)
        frames = [decoded[i] for i in _uniform(len(decoded), num_frames)]
    else:
        frames = list(video)
    while len(frames) < num_frames:  # what VideoLLaMA2 does to a short frame list: black frames
        frames.append(np.zeros_like(frames[-1]))
    rows = np.linspace(0, frames[0].shape[0] - 1, SIZE).astype(int)
    cols = np.linspace(0, frames[0].shape[1] - 1, SIZE).astype(int)
    tensor = np.stack([frame[rows][:, cols] for frame in frames]).transpose(0, 3, 1, 2).astype(np.float32)
    log = os.environ.get("VIDEOLLAMA2_STANDIN_LOG")
    if log:
        with open(log, "a") as handle:
            handle.write(json.dumps({"video": video if isinstance(video, str) else "frames",
                                     "num_frames": num_frames, "decoded_total": decoded_total,
                                     "frame_means": [float(frame.mean()) for frame in tensor]}) + "\\n")
    return tensor  # (T, C, H, W)


def model_init(model_path=None, **kwargs):
    config = Config(json.loads((Path(model_path) / "config.json").read_text()))
    model = Model(config)
    num_frames = getattr(config, "num_frames", NUM_FRAMES)
    video = partial(process_video, processor=None, aspect_ratio=None, num_frames=num_frames)
    return model, {"video": video}, object()


def mm_infer(image_or_video, instruct, model, tokenizer, modal="video", **kwargs):
    if instruct.startswith("sleep:"):  # lets a test hold the service busy
        time.sleep(float(instruct.split(":")[1]))
    darkest = min(float(frame.mean()) for frame in image_or_video)
    return (f" saw {image_or_video.shape[0]} frames of {image_or_video.shape[-1]} px, darkest mean {darkest:.0f}, "
            f"max_new_tokens {kwargs.get('max_new_tokens')}: {instruct} ")
'''

# Loaded first by every Python of the service's environment (site imports sitecustomize): the pipeline's packages
# are reachable here through the editable install, in a real VideoLLaMA2 environment they are not installed.
GUARD = '''import sys


class _NoPipeline:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"preprocess", "synchrorama", "flows", "model", "shards"}:
            raise ImportError(f"the VideoLLaMA2 service imported the pipeline package {name!r}")
        return None


sys.meta_path.insert(0, _NoPipeline())
'''


@pytest.fixture(scope="module")
def standin(tmp_path_factory) -> Path:
    """A folder with the stand-in ``videollama2`` package and the no-pipeline guard."""
    root = tmp_path_factory.mktemp("videollama2-env")
    package = root / "videollama2"
    package.mkdir()
    (package / "__init__.py").write_text(STANDIN_INIT % {"size": STANDIN_SIZE})
    (package / "constants.py").write_text("NUM_FRAMES = 8\n")
    (root / "sitecustomize.py").write_text(GUARD)
    return root


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    """A 2 s clip, a 0.32 s clip with 8 frames (fewer than the config's 12), an undecodable file, a checkpoint."""
    root = tmp_path_factory.mktemp("videollama2-media")
    checkpoint = root / "VideoLLaMA2-standin"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps({"model_type": "videollama2_qwen2",
                                                        "num_frames": CONFIG_NUM_FRAMES}))
    broken = root / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    return {"long": make_talking_video(root / "long.mp4", seconds=2.0, fps=25, audio="none"),
            "short": make_talking_video(root / "short.mp4", seconds=0.32, fps=25, audio="none"),
            "broken": broken, "checkpoint": checkpoint}


@pytest.fixture
def standin_importable(standin, monkeypatch):
    """``import videollama2`` finds the stand-in in this process for one test."""
    monkeypatch.syspath_prepend(str(standin))
    yield
    for name in [name for name in sys.modules if name.split(".")[0] == "videollama2"]:
        del sys.modules[name]


def _log_entries(log: Path) -> dict[str, dict]:
    if not log.exists():
        return {}
    return {entry["video"]: entry for entry in map(json.loads, log.read_text().splitlines())}


def test_standin_pads_a_short_frame_list_with_black_as_videollama2_does(standin_importable, media):
    """The no-black-frames checks below can fail: handed 8 decoded frames where the config wants 12, the
    processor pads with black, as VideoLLaMA2's process_video does."""
    import av
    import videollama2

    _, processor, _ = videollama2.model_init(str(media["checkpoint"]))
    with av.open(str(media["short"])) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(frames) == 8
    padded = processor["video"](np.stack(frames))
    assert padded.shape[0] == CONFIG_NUM_FRAMES and [float(frame.mean()) for frame in padded[8:]] == [0.0] * 4


@pytest.fixture(scope="module")
def server() -> str:
    """The API URL of the session's Prefect server (tests/conftest.py starts one for the whole run)."""
    api_url = os.environ.get("PREFECT_API_URL")
    assert api_url and is_healthy(api_url), f"no healthy Prefect server at PREFECT_API_URL={api_url!r}"
    return api_url


def test_flow_called_directly_uses_the_config_frame_count_and_reports_clip_errors(server, standin_importable,
                                                                                  media, tmp_path, monkeypatch):
    from flows.videollama2_service import videollama2_captions

    log = tmp_path / "standin.jsonl"
    monkeypatch.setenv("VIDEOLLAMA2_STANDIN_LOG", str(log))

    clips = [str(media["long"]), str(media["broken"]), str(media["short"])]
    entries = videollama2_captions(clips, "Describe the person.", str(media["checkpoint"]), max_new_tokens=7)

    assert [entry["clip"] for entry in entries] == clips
    long, broken, short = entries
    for entry in (long, short):
        assert entry["error"] is None and entry["model"] == str(media["checkpoint"])
        assert (entry["n_frames"], entry["frame_size"]) == (CONFIG_NUM_FRAMES, STANDIN_SIZE)
        assert entry["frames_from"] == "model.config.num_frames"
        assert entry["text"].startswith(f"saw {CONFIG_NUM_FRAMES} frames of {STANDIN_SIZE} px")
        assert entry["text"].endswith("max_new_tokens 7: Describe the person.")
    assert broken["text"] is None and broken["n_frames"] is None and broken["error"]
    # What the model got: the clip's path, 12 real frames; the 8-frame clip's frames repeat, none is black.
    seen = _log_entries(log)
    assert set(seen) == {str(media["long"]), str(media["short"])}
    assert seen[str(media["short"])]["decoded_total"] == 8
    for entry in seen.values():
        assert entry["num_frames"] == CONFIG_NUM_FRAMES and len(entry["frame_means"]) == CONFIG_NUM_FRAMES
        assert min(entry["frame_means"]) > 20  # the generated scene's darkest frame is far from black


def test_frame_count_falls_back_to_the_package_constant(standin_importable):
    from flows.videollama2_service import config_num_frames

    class Model:
        class config:  # named like the attribute VideoLLaMA2 models have
            model_type = "videollama2"

    assert config_num_frames(Model()) == (8, "videollama2.constants.NUM_FRAMES")


def test_service_and_client_agree_on_the_flow_name():
    from flows import videollama2_service

    assert DEFAULT_DEPLOYMENT == f"{videollama2_service.FLOW_NAME}/{videollama2_service.DEFAULT_DEPLOYMENT}"


@pytest.fixture(scope="module")
def served(server, standin, tmp_path_factory):
    """``python videollama2_service.py serve`` from a folder holding only a copy of the service file, with
    PYTHONPATH = the stand-in environment + that folder: (api_url, standin log, serving process)."""
    service_dir = tmp_path_factory.mktemp("service")
    shutil.copy(SERVICE_FILE, service_dir / SERVICE_FILE.name)
    log = service_dir / "standin.jsonl"
    env = {**os.environ, "PYTHONPATH": f"{standin}{os.pathsep}{service_dir}", "PREFECT_API_URL": server,
           "PREFECT_HOME": str(tmp_path_factory.mktemp("prefect-service-home")),
           "PREFECT_RUNNER_POLL_FREQUENCY": "1", "VIDEOLLAMA2_STANDIN_LOG": str(log)}
    guard = subprocess.run([sys.executable, "-c", "import preprocess"], cwd=service_dir, env=env,
                           capture_output=True, text=True, timeout=60)
    assert guard.returncode != 0 and "imported the pipeline package" in guard.stderr, guard.stderr[-1000:]
    with open(service_dir / "serve.log", "wb") as output:
        process = subprocess.Popen([sys.executable, SERVICE_FILE.name, "serve"], cwd=service_dir, env=env,
                                   stdout=output, stderr=subprocess.STDOUT, process_group=0)
    die_with_this_process(process)  # the runner and its flow-run processes, even when pytest is SIGKILLed
    try:
        from prefect import get_client

        deadline = time.monotonic() + WAIT_S
        with get_client(sync_client=True) as client:
            while True:
                assert process.poll() is None, (service_dir / "serve.log").read_text()[-3000:]
                assert time.monotonic() < deadline, (service_dir / "serve.log").read_text()[-3000:]
                try:
                    if client.read_deployment_by_name(DEFAULT_DEPLOYMENT).status.value == "READY":
                        break
                except Exception:  # not registered yet
                    pass
                time.sleep(1)
        yield server, log, process
    finally:
        stop_process_group(process)  # SIGTERM, then SIGKILL to what is left


def test_client_captions_through_the_served_deployment(served, media):
    _, log, _ = served
    captioner = VideoLLaMA2DeploymentCaptioner(str(media["checkpoint"]), poll_interval_s=0.5, timeout_s=WAIT_S)
    assert captioner.name == f"videollama2:{media['checkpoint']}"
    described = captioner.describe_video(media["short"], "Who is this?", max_new_tokens=5)
    assert (described.n_frames, described.frame_size) == (CONFIG_NUM_FRAMES, STANDIN_SIZE)
    assert described.text.startswith(f"saw {CONFIG_NUM_FRAMES} frames") and described.text.endswith("Who is this?")
    seen = _log_entries(log)[str(media["short"])]  # the service process read the clip's path itself
    assert seen["decoded_total"] == 8 and min(seen["frame_means"]) > 20

    good, bad = captioner.describe_videos([media["long"], media["broken"]], "Describe.")
    assert good.n_frames == CONFIG_NUM_FRAMES and "max_new_tokens 60" in good.text
    assert isinstance(bad, ClipCaptionError) and str(media["broken"]) in str(bad)
    assert not is_environment_error(bad)  # recorded against the clip, the run goes on


def test_describe_stage_in_a_prefect_task_sends_clip_paths(served, media, tmp_path):
    """The describe stage inside a task of a flow, as flows/preprocess.py runs it: a readable clip is described with
    what the model saw, an unreadable one is rejected ``error`` and the run goes on."""
    from prefect import flow, task

    from preprocess.pipeline import ClipJob, PieceOutcome, Workspace, run_stage
    from preprocess.run.model_loading import clear_cache
    from preprocess.run.records import Candidate
    from preprocess.run.settings import load_settings

    settings = load_settings("tiny", {"models": {"captioning": {"model": f"videollama2:{media['checkpoint']}"}}})
    pieces = []
    for name in ("short", "broken"):
        files = tmp_path / name
        files.mkdir()
        shutil.copy(media[name], files / "clip.mp4")
        job = ClipJob(candidate=Candidate(name, str(media[name]), "folder"))
        pieces.append(PieceOutcome(clip_id=name, job=job, files_dir=str(files), content_key=f"{name}-content"))

    @task
    def describe_task(piece: PieceOutcome) -> PieceOutcome:
        return run_stage("describe", piece, settings, Workspace(tmp_path / "out"))

    @flow
    def describe_flow() -> list[PieceOutcome]:
        return [describe_task(piece) for piece in pieces]

    clear_cache()
    try:
        described, broken = describe_flow()
    finally:
        clear_cache()
    entry = described.features["describe"]
    assert described.rejection is None and entry["status"] == "ok"
    assert (entry["n_frames"], entry["frame_size"]) == (CONFIG_NUM_FRAMES, STANDIN_SIZE)
    assert entry["model"] == f"videollama2:{media['checkpoint']}" and entry["text"].startswith("saw 12 frames")
    assert str(tmp_path / "short" / "clip.mp4") in _log_entries(served[1])
    assert (broken.rejection.stage, broken.rejection.reason) == ("describe", "error")
    assert "ClipCaptionError" in broken.rejection.detail and "describe" not in broken.features


def test_a_failed_service_run_is_an_environment_error(served, media, tmp_path):
    captioner = VideoLLaMA2DeploymentCaptioner(str(tmp_path / "no-checkpoint"), poll_interval_s=0.5,
                                               timeout_s=WAIT_S)
    expected = r"ended Failed.*model_init.*prefect flow-run logs"
    with pytest.raises(VideoLLaMA2ServiceError, match=expected) as caught:
        captioner.describe_video(media["long"], "Describe.")
    assert is_environment_error(caught.value)  # the pipeline stops the run instead of rejecting every clip


def test_a_missing_deployment_fails_with_what_to_do(served, media):
    with pytest.raises(VideoLLaMA2ServiceError, match=r"no Prefect deployment 'videollama2-captions/elsewhere'"
                                                      r".*videollama2_service.py serve") as caught:
        VideoLLaMA2DeploymentCaptioner(str(media["checkpoint"]), deployment="videollama2-captions/elsewhere")
    assert is_environment_error(caught.value)


def test_a_run_past_the_timeout_is_cancelled_and_fails(served, media):
    from prefect import get_client

    captioner = VideoLLaMA2DeploymentCaptioner(str(media["checkpoint"]), poll_interval_s=0.5, timeout_s=4)
    started = time.monotonic()
    with pytest.raises(VideoLLaMA2ServiceError, match=r"did not finish within 4 s.*cancelled") as caught:
        captioner.describe_video(media["long"], "sleep:300")
    assert time.monotonic() - started < 30
    flow_run_id = re.search(r"\(([0-9a-f-]{36})\)", str(caught.value)).group(1)
    # The abandoned run does not go on holding the service: its runner kills it.
    deadline = time.monotonic() + WAIT_S
    with get_client(sync_client=True) as client:
        while (state := client.read_flow_run(flow_run_id).state.type.value) != "CANCELLED":
            assert state == "CANCELLING" and time.monotonic() < deadline, state
            time.sleep(1)


def test_a_paused_deployment_is_refused_when_the_model_loads(served, media):
    """A stopped ``serve`` pauses its deployment (when no run is still winding down; else the server marks it not
    ready 60 s after its last poll): the client refuses it at once rather than wait for a run nobody takes."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        deployment_id = client.read_deployment_by_name(DEFAULT_DEPLOYMENT).id
        client.pause_deployment(deployment_id)
        try:
            with pytest.raises(VideoLLaMA2ServiceError, match="no process is serving it.*paused True"):
                VideoLLaMA2DeploymentCaptioner(str(media["checkpoint"]))
        finally:
            client.resume_deployment(deployment_id)
