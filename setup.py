"""Builds the duquant Python package with CMake against the torch of the installing interpreter.

    pip install --no-build-isolation .
    CMAKE_ARGS="-DDUQUANT_EXTRA_INCLUDE=/path/to/headers" pip install --no-build-isolation .

The package is self-contained: duquant_ext/ holds the pure-Python modules, _C (the bindings),
libduquant.so (found by _C through rpath $ORIGIN) and bin/duquant-pack, bin/duquant-inspect
(which find libduquant through $ORIGIN/..). The console scripts duquant-pack/duquant-inspect
exec those binaries (see python/duquant_cli.py for why they are not installed as scripts).
Environment: CMAKE_ARGS (extra configure arguments), CMAKE_BUILD_PARALLEL_LEVEL (jobs),
CMAKE_GENERATOR (default Ninja when ninja is on PATH), DUQUANT_SETUP_BUILD_DIR (build tree,
default build-pip/).
"""
import os
import re
import shlex
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
# setuptools' build tree (the CMake tree included) goes to build-pip/, not build/ (./dev's CMake
# tree); ./dev install-check points it into its own build dir.
BUILD_BASE = os.path.abspath(os.environ.get("DUQUANT_SETUP_BUILD_DIR") or os.path.join(ROOT, "build-pip"))

try:
    import torch
except ImportError:
    sys.exit(
        "duquant: torch is not importable by %s. The extension is compiled against the torch of the "
        "installing interpreter: install torch first, then run `pip install --no-build-isolation .` "
        "(an isolated build cannot see it)." % sys.executable
    )


def project_version():
    with open(os.path.join(ROOT, "CMakeLists.txt")) as f:
        match = re.search(r"project\(duquant\s+VERSION\s+([0-9.]+)", f.read())
    if not match:
        sys.exit("duquant: no `project(duquant VERSION x.y.z)` in CMakeLists.txt")
    return match.group(1)


class CMakeBuild(build_ext):
    """Configures, builds and installs the CMake project into a staging prefix laid out as the
    package, then copies the compiled files into the wheel's duquant_ext/."""

    def run(self):
        if self.inplace:
            sys.exit("duquant: editable installs are not supported; use ./dev build and "
                     "PYTHONPATH=build/python, or a regular `pip install --no-build-isolation .`")
        build_dir = os.path.abspath(os.path.join(self.build_temp, "cmake"))
        stage = os.path.abspath(os.path.join(self.build_temp, "stage"))
        os.makedirs(build_dir, exist_ok=True)

        configure = [
            "cmake", "-S", ROOT, "-B", build_dir,
            "-DCMAKE_BUILD_TYPE=Release",
            "-DCMAKE_PREFIX_PATH=" + torch.utils.cmake_prefix_path,
            "-DPython3_EXECUTABLE=" + sys.executable,
            "-DDUQUANT_BUILD_TESTS=OFF",
            "-DDUQUANT_BUILD_EXAMPLES=OFF",
            "-DDUQUANT_BUILD_PYTHON=ON",
            "-DDUQUANT_INSTALL=ON",
            # Staging layout = the package: site/duquant_ext/{_C, *.py, libduquant.so, bin/}; the
            # rpaths CMake computes from these dirs are the package's. Headers and the CMake
            # package config are staged outside it and not shipped.
            "-DDUQUANT_INSTALL_PYTHONDIR=site",
            "-DCMAKE_INSTALL_LIBDIR=site/duquant_ext",
            "-DCMAKE_INSTALL_BINDIR=site/duquant_ext/bin",
            "-DDUQUANT_INSTALL_CMAKEDIR=cmake",
            # A torch installed next to the package (same site-packages) wins over the one the
            # build found; the latter is added by CMake as an absolute fallback.
            "-DCMAKE_INSTALL_RPATH=$ORIGIN/../torch/lib;$ORIGIN/../../torch/lib",
        ]
        if not os.environ.get("CMAKE_GENERATOR") and shutil.which("ninja") \
                and not os.path.exists(os.path.join(build_dir, "CMakeCache.txt")):
            configure += ["-G", "Ninja"]
        configure += shlex.split(os.environ.get("CMAKE_ARGS", ""))
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(os.cpu_count() or 1)

        self._run(configure)
        self._run(["cmake", "--build", build_dir, "--parallel", jobs])
        shutil.rmtree(stage, ignore_errors=True)
        self._run(["cmake", "--install", build_dir, "--prefix", stage])

        staged_pkg = os.path.join(stage, "site", "duquant_ext")
        target_pkg = os.path.join(os.path.abspath(self.build_lib), "duquant_ext")
        copied = []
        # build_lib outlives builds: drop compiled files an earlier build left, keep build_py's .py.
        for dirpath, dirnames, files in os.walk(target_pkg, topdown=False):
            for name in files:
                if not name.endswith(".py"):
                    os.remove(os.path.join(dirpath, name))
            if dirpath != target_pkg and not os.listdir(dirpath):
                os.rmdir(dirpath)

        def ship(src, rel):
            dst = os.path.join(target_pkg, rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copy2(src, dst)  # keeps the executable bit of bin/*
            copied.append(rel)

        for dirpath, _, files in os.walk(staged_pkg):
            for name in files:
                if not name.endswith(".py"):  # build_py copies the sources
                    src = os.path.join(dirpath, name)
                    ship(src, os.path.relpath(src, staged_pkg))
        if not any(c.startswith("_C") for c in copied) or "libduquant.so" not in copied:
            sys.exit("duquant: the CMake install did not produce _C and libduquant.so in %s (got: %s)"
                     % (staged_pkg, ", ".join(sorted(copied)) or "nothing"))
        print("duquant: packaged " + ", ".join(sorted(copied)))

    def _run(self, cmd):
        print("duquant: " + " ".join(shlex.quote(c) for c in cmd), flush=True)
        subprocess.check_call(cmd)


setup(
    version=project_version(),
    # The binary extension ties the package to this torch build's C++ ABI.
    install_requires=["torch==" + torch.__version__],
    package_dir={"": "python"},
    packages=["duquant_ext"],
    py_modules=["duquant_cli"],
    ext_modules=[Extension("duquant_ext._C", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
    options={"build": {"build_base": BUILD_BASE}, "egg_info": {"egg_base": BUILD_BASE}},
)
