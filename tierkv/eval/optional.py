"""The evaluation peers' optional dependencies: whether each can be used here, and if not, why.

The peers run through kvpress and optimum-quanto, which the core install does not carry (they
come with ``pip install 'tierkv[eval]'``). A missing or unusable one makes its peers unavailable
with a one-line reason naming the pip command, never a traceback.
"""

from __future__ import annotations

import importlib.util

# The pip distribution that provides each optional module a peer imports.
DISTRIBUTIONS = {"kvpress": "kvpress", "optimum.quanto": "optimum-quanto"}


class PeerUnavailable(ValueError):
    """A peer whose optional dependency is not installed (``pip install 'tierkv[eval]'``).

    A ``ValueError`` so that the command line reports it as a usage error, not a crash.
    """


def installed(module: str) -> bool:
    """Whether ``module`` can be found, without importing it.

    ``find_spec("a.b")`` imports ``a`` first and raises ModuleNotFoundError when ``a`` itself
    is missing (``optimum.quanto`` without ``optimum``) instead of returning None.
    """
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def transformers_conflict(distribution: str) -> str | None:
    """Why ``distribution``'s own transformers pin excludes the installed transformers, or None.

    kvpress pins a transformers range (0.5.x: ``>=4.56,<5.3``) narrower than tierkv's core
    accepts, so a core install may carry a transformers that kvpress does not work with.
    """
    try:
        from importlib.metadata import PackageNotFoundError, requires, version

        from packaging.requirements import Requirement

        installed_version = version("transformers")
        for line in requires(distribution) or []:
            req = Requirement(line)
            if (
                req.name == "transformers"
                and not req.marker
                and not req.specifier.contains(installed_version, prereleases=True)
            ):
                return (
                    f"{distribution} {version(distribution)} requires transformers"
                    f"{req.specifier} but transformers {installed_version} is installed"
                )
    except (ImportError, PackageNotFoundError, ValueError):
        return None  # no metadata to judge by: the import decides
    return None


def require(module: str) -> None:
    """Raise ``PeerUnavailable`` with the pip command to run when ``module`` cannot be used."""
    distribution = DISTRIBUTIONS.get(module, module)
    if not installed(module):
        raise PeerUnavailable(
            f"{module} is not installed: pip install {distribution} "
            "(or the whole fidelity extra: pip install 'tierkv[eval]')"
        )
    conflict = transformers_conflict(distribution)
    if conflict:
        raise PeerUnavailable(
            f"{conflict}; install the fidelity extra, which pins a transformers that "
            f"{distribution} works with, in its own environment: pip install 'tierkv[eval]'"
        )
