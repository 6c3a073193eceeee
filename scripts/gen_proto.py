"""Regenerates phaul/rpc/phaul_pb2*.py{,i} from proto/phaul.proto (`make proto`).

The generated code is committed, so a wheel or `pip install .` needs nothing
but setuptools; tests/test_packaging.py regenerates it into a temporary
directory with the pinned grpcio-tools (pyproject.toml's test extra) and fails
when the committed files differ. grpcio-tools is never a runtime dependency.

    .venv/bin/python scripts/gen_proto.py [OUT_DIR]   # default: the checkout itself
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROTO = Path("proto") / "phaul.proto"
GENERATED = ("phaul_pb2.py", "phaul_pb2.pyi", "phaul_pb2_grpc.py")


def generate(out: Path) -> list[Path]:
    """Compile proto/phaul.proto into `out`/phaul/rpc/ and return the files written."""
    (out / "phaul" / "rpc").mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-Iphaul/rpc=proto", f"--python_out={out}", f"--pyi_out={out}",
         f"--grpc_python_out={out}", str(PROTO)],
        cwd=REPO, check=True,
    )
    return [out / "phaul" / "rpc" / name for name in GENERATED]


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else REPO):
        print(path)
