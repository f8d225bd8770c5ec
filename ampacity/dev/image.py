"""The operator image as an OCI layout, without a container daemon or a downloaded base image.

The release workflow builds `operator/Dockerfile` with Docker. This builds an equivalent image on
a machine that has neither Docker nor registry access, from what it does have: Debian's own
packages (a `debootstrap` minbase root file system with python3, cached) and the project's wheels
from PyPI (`pip install --target`). Two layers, the Debian base and the application, written as
an OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/...`) that `skopeo copy oci:DIR ...`
or `podman load` take as they are. `run_in_image` unpacks the layers into a root file system and
runs a command in it with `chroot`, which is how the tests smoke-run the operator in it.
"""

from __future__ import annotations

import argparse
import configparser
import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
SUITE = "bookworm"  # its python3 is 3.11, the version the project targets
MIRROR = "http://deb.debian.org/debian"
CACHE = Path.home() / ".cache" / "ampacity" / "image"
SITE = "usr/local/lib/python3.11/dist-packages"  # on Debian's python3 path
#: The chart's securityContext runs as this numeric non-root user (as operator/Dockerfile does).
USER = "65532:65532"
#: Fixed timestamp, so the same inputs give the same layers.
EPOCH = 0


def _say(message: str) -> None:
    print(f"[image] {message}", file=sys.stderr, flush=True)


def debian_base(cache: Path = CACHE) -> Path:
    """A Debian minbase root file system with python3, made once by debootstrap and kept."""
    rootfs = cache / f"{SUITE}-python3"
    if not (rootfs / "usr" / "bin" / "python3").exists():
        staging = cache / f"{SUITE}-python3.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.parent.mkdir(parents=True, exist_ok=True)
        _say(f"debootstrap {SUITE} with python3 into {staging} (a few minutes, once)")
        subprocess.run(
            ["debootstrap", "--variant=minbase", "--include=python3", SUITE, str(staging), MIRROR], check=True
        )
        # Package caches are not part of the image.
        shutil.rmtree(staging / "var" / "cache" / "apt" / "archives", ignore_errors=True)
        staging.rename(rootfs)
    return rootfs


def application(out: Path) -> Path:
    """The project and its dependencies installed under /usr/local, with their commands."""
    site = out / SITE
    _say(f"pip install the project into {site}")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-compile",
            "--target",
            str(site),
            f"{REPO}[nvml]",
        ],
        check=True,
    )
    # pip --target leaves scripts pointing at this interpreter: write them for the image's python3.
    shutil.rmtree(site / "bin", ignore_errors=True)
    bin_dir = out / "usr" / "local" / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for entry_points in site.glob("*.dist-info/entry_points.txt"):
        parser = configparser.ConfigParser()
        parser.read(entry_points)
        for name, target in (
            parser["console_scripts"].items() if parser.has_section("console_scripts") else []
        ):
            module, _, function = target.partition(":")
            script = bin_dir / name
            script.write_text(
                f"#!/usr/bin/python3\nimport sys\nfrom {module} import {function}\nsys.exit({function}())\n"
            )
            script.chmod(0o755)
    return out


def _tree(root: Path) -> list[Path]:
    """Every entry under `root`, parents first; symbolic links are entries, never followed."""
    found = []
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs.sort()
        found += [Path(folder) / name for name in sorted(dirs + files)]
    return found


