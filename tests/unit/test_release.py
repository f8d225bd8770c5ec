"""The release workflow publishes what the chart installs: the same image name and version."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / ".github" / "workflows"


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def test_release_pushes_the_image_the_chart_pulls() -> None:
    release = load(WORKFLOWS / "release.yaml")
    values = load(REPO / "helm" / "ampacity" / "values.yaml")
    assert release["env"]["IMAGE"] == values["image"]["repository"]
    # An empty tag means the chart's appVersion, which the release sets to the tag's version.
    assert values["image"]["tag"] == ""
    build = next(
        s for s in release["jobs"]["image"]["steps"] if s.get("uses", "").startswith("docker/build-push")
    )
    assert (REPO / build["with"]["file"]).is_file()
    assert build["with"]["tags"] == "${{ env.IMAGE }}:${{ needs.version.outputs.version }}"
    package = " ".join(s.get("run", "") for s in release["jobs"]["chart"]["steps"])
    assert '--app-version "${{ needs.version.outputs.version }}"' in package


def test_release_runs_on_version_tags_after_the_tests() -> None:
    release = load(WORKFLOWS / "release.yaml")
    assert release[True]["push"]["tags"] == ["v*.*.*"]  # YAML 1.1 reads the key `on` as True
    assert release["jobs"]["test"]["uses"] == "./.github/workflows/ci.yaml"
    assert "test" in release["jobs"]["image"]["needs"]
    assert "workflow_call" in load(WORKFLOWS / "ci.yaml")[True]


def test_chart_and_package_versions_agree() -> None:
    chart = load(REPO / "helm" / "ampacity" / "Chart.yaml")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert chart["appVersion"] == chart["version"] == project["version"]


def test_ci_runs_the_test_script() -> None:
    ci = load(WORKFLOWS / "ci.yaml")
    assert any(s.get("run") == "tools/test.sh -q" for s in ci["jobs"]["test"]["steps"])
