"""Regenerate step_pb2.py, step_pb2.pyi and step_pb2_grpc.py from step.proto.

Run `python -m exporter.proto.regenerate` after editing step.proto; the unit test
tests/unit/test_proto_fresh.py fails while the committed code is stale.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
GENERATED = ("step_pb2.py", "step_pb2.pyi", "step_pb2_grpc.py")


def generate(out_dir: Path) -> None:
    """Run protoc (from grpcio-tools) on step.proto, writing into out_dir."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).resolve().parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{HERE}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(HERE / "step.proto"),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    # protoc writes `import step_pb2`, which only works from this directory; the
    # package-relative import makes the module importable as exporter.proto.step_pb2_grpc.
    grpc_file = out_dir / "step_pb2_grpc.py"
    text = grpc_file.read_text()
    text = re.sub(r"^import step_pb2 as", "from . import step_pb2 as", text, flags=re.M)
    grpc_file.write_text(text)


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        for name in GENERATED:
            (HERE / name).write_text((Path(tmp) / name).read_text())
    print("regenerated", ", ".join(GENERATED), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
