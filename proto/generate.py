"""Regenerates the Python protobuf/gRPC modules in proto/ from proto/*.proto (`make proto`).

The generated modules import each other as `pdserve.proto.X`, so imports are rewritten after
generation. `check()` (used by a test) reports whether the checked-in files are stale.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent


def generate(out_dir: Path) -> list[Path]:
    from grpc_tools import protoc
    import grpc_tools

    include = str(Path(grpc_tools.__file__).parent / "_proto")
    protos = sorted(PROTO_DIR.glob("*.proto"))
    args = ["protoc", f"-I{PROTO_DIR}", f"-I{include}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}", *map(str, protos)]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    written = []
    for path in sorted(out_dir.glob("*_pb2*.py*")):
        text = re.sub(r"^import (\w+_pb2) as", r"from pdserve.proto import \1 as", path.read_text(), flags=re.M)
        path.write_text(text)
        written.append(path)
    return written


def check() -> list[str]:
    """Names of generated files that differ from what `generate` would write now."""
    with tempfile.TemporaryDirectory() as tmp:
        stale = []
        for path in generate(Path(tmp)):
            current = PROTO_DIR / path.name
            if not current.exists() or current.read_text() != path.read_text():
                stale.append(path.name)
        return stale


def main() -> int:
    for path in generate(PROTO_DIR):
        print(f"wrote {path.relative_to(PROTO_DIR.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
