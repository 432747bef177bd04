"""poft's own error types: failures a user can fix (their data, options, models, templates, paths, disk).

`poft` prints these as one line naming the thing and the fix (exit code 2); any other exception is a
bug and keeps its traceback. Each type also subclasses the built-in its callers used to catch
(`ValueError`, `OSError`), so library code written against those keeps working.
"""

from __future__ import annotations


class PoftError(Exception):
    """A failure the user can fix; the message names the file, row or option and the fix."""


class OptionError(PoftError, ValueError):
    """A command-line option or config value that cannot work."""


class DataError(PoftError, ValueError):
    """Data the user has to fix; the message names the file, the row, the problem and the fix."""


class ChatTemplateError(PoftError, ValueError):
    """A chat template that cannot render or mask a conversation."""


class ModelError(PoftError, ValueError):
    """A model that cannot be found or loaded: a wrong path, missing tokenizer files, missing or broken weights."""


class ScoringError(PoftError, RuntimeError):
    """Scoring cannot go on; what was already computed stays in the cache."""


class CacheError(ScoringError):
    """A score cache that cannot be read or written; the message names the file and the fix."""


class DependencyError(PoftError, ImportError):
    """An optional dependency a feature needs is not installed; the message names the pip command."""


class OutputError(PoftError, OSError):
    """An output that cannot be written, or must not be: an input, a foreign folder, a read-only or full disk."""
