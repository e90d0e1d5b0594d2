"""The import guard for native builds: _core may use instruction-set extensions that only the
CPU it was built on is known to have (FUSEDLSTM_NATIVE=ON compiles with -march=native). Loading
it on a CPU without them would kill the interpreter with an illegal instruction, so the package
asks _isa (compiled for the baseline CPU) first and raises ImportError instead."""

from __future__ import annotations


def missing_extensions(isa) -> list[str]:
    """The extensions _core was compiled for that this CPU lacks, per the _isa module given."""
    return [name for name in isa.required() if isa.supported(name) is False]


def require_cpu(isa) -> None:
    """Raise ImportError naming what is missing when _core cannot run on this CPU."""
    missing = missing_extensions(isa)
    if not missing:
        return
    raise ImportError(
        "fusedlstm: this build was compiled for another CPU (FUSEDLSTM_NATIVE=ON, -march=native) "
        f"and uses instruction sets this CPU lacks: {', '.join(missing)}. Loading it would crash "
        "with an illegal instruction. Rebuild it on this machine, without pip's wheel cache "
        "(pip install --force-reinstall --no-cache-dir <the same source>), or build a portable "
        "one for all x86-64 CPUs with -Ccmake.define.FUSEDLSTM_NATIVE=OFF."
    )
