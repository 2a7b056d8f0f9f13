"""deploy/docker/Dockerfile.*, parsed (no Docker engine runs here, so none is built): each base image pinned by a
tag, each COPY source present in the build context (the repository root), the command a `shardserve` command line
the CLI accepts, torch pinned inside the project's range, and torch_npu paired with that torch."""

from __future__ import annotations

import importlib.metadata
import json
import re
import shlex
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((REPO / "deploy" / "docker").glob("Dockerfile.*"))


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: comment lines dropped, backslash continuations joined, ARG defaults
    substituted for ${NAME} and $NAME."""
    out, args, pending = [], {}, ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        op, _, rest = (pending + line).strip().partition(" ")
        pending = ""
        rest = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], m[0]), rest.strip())
        if op.upper() == "ARG" and "=" in rest:
            name, _, default = rest.partition("=")
            args[name] = default
        out.append((op.upper(), rest))
    return out


def problems(text: str) -> list[str]:
    found = []
    steps = instructions(text)
    for op, rest in steps:
        if op == "FROM":
            image = rest.split()[0]
            tag = image.rsplit("/", 1)[-1].partition(":")[2]
            if not tag or tag == "latest":
                found.append(f"FROM {image}: not pinned by a tag")
        if op == "COPY" and "--from=" not in rest:
            *sources, _dest = shlex.split(rest)
            found += [f"COPY {s}: not in the build context" for s in sources if not (REPO / s).exists()]
    commands = [json.loads(rest) for op, rest in steps if op in ("CMD", "ENTRYPOINT")]
    if not commands or commands[-1][0] != "shardserve":
        found.append(f"the image's command is not shardserve: {commands}")
    return found


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_is_pinned_and_copies_what_exists(path):
    assert problems(path.read_text()) == []


def test_the_checks_bite():
    bad = "FROM python\nFROM ubuntu:latest\nCOPY pyproject.toml no_such_dir ./\nCMD [\"python\", \"-m\", \"x\"]\n"
    assert problems(bad) == [
        "FROM python: not pinned by a tag",
        "FROM ubuntu:latest: not pinned by a tag",
        "COPY no_such_dir: not in the build context",
        "the image's command is not shardserve: [['python', '-m', 'x']]",
    ]
    assert problems("FROM registry:5000/img\nCMD [\"shardserve\"]\n") == ["FROM registry:5000/img: not pinned by a tag"]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_the_command_is_one_the_cli_takes(path, monkeypatch):
    from shardserve.cluster import cli

    (cmd,) = [json.loads(rest) for op, rest in instructions(path.read_text()) if op == "CMD"]
    seen = {}
    monkeypatch.setattr(cli, "serve", lambda args: seen.setdefault("args", args))
    cli.main(cmd[1:])
    assert seen["args"].host == "0.0.0.0", "inside a container, serve on every interface"
    assert seen["args"].device == {"cpu": "auto", "cuda": "cuda", "ascend": "npu"}[path.suffix[1:]]


def _pins(text: str, package: str) -> list[Version]:
    runs = " ".join(rest for op, rest in instructions(text) if op == "RUN")
    return [Version(v) for v in re.findall(rf"(?<![\w-]){package}==([\w.+]+)", runs)]


def test_torch_pins_are_inside_the_projects_range():
    deps = importlib.metadata.requires("shardserve")  # the installed project's: pyproject.toml's, on any Python
    (torch,) = [Requirement(d) for d in deps if Requirement(d).name == "torch"]
    for path in DOCKERFILES:
        pins = _pins(path.read_text(), "torch")
        assert pins and all(torch.specifier.contains(v) for v in pins), (path.name, pins, str(torch.specifier))
    assert not torch.specifier.contains(Version("2.14.0"))  # the range this test reads is a real bound


def test_the_ascend_image_pairs_torch_npu_with_its_torch_on_cann():
    text = (REPO / "deploy" / "docker" / "Dockerfile.ascend").read_text()
    (base,) = [rest for op, rest in instructions(text) if op == "FROM"]
    assert re.match(r"(quay\.io/ascend|ascendai)/cann:", base)
    torch, npu = set(_pins(text, "torch")), set(_pins(text, "torch_npu"))
    assert len(torch) == len(npu) == 1
    assert npu.pop().release[:3] == torch.pop().release[:3], "torch_npu X.Y.Z is built for torch X.Y.Z"
    assert any(op == "RUN" and '".[npu]"' in rest for op, rest in instructions(text))


def test_the_cuda_image_takes_a_cuda_torch():
    text = (REPO / "deploy" / "docker" / "Dockerfile.cuda").read_text()
    (base,) = [rest for op, rest in instructions(text) if op == "FROM"]
    assert base.startswith("nvidia/cuda:")
    assert re.search(r"download\.pytorch\.org/whl/cu\d+", text)
