"""Errors graphslim raises, each mapped by the CLI to one line and an exit code."""

from __future__ import annotations

__all__ = [
    "EXIT_BUDGET",
    "EXIT_INTERNAL",
    "EXIT_NOT_RUN",
    "EXIT_OK",
    "EXIT_USAGE",
    "GraphslimError",
    "InputError",
    "PassError",
    "PipelineError",
    "VerificationError",
]

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2  # bad input file, bad pipeline, bad option
EXIT_BUDGET = 3  # the run finished but a budget (accuracy, size, latency) was missed
EXIT_NOT_RUN = 4  # the run finished but a pass the user asked for could not run at all (reason reported)


class GraphslimError(Exception):
    """Base class. `exit_code` is what the CLI returns for it."""

    exit_code = EXIT_INTERNAL


class InputError(GraphslimError):
    """The user's input (model file, data file, output path) cannot be used."""

    exit_code = EXIT_USAGE


class PipelineError(GraphslimError):
    """A pipeline string or recipe names an unknown pass or option, or a bad value."""

    exit_code = EXIT_USAGE


class PassError(GraphslimError):
    """A pass failed. The message names the pass and the passes that ran before it."""

    exit_code = EXIT_INTERNAL

    def __init__(self, pass_text: str, ran_before: list[str], cause: BaseException | str):
        self.pass_text = pass_text
        self.ran_before = list(ran_before)
        self.cause = cause
        # Bad input a pass finds while it reads it (a data shard with NaN, labels out of range,
        # static quantization without data) keeps the input's exit code: 2, not "internal".
        if isinstance(cause, InputError):
            self.exit_code = cause.exit_code
        before = ", ".join(ran_before) if ran_before else "none"
        super().__init__(f"pass '{pass_text}' failed: {cause} (passes run before it: {before})")


class VerificationError(PassError):
    """`--verify` found that a pass produced an invalid model or changed an exact result."""
