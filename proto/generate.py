"""Regenerates the Python code of every .proto under proto/ into the top-level ``nann`` package.

    python proto/generate.py            # rewrite nann/**/_pb2*.py
    python proto/generate.py --out DIR  # write elsewhere (the test compares DIR with nann/)

The generated modules are committed, so a server install needs no protoc; a test fails
when they drift from the .proto.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "proto"


def generate(out: Path) -> list[Path]:
    """Runs protoc (grpcio-tools) on every .proto; returns the generated files."""
    protos = sorted(PROTO_DIR.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    out.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *[str(p) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed; see the message above")
    written = []
    for proto in protos:
        package_dir = out / proto.relative_to(PROTO_DIR).parent
        # Every directory of the package path is a regular package.
        rel = package_dir.relative_to(out)
        for depth in range(1, len(rel.parts) + 1):
            (out.joinpath(*rel.parts[:depth]) / "__init__.py").touch()
        stem = proto.stem
        written += [package_dir / f"{stem}{suffix}" for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")]
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ROOT, help="output root (default: the project root)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path.relative_to(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
