"""Console-script launchers for the CLI binaries shipped inside the installed package.

pip puts `duquant-pack` and `duquant-inspect` on PATH as entry points that exec
duquant_ext/bin/<name>. The binaries stay inside the package, beside libduquant.so, because they
find it through a relative rpath ($ORIGIN/..); the scripts directory sits at a different place
relative to site-packages under every install scheme (venv, --user, --prefix, --target), which
no rpath can follow. This module does not import duquant_ext (that would load torch), so the
launcher costs only an interpreter start.
"""
import importlib.util
import os
import sys


def _exec(name):
    spec = importlib.util.find_spec("duquant_ext")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        sys.exit("%s: the duquant_ext package is not importable by %s" % (name, sys.executable))
    tried = []
    for package_dir in spec.submodule_search_locations:
        binary = os.path.join(package_dir, "bin", name)
        if os.access(binary, os.X_OK):
            os.execv(binary, [name] + sys.argv[1:])
        tried.append(binary)
    sys.exit("%s: no executable at %s; this duquant install was built without the CLI tools "
             "(reinstall with `pip install --no-build-isolation .` from a full checkout)"
             % (name, " or ".join(tried)))


def pack():
    _exec("duquant-pack")


def inspect():
    _exec("duquant-inspect")
