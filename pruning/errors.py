"""Errors about the user's input, as opposed to bugs.

The checks that validate what a user gives (configs, budgets, model names, weight and data files, optional
packages) raise :class:`UserInputError` or a subclass, with a message that names the value, the accepted forms
and the fix. ``python -m pruning.run`` prints such an error as one paragraph and exits with code 2; any other
exception is a bug or an environment failure and keeps its traceback (exit code 1).

:class:`UserInputError` subclasses ``ValueError`` (and the two narrower kinds ``FileNotFoundError`` and
``ImportError``), so callers that catch the builtin types keep working.
"""
from __future__ import annotations


class UserInputError(ValueError):
    """Bad input found by a check; the message names the value, the accepted forms and the fix."""


class MissingInputError(UserInputError, FileNotFoundError):
    """A file or folder the input names does not exist."""


class MissingPackageError(UserInputError, ImportError):
    """An optional package the input asks for is not installed; the message gives the ``pip install`` command."""


class PipelineError(UserInputError):
    """Bad input found by the pipeline (a stage's missing input, a setting that cannot work); the message names
    the value and the fix."""
