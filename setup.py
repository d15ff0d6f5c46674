"""Package discovery for setuptools (everything else is in pyproject.toml).

The import package ``qcn`` is assembled from three source roots. Every package below a root is
found, and every non-Python file inside a root ships with the package that holds it, so a new op
folder, runtime module or data file (e.g. PTX, JSON) needs no edit here.
"""

from pathlib import Path

from setuptools import find_packages, setup

ROOTS = {"qcn": "qcn_pkg", "qcn.compile": "compile", "qcn.runtime": "runtime"}
HERE = Path(__file__).resolve().parent


def _discover() -> tuple[list[str], dict[str, list[str]]]:
    packages: list[str] = []
    data: dict[str, list[str]] = {}
    for name, root in ROOTS.items():
        base = HERE / root
        subs = {name: base, **{f"{name}.{s}": base.joinpath(*s.split(".")) for s in find_packages(base)}}
        packages += subs
        for f in sorted(base.rglob("*")):
            if not f.is_file() or f.suffix in (".py", ".pyc") or "__pycache__" in f.parts:
                continue
            owner = max((p for p, d in subs.items() if d in f.parents), key=len)  # deepest package holding f
            data.setdefault(owner, []).append(f.relative_to(subs[owner]).as_posix())
    return packages, data


packages, package_data = _discover()
setup(package_dir=ROOTS, packages=packages, package_data=package_data)