def _layer(root: Path) -> tuple[bytes, str]:
    """A gzipped tar of `root` (owned by root, fixed times) and the digest of the plain tar."""
    plain = io.BytesIO()
    with tarfile.open(fileobj=plain, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in _tree(root):
            name = path.relative_to(root).as_posix()
            info = tar.gettarinfo(str(path), arcname=name)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = EPOCH
            if info.isreg():
                with path.open("rb") as data:
                    tar.addfile(info, data)
            elif info.isdir() or info.issym() or info.islnk():
                tar.addfile(info)
            # Device nodes and sockets are left out: a container runtime provides /dev.
    raw = plain.getvalue()
    return gzip.compress(raw, compresslevel=6, mtime=EPOCH), "sha256:" + hashlib.sha256(raw).hexdigest()


def _blob(layout: Path, data: bytes) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def write_layout(layout: Path, layers: list[Path], tag: str) -> Path:
    """An OCI image layout at `layout` with `layers` (root file systems, lowest first)."""
    shutil.rmtree(layout, ignore_errors=True)
    layout.mkdir(parents=True)
    descriptors, diff_ids = [], []
    for root in layers:
        _say(f"packing layer {root}")
        data, diff_id = _layer(root)
        descriptors.append(
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **_blob(layout, data)}
        )
        diff_ids.append(diff_id)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "User": USER,
            "Env": [
                "PATH=/usr/local/bin:/usr/bin:/bin",
                "PYTHONUNBUFFERED=1",
                "PYTHONDONTWRITEBYTECODE=1",
            ],
            "Entrypoint": ["ampacity"],
            "Labels": {"org.opencontainers.image.version": tag},
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            **_blob(layout, json.dumps(config).encode()),
        },
        "layers": descriptors,
    }
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                **_blob(layout, json.dumps(manifest).encode()),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    (layout / "index.json").write_text(json.dumps(index))
    return layout


def build(layout: Path, tag: str, cache: Path = CACHE) -> Path:
    """Build the operator image into the OCI layout `layout`."""
    base = debian_base(cache)
    with tempfile.TemporaryDirectory(prefix="ampacity-image-") as tmp:
        app = application(Path(tmp) / "app")
        return write_layout(layout, [base, app], tag)


def _read_blob(layout: Path, digest: str) -> bytes:
    return (layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()


def image_config(layout: Path) -> dict[str, Any]:
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads(_read_blob(layout, index["manifests"][0]["digest"]))
    config: dict[str, Any] = json.loads(_read_blob(layout, manifest["config"]["digest"]))
    return config


def unpack(layout: Path, rootfs: Path) -> None:
    """Extract the image's layers, lowest first, into `rootfs` (what a runtime's snapshotter does)."""
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads(_read_blob(layout, index["manifests"][0]["digest"]))
    for layer in manifest["layers"]:
        with tarfile.open(fileobj=io.BytesIO(gzip.decompress(_read_blob(layout, layer["digest"])))) as tar:
            tar.extractall(rootfs, filter="tar")


@contextlib.contextmanager
def unpacked(layout: Path) -> Iterator[Path]:
    """The image's root file system in a temporary folder, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="ampacity-rootfs-") as tmp:
        Path(tmp).chmod(0o755)  # the image's / , which its non-root user must traverse
        unpack(layout, Path(tmp))
        yield Path(tmp)


def run_in_rootfs(
    rootfs: Path, config: dict[str, Any], argv: list[str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run `argv` in an unpacked image as the image's user, with its environment (chroot; needs root)."""
    settings = config["config"]
    env = dict(e.split("=", 1) for e in settings["Env"])
    # A private mount and PID namespace: nothing it starts outlives the call.
    tools = [shutil.which(tool) or tool for tool in ("unshare", "chroot")]
    command = [
        tools[0],
        "--mount",
        "--pid",
        "--fork",
        tools[1],
        f"--userspec={settings['User']}",
        str(rootfs),
    ]
    return subprocess.run([*command, *argv], env=env, capture_output=True, text=True, timeout=timeout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ampacity.dev.image", description=__doc__)
    parser.add_argument("--out", type=Path, default=REPO / "dist" / "oci", help="OCI layout folder")
    parser.add_argument("--tag", default="0.1.0")
    args = parser.parse_args(argv)
    build(args.out, args.tag)
    _say(
        f"wrote {args.out}; e.g. skopeo copy oci:{args.out}:{args.tag} docker://ghcr.io/ampacity/ampacity:{args.tag}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
