"""Build (once) and load the TensorFlow op library. TensorFlow's C++ ABI changes between
releases, so the op is compiled against the *installed* TensorFlow on first use, from the kernel
sources shipped inside the package, into a per-user cache keyed by TensorFlow's version and a
hash of the sources, the flags and the instruction sets they select on this CPU; a file lock keeps concurrent processes from colliding.
`fusedlstm build-tf-op` prebuilds it."""
from __future__ import annotations

import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import List

__all__ = ["build_op", "op_library_path", "source_dir"]

_SOURCES = ["cpu/lstm_cpu.cc", "cpu/gemm.cc", "tf/lstm_ops.cc"]
_CONTRACT = {"cpu/gemm.cc": "-ffp-contract=fast"}  # see gemm.cc; everything else: off


def source_dir() -> Path:
    """The kernel sources: installed with the package, or the checkout's csrc/."""
    here = Path(__file__).resolve().parent.parent
    for cand in (here / "csrc", here.parents[1] / "csrc"):
        if (cand / "tf" / "lstm_ops.cc").is_file():
            return cand
    raise FileNotFoundError("fusedlstm's C++ sources are missing from the installation "
                            f"(looked in {here / 'csrc'}); reinstall fusedlstm")


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not cxx:
        raise RuntimeError("building the fusedlstm TensorFlow op needs a C++ compiler (g++ or "
                           "clang++) on PATH, or CXX set; none was found")
    return cxx


def _accepts(cxx: str, flags: List[str]) -> bool:
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "t.cc"
        src.write_text("int main() { return 0; }\n")
        r = subprocess.run([cxx, *flags, "-c", str(src), "-o", str(Path(d) / "t.o")],
                           capture_output=True)
        return r.returncode == 0


def _simd_flags(cxx: str) -> List[str]:
    # TensorFlow's own flags carry no SIMD at all (Eigen would run at SSE2 speed). gcc 12 with
    # TF's bundled Eigen fails on AVX-512 FP16 CPUs, hence -mno-avx512fp16 where accepted.
    if os.environ.get("FUSEDLSTM_NATIVE", "1") == "0":
        return []
    for flags in (["-march=native", "-mtune=generic", "-mno-avx512fp16"],
                  ["-march=native", "-mtune=generic"], ["-march=native"]):
        if _accepts(cxx, flags):
            return flags
    return []


def _target_macros(cxx: str, flags: List[str]) -> str:
    """What the SIMD flags mean on this machine: the compiler's predefined macros under them
    (-march=native names a different instruction set on every CPU model). Part of the cache key,
    so a home directory shared by different CPUs never hands one a library built for another,
    which would die with an illegal instruction."""
    if not flags:
        return ""
    r = subprocess.run([cxx, *flags, "-dM", "-E", "-x", "c++", os.devnull],
                       capture_output=True, text=True)
    if r.returncode != 0:  # no macro dump (an unusual compiler): fall back to the CPU's own words
        return _cpu_flags_line()
    return "\n".join(sorted(r.stdout.splitlines()))


def _cpu_flags_line() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _tf_flags():
    import tensorflow as tf

    return tf.__version__, list(tf.sysconfig.get_compile_flags()), list(tf.sysconfig.get_link_flags())


def op_library_path() -> Path:
    """Where the library for the installed TensorFlow and these sources lives (may not exist)."""
    cxx = _compiler()
    version, cflags, lflags = _tf_flags()
    src = source_dir()
    h = hashlib.sha256()
    for f in sorted(src.rglob("*")):
        if f.suffix in (".h", ".cc"):
            h.update(str(f.relative_to(src)).encode())
            h.update(f.read_bytes())
    simd = _simd_flags(cxx)
    h.update(" ".join([cxx, *cflags, *lflags, *simd]).encode())
    h.update(_target_macros(cxx, simd).encode())
    root = Path(os.environ.get("FUSEDLSTM_CACHE") or Path.home() / ".cache" / "fusedlstm")
    return root / "tf-ops" / f"tf{version}-{h.hexdigest()[:16]}" / "_fusedlstm_tf_ops.so"


def build_op(force: bool = False, verbose: bool = False) -> Path:
    """Compile the op library if it is not cached yet; return its path."""
    target = op_library_path()
    if target.is_file() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same thing
        try:
            if target.is_file() and not force:
                return target
            _compile(target, verbose)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return target


def _compile(target: Path, verbose: bool) -> None:
    cxx = _compiler()
    _, cflags, lflags = _tf_flags()
    src = source_dir()
    common = ["-O3", "-fPIC", "-fvisibility=hidden", "-fvisibility-inlines-hidden", "-w",
              "-DEIGEN_DONT_PARALLELIZE", "-DEIGEN_GEMM_TO_COEFFBASED_THRESHOLD=0",
              f"-I{src / 'include'}", *_simd_flags(cxx), *cflags]
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        procs, objs = [], []
        for rel in _SOURCES:  # compile in parallel: each unit is Eigen-heavy
            obj = Path(tmp) / (rel.replace("/", "_") + ".o")
            cmd = [cxx, *common, _CONTRACT.get(rel, "-ffp-contract=off"), "-c", str(src / rel), "-o", str(obj)]
            if verbose:
                print(" ".join(cmd))
            procs.append((rel, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)))
            objs.append(str(obj))
        for rel, p in procs:
            out, _ = p.communicate()
            if p.returncode != 0:
                raise RuntimeError(f"compiling {rel} for the TensorFlow op failed:\n{out.decode()[-4000:]}")
        tmp_so = Path(tmp) / target.name
        r = subprocess.run([cxx, "-shared", *objs, "-o", str(tmp_so), *lflags], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"linking the TensorFlow op failed:\n{r.stderr[-4000:]}")
        os.replace(tmp_so, target)  # atomic: a reader never sees a half-written library
