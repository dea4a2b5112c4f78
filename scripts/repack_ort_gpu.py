"""Repack an onnxruntime-gpu wheel small enough to carry to a lent GPU host in one call.

The wheel is ~250 MB; a device call carries at most 64 MiB. This keeps only what the GPU check
needs: the CUDA kernels of one architecture (others zeroed inside the fat binary, so they compress
to nothing), no TensorRT provider, no C-API library, no quantization/tools packages. It keeps
``onnxruntime/transformers`` (the fp16 export uses its float16 converter). Output: an xz tarball
of the package tree that ``scripts/gpu-check.sh`` unpacks (about 57 MB for 1.30.0 and sm_90).

    python scripts/repack_ort_gpu.py --wheel onnxruntime_gpu-1.30.0-cp312-...whl --out .device/ort-gpu.tar.xz
"""

from __future__ import annotations

import argparse
import shutil
import struct
import subprocess
import tempfile
import zipfile
from pathlib import Path

FATBIN_MAGIC = 0xBA55ED50
DROPPED = (
    "onnxruntime/capi/libonnxruntime_providers_tensorrt.so",
    "onnxruntime/quantization",
    "onnxruntime/tools",
    "onnxruntime/datasets",
)


def section(data: bytes, wanted: str) -> tuple[int, int]:
    """(offset, size) of an ELF64 section by name."""
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    entsize, count, names_index = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * entsize) for i in range(count)]
    names_offset = headers[names_index][4]
    for name, _, _, _, offset, size in headers:
        end = data.index(b"\0", names_offset + name)
        if data[names_offset + name : end].decode() == wanted:
            return offset, size
    raise KeyError(wanted)


def keep_one_architecture(library: Path, architecture: int) -> int:
    """Zero every cubin/PTX payload of another architecture; returns the bytes zeroed."""
    data = bytearray(library.read_bytes())
    start, size = section(bytes(data), ".nv_fatbin")
    position, end, zeroed = start, start + size, 0
    while position < end:
        magic, _, header_size, fat_size = struct.unpack_from("<IHHQ", data, position)
        if magic != FATBIN_MAGIC:
            position += 8
            continue
        entry, entries_end = position + header_size, position + header_size + fat_size
        while entry < entries_end:
            _, _, entry_header, payload = struct.unpack_from("<HHIQ", data, entry)
            arch = struct.unpack_from("<I", data, entry + 28)[0]
            if arch != architecture:
                data[entry + entry_header : entry + entry_header + payload] = bytes(payload)
                zeroed += payload
            entry += entry_header + payload
        position = entries_end
    library.write_bytes(bytes(data))
    return zeroed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel", type=Path, required=True, help="onnxruntime-gpu wheel (pip download)")
    parser.add_argument("--out", type=Path, default=Path(".device/ort-gpu.tar.xz"))
    parser.add_argument("--arch", type=int, default=90, help="compute capability kept (90 = H100/H200)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        tree = Path(scratch)
        zipfile.ZipFile(args.wheel).extractall(tree)
        for path in DROPPED:
            target = tree / path
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        for library in (tree / "onnxruntime/capi").glob("libonnxruntime.so*"):
            library.unlink()  # the C API library; the Python module links its own copy
        zeroed = keep_one_architecture(tree / "onnxruntime/capi/libonnxruntime_providers_cuda.so", args.arch)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        members = [p.name for p in tree.iterdir()]
        with args.out.open("wb") as out:
            tar = subprocess.Popen(["tar", "cf", "-", "-C", str(tree), *members], stdout=subprocess.PIPE)
            subprocess.run(["xz", "-T2", "-6"], stdin=tar.stdout, stdout=out, check=True)
            tar.wait()
    print(f"{args.out}: {args.out.stat().st_size / 1e6:.1f} MB ({zeroed / 1e6:.0f} MB of other archs zeroed)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
