"""llama.cpp built from source once, cached, for the engine checks and the latency tables.

The C++ tree comes from the newest ``llama-cpp-python`` source distribution on PyPI (a pinned,
versioned snapshot of llama.cpp; the sdist version names the build). One CMake build directory
serves every consumer: ``libllama`` for our small tools (benchmarks/llama_nll.cpp, ...) and
``llama-bench``, llama.cpp's own benchmark, for latency. Compilation is ``nice``'d.

The cache is ``$SECATEURS_LLAMACPP`` or ``~/.cache/secateurs/llamacpp``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

CACHE_ENV = "SECATEURS_LLAMACPP"
NICE = ("nice", "-n", "10")
# tools and the common library are on for llama-bench; everything else that needs network
# libraries or takes long to build is off
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=ON",
    "-DGGML_NATIVE=ON",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_COMMON=ON",
)


def cache_dir(explicit: str | os.PathLike | None = None) -> Path:
    root = explicit or os.environ.get(CACHE_ENV) or Path.home() / ".cache/secateurs/llamacpp"
    return Path(root)


def build_dir(cache: Path) -> Path:
    return cache / "build"


def llama_source(cache: Path) -> Path:
    """The llama.cpp tree of the newest llama-cpp-python sdist (downloaded once)."""
    found = sorted(cache.glob("llama_cpp_python-*/vendor/llama.cpp"))
    if found:
        return found[-1]
    cache.mkdir(parents=True, exist_ok=True)
    if not sorted(cache.glob("llama_cpp_python-*.tar.gz")):
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        subprocess.run([*pip, "llama-cpp-python", "-d", str(cache)], check=True)
    sdist = sorted(cache.glob("llama_cpp_python-*.tar.gz"))[-1]
    with tarfile.open(sdist) as archive:
        archive.extractall(cache, filter="data")
    return sorted(cache.glob("llama_cpp_python-*/vendor/llama.cpp"))[-1]


def version(cache: Path) -> str:
    """The build's name: the llama-cpp-python sdist its llama.cpp tree came from."""
    source = llama_source(cache)
    return source.parent.parent.name  # llama_cpp_python-X.Y.Z


def _configured(build: Path) -> bool:
    """Configured with this module's flags (an older tools-off build is reconfigured)."""
    cached = build / "CMakeCache.txt"
    return cached.is_file() and "LLAMA_BUILD_TOOLS:BOOL=ON" in cached.read_text()


def build(cache: Path, targets: tuple[str, ...], jobs: int = 2) -> Path:
    """Build ``targets`` (CMake target names) if any is missing; returns the ``bin`` folder."""
    build_ = build_dir(cache)
    binary = build_ / "bin"
    names = {"llama": "libllama.so"}
    if all((binary / names.get(t, t)).is_file() for t in targets):
        return binary
    source = llama_source(cache)
    if not _configured(build_):
        configure = ["cmake", "-S", str(source), "-B", str(build_), *CMAKE_FLAGS]
        subprocess.run([*NICE, *configure], check=True)
    compile_ = ["cmake", "--build", str(build_), "-j", str(jobs)]
    for target in targets:
        compile_ += ["--target", target]
    subprocess.run([*NICE, *compile_], check=True)
    return binary


def llama_bench(cache: Path | None = None, jobs: int = 2) -> Path:
    """The ``llama-bench`` executable (built on first use)."""
    return build(cache or cache_dir(), ("llama-bench",), jobs) / "llama-bench"


def cached_llama_bench(cache: Path | None = None) -> Path | None:
    """``llama-bench`` if already built, else None (tests skip rather than compile)."""
    path = build_dir(cache or cache_dir()) / "bin" / "llama-bench"
    return path if path.is_file() else None


def compile_tool(cache: Path, source_file: Path, jobs: int = 2) -> Path:
    """A small C++ program linked to libllama (rebuilt when its source is newer)."""
    binary = build(cache, ("llama",), jobs)
    tool = binary / source_file.stem
    if tool.is_file() and tool.stat().st_mtime >= source_file.stat().st_mtime:
        return tool
    source = llama_source(cache)
    command = ["g++", "-O2", "-std=c++17", f"-I{source / 'include'}"]
    command += [f"-I{source / 'ggml' / 'include'}", str(source_file), f"-L{binary}"]
    command += ["-lllama", "-lggml", "-lggml-base", f"-Wl,-rpath,{binary}", "-o", str(tool)]
    subprocess.run([*NICE, *command], check=True)
    return tool
