"""The one error type a bad spec raises, with the file, the equation and the problem."""

from __future__ import annotations


class SpecError(ValueError):
    """A spec that cannot be built: names the file, the equation (if any) and the problem."""

    def __init__(self, path: str, problem: str, equation: str | None = None):
        self.path = str(path)
        self.problem = problem
        self.equation = equation
        where = f"{self.path}"
        if equation:
            where += f", in `{equation}`"
        super().__init__(f"{where}: {problem}")

    def __reduce__(self):
        # pickled with its own arguments: an error raised in one of derive.library()'s
        # worker processes reaches the caller as itself, not as a broken process pool
        return (type(self), (self.path, self.problem, self.equation))
