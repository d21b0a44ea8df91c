#!/usr/bin/env python3
"""Compiles kernels/*.cu the way the CUDA backend does (prelude in front,
NVRTC, compute_90), on a machine without a GPU, then assembles the PTX with
ptxas for sm_90 and prints each kernel's registers, spills and shared
memory. With --sass NAME it also prints the SASS of the kernels whose name
contains NAME.

Needs NVRTC and ptxas (for example the `nvidia-cuda-nvrtc-cu12` and
`nvidia-cuda-nvcc-cu12` wheels) and, for --sass, cuobjdump:
  NVRTC_LIB=/path/libnvrtc.so.12 PTXAS=/path/ptxas CUOBJDUMP=/path/cuobjdump \
    scripts/kernel-check.py [FAMILY...] [--sass NAME] [--timeline]
With --timeline the kernels are compiled with the timeline marks.
"""
import argparse
import ctypes
import os
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
KERNELS = ROOT / "kernels"


def nvrtc_compile(lib, source, name, arch, defines=()):
    prog = ctypes.c_void_p()
    check = lambda rc, what: rc == 0 or sys.exit(f"{what} failed: {rc}")
    check(lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None), "nvrtcCreateProgram")
    opts = [f"--gpu-architecture=compute_{arch}".encode(), b"--std=c++17"] + [f"-D{d}".encode() for d in defines]
    arr = (ctypes.c_char_p * len(opts))(*opts)
    rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    text = log.value.decode(errors="replace").strip()
    if rc != 0:
        print(f"--- {name}: NVRTC failed\n{text}")
        return None
    if text:
        print(f"--- {name}: NVRTC log\n{text}")
    lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetPTX(prog, ptx)
    return ptx.value.decode()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("families", nargs="*")
    ap.add_argument("--sass", default=None)
    ap.add_argument("--arch", default="90")
    ap.add_argument("--timeline", action="store_true", help="with the timeline marks (as MAMBA_SERVE_TIMELINE compiles them)")
    args = ap.parse_args()
    lib = ctypes.CDLL(os.environ.get("NVRTC_LIB", "libnvrtc.so.12"))
    ptxas = os.environ.get("PTXAS", "ptxas")
    prelude = (KERNELS / "prelude.cu").read_text()
    families = args.families or sorted(p.stem for p in KERNELS.glob("*.cu") if p.stem != "prelude")
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        for fam in families:
            src = prelude + "\n" + (KERNELS / f"{fam}.cu").read_text()
            defines = ("MS_TIMELINE", "TL_CAP=8388608ull") if args.timeline else ()
            ptx = nvrtc_compile(lib, src, f"{fam}.cu", args.arch, defines)
            if ptx is None:
                failed = True
                continue
            ptx_path = pathlib.Path(tmp) / f"{fam}.ptx"
            cubin = pathlib.Path(tmp) / f"{fam}.cubin"
            ptx_path.write_text(ptx)
            r = subprocess.run([ptxas, f"-arch=sm_{args.arch}", "-v", str(ptx_path), "-o", str(cubin)], capture_output=True, text=True)
            if r.returncode != 0:
                print(f"--- {fam}: ptxas failed\n{r.stderr}")
                failed = True
                continue
            name = None
            for line in r.stderr.splitlines():
                if "Compiling entry function" in line:
                    name = line.split("'")[1]
                elif "Used" in line and name:
                    print(f"{fam:8s} {name:40s} {line.split('info    :')[-1].strip()}")
                elif "spill" in line and name and not line.strip().endswith("0 bytes spill loads"):
                    print(f"{fam:8s} {name:40s} {line.split('info    :')[-1].strip()}")
            if args.sass:
                tool = os.environ.get("CUOBJDUMP", "cuobjdump")
                out = subprocess.run([tool, "-sass", str(cubin)], capture_output=True, text=True).stdout
                keep = False
                for line in out.splitlines():
                    if "Function :" in line:
                        keep = args.sass in line
                    if keep:
                        print(line)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
