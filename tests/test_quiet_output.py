"""What a run prints besides its summaries: no library chatter, progress a log can hold."""

import io
import os
import subprocess
import sys

from PIL import Image
from tqdm import tqdm

from engine.config import SpecialistConfig
from engine.execution import LineProgress, progress_bar
from engine.records import ImageRecord
from specialists.base import SpecialistInput
from specialists.rapidocr import RapidOCRSpecialist
from tests.processes import REPO

# A stage on a fresh embedded Ray, as the CLI runs it; it prints the auth mode Ray ended
# up with, so the test sees that quieting Ray's notice left token auth on.
EMBEDDED_RUN = """
from ray._raylet import AuthenticationMode, get_authentication_mode
from engine.config import RayConfig
from engine.execution import ray_session, run_units
from tests.test_execution import square_or_fail

with ray_session(RayConfig(num_cpus=1, local_max_units=0)):  # on Ray, however few
    units = [0, 1, 2, 4]
    summary = run_units("squares", square_or_fail, units, done=lambda u: False, num_cpus=0.25)
    print(summary.outputs, get_authentication_mode() == AuthenticationMode.TOKEN)
"""


def test_embedded_ray_starts_quietly_with_auth_on_and_logs_progress_once():
    # As a user's shell has it: no auth mode chosen (this test session's own Ray set one).
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    done = subprocess.run(
        [sys.executable, "-c", EMBEDDED_RUN],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["21", "True"]
    assert "Token authentication" not in done.stderr
    # stderr is a pipe, not a terminal: not a line per redraw (text mode reads each
    # carriage return as a line end) but one line for this short stage.
    progress = [line for line in done.stderr.splitlines() if line.startswith("squares:")]
    assert progress == [progress[0]] and "4/4 units (100%) items=4" in progress[0], done.stderr


def test_line_progress_prints_at_a_bounded_rate():
    out = io.StringIO()
    with LineProgress(100, "stage", file=out, interval=3600) as bar:
        for n in range(100):
            bar.update(1)
            bar.set_postfix(items=n + 1)
    assert out.getvalue().splitlines() == ["stage: 100/100 units (100%) items=100 0s"]
    out = io.StringIO()
    with LineProgress(3, "stage", file=out, interval=0) as bar:
        for _ in range(3):
            bar.update(1)
    # A line for each update once the interval has passed, and no repeat at the end.
    assert len(out.getvalue().splitlines()) == 3
    out = io.StringIO()
    with LineProgress(3, "stage", file=out, disable=True) as bar:
        bar.update(3)
    assert out.getvalue() == ""


def test_progress_is_a_bar_on_a_terminal_and_lines_elsewhere():
    assert isinstance(progress_bar(5, "stage", file=io.StringIO()), LineProgress)
    leader, follower = os.openpty()
    with os.fdopen(follower, "w") as terminal:
        bar = progress_bar(5, "stage", file=terminal)
        assert isinstance(bar, tqdm)
        bar.close()
    os.close(leader)


def test_rapidocr_says_nothing_about_models_or_empty_images(capfd):
    specialist = RapidOCRSpecialist(SpecialistConfig(name="ocr", kind="rapidocr"))
    specialist.setup()
    blank = Image.new("RGB", (64, 48), "white")
    record = ImageRecord("0" * 24, "file:///blank.png", "test", 64, 48, "0" * 64)
    assert specialist.annotate([SpecialistInput(record, blank)])[0].regions == []
    out, err = capfd.readouterr()
    # Its model loading (INFO) and "text detection result is empty" (WARNING).
    assert "RapidOCR" not in out + err
