"""Build (once) and load the TensorFlow op library. TensorFlow's C++ ABI changes between
releases, so the op is compiled against the *installed* TensorFlow on first use, from the kernel
sources shipped inside the package, into a per-user cache keyed by TensorFlow's version and a
hash of the sources, the flags and the instruction sets they select on this CPU; a file lock keeps
concurrent processes from colliding. `fusedlstm build-tf-op` prebuilds it.

The sources and flags are those of the CMake build: both read ``csrc/build.json`` (installed with
the sources, or the checkout's). TensorFlow's headers are included as system headers, so their
warnings stay out of the build log while ours stay on."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple

__all__ = ["BuildDefinition", "build_definition", "build_op", "op_library_path", "source_dir"]

_MANIFEST = "build.json"
# TensorFlow's bundled Eigen fails to compile with gcc 12 on AVX-512 FP16 CPUs: switched off where
# the compiler accepts the flag (the op's only flag that the CMake build lacks, besides
# TensorFlow's own).
_TF_SIMD_EXTRA = ["-mno-avx512fp16"]


def source_dir() -> Path:
    """The kernel sources and their build definition: installed with the package, or the
    checkout's csrc/."""
    here = Path(__file__).resolve().parent.parent
    for cand in (here / "csrc", here.parents[1] / "csrc"):
        if (cand / "tf" / "lstm_ops.cc").is_file() and (cand / _MANIFEST).is_file():
            return cand
    raise FileNotFoundError(
        "fusedlstm's C++ sources or their build definition "
        f"({_MANIFEST}) are missing from the installation (looked in "
        f"{here / 'csrc'}); reinstall fusedlstm"
    )


class BuildDefinition(NamedTuple):
    """What csrc/build.json says the op is compiled from and with."""

    sources: list[str]  # relative to source_dir(): the LSTM kernels, then the op
    include_dirs: list[str]
    definitions: list[str]
    options: list[str]  # every source, release build
    source_options: dict[str, list[str]]  # added after `options` for that source
    native_flags: list[str]


def _strings(d: dict, key: str, path: Path) -> list[str]:
    v = d.get(key)
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise TypeError(f"{path}: {key!r} must be a list of strings")
    return list(v)


def build_definition(src: Path | None = None) -> BuildDefinition:
    """Read csrc/build.json (the file the CMake build reads too)."""
    path = (src or source_dir()) / _MANIFEST
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"cannot read the kernels' build definition {path}: {exc}") from None
    if not isinstance(d, dict):
        raise TypeError(f"{path}: expected a JSON object")
    per_file = d.get("source_options", {})
    if not isinstance(per_file, dict):
        raise TypeError(f"{path}: 'source_options' must map a source to a list of options")
    return BuildDefinition(
        sources=_strings(d, "lstm_sources", path) + _strings(d, "tf_op_sources", path),
        include_dirs=_strings(d, "include_dirs", path),
        definitions=_strings(d, "definitions", path),
        options=_strings(d, "release_options", path) + _strings(d, "options", path),
        source_options={k: _strings(per_file, k, path) for k in per_file},
        native_flags=_strings(d, "native_flags", path),
    )


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not cxx:
        raise RuntimeError(
            "building the fusedlstm TensorFlow op needs a C++ compiler (g++ or "
            "clang++) on PATH, or CXX set; none was found"
        )
    return cxx


def _accepts(cxx: str, flags: list[str]) -> bool:
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "t.cc"
        src.write_text("int main() { return 0; }\n")
        r = subprocess.run([cxx, *flags, "-c", str(src), "-o", str(Path(d) / "t.o")], capture_output=True, check=False)
        return r.returncode == 0


def _simd_flags(cxx: str) -> list[str]:
    """The CMake build's native flags (the op is compiled on the machine that runs it), unless
    FUSEDLSTM_NATIVE=0. TensorFlow's own flags carry no SIMD at all (Eigen would run at SSE2
    speed)."""
    if os.environ.get("FUSEDLSTM_NATIVE", "1") == "0":
        return []
    native = build_definition().native_flags
    for flags in (native + _TF_SIMD_EXTRA, native, native[:1]):
        if flags and _accepts(cxx, flags):
            return flags
    return []


def _target_macros(cxx: str, flags: list[str]) -> str:
    """What the SIMD flags mean on this machine: the compiler's predefined macros under them
    (-march=native names a different instruction set on every CPU model). Part of the cache key,
    so a home directory shared by different CPUs never hands one a library built for another,
    which would die with an illegal instruction."""
    if not flags:
        return ""
    r = subprocess.run([cxx, *flags, "-dM", "-E", "-x", "c++", os.devnull], capture_output=True, text=True, check=False)
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
        # What the op is compiled from: the Python module's and the CUDA build's files are not.
        if f.relative_to(src).parts[0] in ("python", "cuda"):
            continue
        if f.suffix in (".h", ".cc") or f.name == _MANIFEST:
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


def _system_includes(flags: list[str]) -> list[str]:
    """TensorFlow's compile flags with its include directories as system ones (-isystem): the
    warnings its headers (and its bundled Eigen) raise are not ours to fix."""
    out: list[str] = []
    for f in flags:
        if f.startswith("-I") and len(f) > 2:
            out += ["-isystem", f[2:]]
        else:
            out.append(f)
    return out


def compile_commands(cxx: str, src: Path, tf_cflags: list[str], simd: list[str], out_dir: Path) -> list[tuple]:
    """(source, object, command) for each unit of the op, from csrc/build.json."""
    d = build_definition(src)
    # -fPIC and hidden visibility: what CMakeLists.txt sets as target properties (TensorFlow loads
    # its libraries RTLD_GLOBAL and exports Eigen symbols: ours must stay hidden).
    common = [
        *d.options,
        "-fPIC",
        "-fvisibility=hidden",
        "-fvisibility-inlines-hidden",
        *(f"-D{x}" for x in d.definitions),
        *(f"-I{src / i}" for i in d.include_dirs),
        *simd,
        *_system_includes(tf_cflags),
    ]
    cmds = []
    for rel in d.sources:
        obj = out_dir / (rel.replace("/", "_") + ".o")
        cmds.append((rel, obj, [cxx, *common, *d.source_options.get(rel, []), "-c", str(src / rel), "-o", str(obj)]))
    return cmds


def _compile(target: Path, verbose: bool) -> None:
    cxx = _compiler()
    _, cflags, lflags = _tf_flags()
    src = source_dir()
    simd = _simd_flags(cxx)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        procs, objs = [], []
        for rel, obj, cmd in compile_commands(cxx, src, cflags, simd, Path(tmp)):
            # compiled in parallel: each unit is Eigen-heavy
            if verbose:
                print(" ".join(cmd))
            procs.append((rel, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)))
            objs.append(str(obj))
        for rel, p in procs:
            out, _ = p.communicate()
            if p.returncode != 0:
                raise RuntimeError(f"compiling {rel} for the TensorFlow op failed:\n{out.decode()[-4000:]}")
            if verbose and out:
                print(out.decode(errors="replace"))
        tmp_so = Path(tmp) / target.name
        r = subprocess.run(
            [cxx, "-shared", *objs, "-o", str(tmp_so), *lflags], capture_output=True, text=True, check=False
        )
        if r.returncode != 0:
            raise RuntimeError(f"linking the TensorFlow op failed:\n{r.stderr[-4000:]}")
        os.replace(tmp_so, target)  # atomic: a reader never sees a half-written library
