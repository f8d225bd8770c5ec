"""The operator image, built without Docker from Debian packages and PyPI wheels, runs the operator.

The first run makes the Debian base with debootstrap (a few minutes; cached in
~/.cache/ampacity/image), so this needs root, debootstrap and the Debian mirror, like the
control-plane build needs Go and the module proxy.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ampacity.cli import version
from ampacity.dev.image import USER, build, image_config, run_in_rootfs, unpacked

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("debootstrap") is None, reason="needs root and debootstrap"
)


Run = Callable[[list[str]], subprocess.CompletedProcess[str]]


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("image") / "oci", version())


@pytest.fixture(scope="module")
def run_in_image(layout: Path) -> Iterator[Run]:
    """Run a command in the image's layers, unpacked once for the module."""
    config = image_config(layout)
    with unpacked(layout) as rootfs:
        yield lambda argv: run_in_rootfs(rootfs, config, argv)


def test_the_image_is_an_oci_layout_running_as_non_root(layout: Path, run_in_image: Run) -> None:
    assert (layout / "oci-layout").read_text() == '{"imageLayoutVersion": "1.0.0"}'
    config = image_config(layout)
    assert config["config"]["User"] == USER
    assert len(config["rootfs"]["diff_ids"]) == 2
    assert run_in_image(["id", "-u"]).stdout.strip() == USER.split(":")[0]


def test_kopf_runs_the_controllers_module_in_the_image(run_in_image: Run) -> None:
    result = run_in_image(["python3", "-m", "kopf", "run", "-m", "controllers", "--help"])
    assert result.returncode == 0, result.stderr
    assert "--standalone" in result.stdout
    # `--help` stops before importing the module; the chart's command needs it importable too.
    imported = run_in_image(["python3", "-c", "import controllers, agents; print('ok')"])
    assert imported.stdout.strip() == "ok", imported.stderr


def test_the_entrypoint_is_the_ampacity_command(run_in_image: Run) -> None:
    result = run_in_image(["ampacity", "--version"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"ampacity {version()}"
